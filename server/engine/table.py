"""The worker-side adapter table, in two tiers.

Hot tier: preallocated slots holding an adapter's per-layer K_p/V_p, projected once by the layer's own
fused `qkv_proj` (bias, quantisation and the tensor-parallel shard come along), gates sliced to this
rank's heads. Slot 0 means "no adapter": zero keys, values and gates, so it contributes exactly nothing.

Cold tier (when `cold_slots` > 0): every resident adapter also keeps its raw P and gates in a `RawStore`
(~3.4 KB for SmolLM2 N = 1), so far more adapters stay resident than there are hot slots. A request
naming a cold adapter is promoted into a hot slot when one can be freed (the least recently used hot
adapter that no batch row uses is demoted, losing only its projection); otherwise it gets a cold id, and
each forward projects the cold adapters it uses into scratch slots (`stage`), so the op never sees them.

Routing ids: 1..max_slots hot slots, then `scratch` staging slots, then cold ids from `cold_base` on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aligner_core.adapter_format import Adapter
from aligner_core.model_spec import ModelSpec
from server.engine.aligner_math import delta_reference
from server.engine.raw_store import RawStore


class TableFull(RuntimeError):
    """Every slot holds an adapter; the frontend must evict one first."""


@dataclass(frozen=True)
class LayerHandle:
    """One attention layer as the table sees it."""

    index: int
    qkv_proj: torch.nn.Module  # fused [q | k | v] projection, local TP shard
    k_norm: torch.nn.Module | None  # Qwen3-style per-head key norm, applied to K_p as to every key
    q_size: int  # local H * D
    kv_size: int  # local KVH * D

    def project(self, prefix: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K_p, V_p [M, KVH, D] of prefix rows [M, hidden] (in the projection's dtype): the layer's own fused
        projection, as for a real token's keys and values, and its key norm; no RoPE."""
        proj = getattr(self.qkv_proj, "base_layer", self.qkv_proj)  # unwrap a LoRA wrapper
        qkv = proj(prefix)
        qkv = qkv[0] if isinstance(qkv, tuple) else qkv  # vLLM linears return (out, bias)
        _, kp, vp = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        kp = kp.reshape(len(prefix), -1, head_dim)
        if self.k_norm is not None:
            kp = self.k_norm(kp)
        return kp, vp.reshape(len(prefix), -1, head_dim)


@dataclass(frozen=True)
class TableShape:
    num_layers: int  # L: max layer index + 1
    num_heads: int  # H: local query heads
    num_kv_heads: int  # KVH: local kv heads
    head_dim: int  # D
    head_offset: int  # first global head index of this rank
    max_slots: int  # hot slots (slot 0 excluded)
    max_tokens: int  # Nmax
    cold_slots: int = 0  # further adapters resident as raw P and gates only
    scratch: int = 0  # staging slots for cold adapters, per forward (the most rows a forward can have)

    @classmethod
    def unsharded(
        cls, spec: ModelSpec, *, max_slots: int, max_tokens: int, cold_slots: int = 0, scratch: int = 0
    ) -> TableShape:
        """A table of all of `spec`'s layers and heads on one rank (no tensor parallelism: head offset 0)."""
        L, H, KVH, D = spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim
        return cls(L, H, KVH, D, 0, max_slots, max_tokens, cold_slots, scratch)  # in field order; head offset 0


class AdapterTable:
    """`put / lookup / evict / stage`, plus the tensors the Aligner op reads."""

    def __init__(
        self,
        shape: TableShape,
        layers: list[LayerHandle],
        *,
        device: torch.device,
        dtype: torch.dtype,
        kv_dtype: torch.dtype = torch.float32,
    ):
        if shape.cold_slots and shape.scratch < 1:
            raise ValueError("a cold tier needs scratch slots to stage its adapters")
        self.shape = shape
        self.layers = layers
        self.dtype = dtype  # the model's dtype: P is projected in it, like a real token
        # K_p/V_p are projected in the model's dtype, so a table in that dtype holds them exactly; float32
        # serves every path, bfloat16 (for a bfloat16 model) only the CPU kernel, which reads half the bytes.
        if kv_dtype not in (torch.float32, dtype):
            raise ValueError(f"the table holds K_p/V_p in float32 or the model's dtype ({dtype}), not {kv_dtype}")
        L, KVH, N, D = shape.num_layers, shape.num_kv_heads, shape.max_tokens, shape.head_dim
        S = shape.max_slots + 1 + shape.scratch
        G = shape.num_heads // KVH
        f32: dict[str, Any] = dict(device=device, dtype=torch.float32)
        self.k = torch.zeros(L, S, KVH, N, D, device=device, dtype=kv_dtype)  # K_p per layer and slot
        self.v = torch.zeros(L, S, KVH, N, D, device=device, dtype=kv_dtype)  # V_p
        self.gate = torch.zeros(L, S, KVH, G, **f32)  # gate after activation, grouped like q
        self.mask = torch.full((S, N), float("-inf"), **f32)  # 0 for real prefix tokens
        self.mask[:, 0] = 0.0  # slot 0 and free slots: one zero key, so softmax stays finite
        self.ntok = np.zeros(S, dtype=np.int64)  # N per slot (0 = empty)
        self.adapted_layers = {h.index for h in layers}
        self.scratch_base = shape.max_slots + 1
        self.cold_base = S
        self.raw = RawStore(shape.max_slots + shape.cold_slots, (L, shape.num_heads), device=device, dtype=dtype)
        self._hot: OrderedDict[str, int] = OrderedDict()  # key -> hot slot, least recently used first
        self._hot_key: dict[int, str] = {}
        self._free = list(range(shape.max_slots, 0, -1))
        self.loads = 0
        self.evictions = 0
        self.promotions = 0
        self.staged = 0

    def lookup(self, key: str, in_use: set[int] | frozenset[int] = frozenset()) -> int:
        """The routing id for `key`: its hot slot (promoting it if a slot not `in_use` can be had), else its
        cold id, else 0 (not resident)."""
        slot = self._hot.get(key)
        if slot is not None:
            self._hot.move_to_end(key)
            return slot
        c = self.raw.index(key)
        if c is None:
            return 0
        slot = self._claim_hot(in_use)
        if slot is None:
            return self.cold_base + c
        self._load_hot(key, slot, c)
        self.promotions += 1
        return slot

    def keys(self) -> list[str]:
        return list(self.raw._index)

    @torch.inference_mode()
    def put(self, key: str, adapter: Adapter, *, scale: float = 1.0) -> int:
        """Make an adapter resident under `key` (idempotent), its gates (after activation) times `scale`: the
        term is linear in the gate, so this is the adapter at that strength. Returns its routing id. Raises
        TableFull or ValueError. It goes hot when a slot is free, cold otherwise."""
        if key in self.raw:
            c = self.raw.index(key)
            assert c is not None  # key in self.raw
            return self._hot.get(key) or self.cold_base + c
        s = self.shape
        if adapter.tokens > s.max_tokens:
            raise ValueError(f"adapter has {adapter.tokens} tokens; the engine allows {s.max_tokens}")
        if adapter.gate.shape[1] < s.head_offset + s.num_heads:
            raise ValueError(
                f"adapter has {adapter.gate.shape[1]} heads; this rank needs {s.head_offset + s.num_heads}"
            )
        if not math.isfinite(scale):
            raise ValueError(f"an adapter's scale must be finite, not {scale}")
        if self.raw.full():
            raise TableFull(f"all {self.raw.capacity} adapter slots are in use")
        gates = torch.zeros(s.num_layers, s.num_heads)  # [L, H], zero below start_layer
        gates[adapter.start_layer :] = adapter.gate_values()[
            : s.num_layers - adapter.start_layer, s.head_offset : s.head_offset + s.num_heads
        ]
        if scale != 1.0:
            gates = gates * scale
        c = self.raw.add(key, adapter.prefix, gates)
        self.loads += 1
        if not self._free:
            return self.cold_base + c
        slot = self._free.pop()
        self._load_hot(key, slot, c)
        return slot

    def evict(self, key: str, *, in_use: set[int]) -> bool:
        """Drop `key` from both tiers unless a batch row still uses it. Missing keys count as evicted."""
        c = self.raw.index(key)
        if c is None:
            return True
        slot = self._hot.get(key)
        if (slot is not None and slot in in_use) or self.cold_base + c in in_use:
            return False
        if slot is not None:
            self._drop_hot(slot)
            self._free.append(slot)
        self.raw.remove(key)
        self.evictions += 1
        return True

    @torch.inference_mode()
    def stage(self, tokens: np.ndarray) -> np.ndarray:
        """Token routing ids -> table slots: cold adapters are projected into scratch slots for this forward."""
        cold = tokens >= self.cold_base
        if not cold.any():
            return tokens
        ids, inverse = np.unique(tokens[cold], return_inverse=True)
        if len(ids) > self.shape.scratch:
            raise RuntimeError(f"{len(ids)} cold adapters in one forward; {self.shape.scratch} scratch slots")
        slots = self.scratch_base + np.arange(len(ids))
        self._project(slots.tolist(), (ids - self.cold_base).tolist())
        out = tokens.copy()
        out[cold] = slots[inverse]
        self.staged += len(ids)
        return out

    # ---- internals ----
    def _claim_hot(self, in_use: set[int] | frozenset[int]) -> int | None:
        if self._free:
            return self._free.pop()
        if not self.shape.cold_slots:
            return None
        for slot in self._hot.values():  # least recently used first
            if slot not in in_use:
                self._drop_hot(slot)
                return slot
        return None

    def _load_hot(self, key: str, slot: int, c: int) -> None:
        self._project([slot], [c])
        self._hot[key] = slot
        self._hot_key[slot] = key

    def _drop_hot(self, slot: int) -> None:
        del self._hot[self._hot_key.pop(slot)]
        self._clear(slot)

    @torch.inference_mode()
    def _project(self, slots: list[int], cs: list[int]) -> None:
        """Fill table `slots` from raw adapters `cs`: K_p/V_p per layer, gates, mask."""
        s = self.shape
        KVH, D, G = s.num_kv_heads, s.head_dim, s.num_heads // s.num_kv_heads
        for n, (positions, prefix, gates) in self.raw.fetch(cs).items():
            idx = torch.tensor([slots[p] for p in positions], device=self.k.device)
            U = len(positions)
            self._clear(idx)
            flat = prefix.reshape(U * n, -1)  # [U*N, hidden], the model's dtype
            for layer in self.layers:
                kp, vp = layer.project(flat, D)  # [U*N, KVH, D]
                l = layer.index
                self.k[l, idx, :, :n] = kp.reshape(U, n, KVH, D).transpose(1, 2).to(self.k.dtype)  # [U, KVH, N, D]
                self.v[l, idx, :, :n] = vp.reshape(U, n, KVH, D).transpose(1, 2).to(self.v.dtype)
                self.gate[l, idx] = gates[:, l].reshape(U, KVH, G).to(self.gate.device)
            self.mask[idx, :n] = 0.0
            self.ntok[idx.cpu().numpy()] = n

    def _clear(self, slot) -> None:
        self.k[:, slot] = 0.0
        self.v[:, slot] = 0.0
        self.gate[:, slot] = 0.0
        self.mask[slot] = float("-inf")
        self.mask[slot, 0] = 0.0
        self.ntok[slot.cpu().numpy() if isinstance(slot, torch.Tensor) else slot] = 0

    def stats(self) -> dict[str, int]:
        hot_bytes = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.gate, self.mask))
        return {
            "resident": len(self.raw),
            "hot": len(self._hot),
            "cold": len(self.raw) - len(self._hot),
            "max_slots": self.shape.max_slots,
            "cold_slots": self.shape.cold_slots,
            "loads": self.loads,
            "evictions": self.evictions,
            "promotions": self.promotions,
            "staged": self.staged,
            "bytes": hot_bytes + self.raw.nbytes(),
            "hot_bytes": hot_bytes,
            "raw_bytes": self.raw.nbytes(),
        }


def reference_term(
    layer: LayerHandle,
    q: torch.Tensor,  # [T, H*D] post-RoPE queries (one rank holding every head)
    adapters: list[Adapter | None],  # token t's adapter, or None
    head_dim: int,
) -> torch.Tensor:  # [T, H*D] float32
    """The reference twin of a table slot read by the op: the term straight from the raw adapters, P projected
    now by the layer (in its weights' dtype, on their device), with none of the table's slots, tiers or paths."""
    weight = next(layer.qkv_proj.parameters())
    kp: list[torch.Tensor | None] = []
    vp: list[torch.Tensor | None] = []
    gates: list[torch.Tensor | None] = []
    for a in adapters:
        if a is None or layer.index < a.start_layer:
            kp.append(None)
            vp.append(None)
            gates.append(None)
            continue
        with torch.no_grad():
            k, v = layer.project(a.prefix.to(weight.device, weight.dtype), head_dim)
        kp.append(k)
        vp.append(v)
        gates.append(a.gate_values()[layer.index - a.start_layer].to(q.device))
    T = q.shape[0]
    return delta_reference(q.float().view(T, -1, head_dim), kp, vp, gates, 1 / math.sqrt(head_dim)).view(T, -1)
