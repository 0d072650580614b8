"""The worker-side adapter table: preallocated slots holding each resident adapter's per-layer K_p/V_p.

Slot 0 means "no adapter": zero keys, values and gates, so it contributes exactly nothing. K_p and V_p
are projected once, at load time, by the layer's own fused `qkv_proj` (bias, quantisation and the tensor
parallel shard come along), and gates are sliced to this rank's heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aligner_core.adapter_format import Adapter
from server.engine.aligner_math import single_token_bias


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


@dataclass(frozen=True)
class TableShape:
    num_layers: int  # L: max layer index + 1
    num_heads: int  # H: local query heads
    num_kv_heads: int  # KVH: local kv heads
    head_dim: int  # D
    head_offset: int  # first global head index of this rank
    max_slots: int  # adapters resident at once (slot 0 excluded)
    max_tokens: int  # Nmax


class AdapterTable:
    """`put / lookup / evict`, plus the tensors the Aligner op reads."""

    def __init__(self, shape: TableShape, layers: list[LayerHandle], *, device: torch.device, dtype: torch.dtype):
        self.shape = shape
        self.layers = layers
        self.dtype = dtype  # the model's dtype: P is projected in it, like a real token
        L, S, KVH, N, D = shape.num_layers, shape.max_slots + 1, shape.num_kv_heads, shape.max_tokens, shape.head_dim
        G = shape.num_heads // KVH
        f32 = dict(device=device, dtype=torch.float32)
        self.k = torch.zeros(L, S, KVH, N, D, **f32)  # K_p per layer and slot
        self.v = torch.zeros(L, S, KVH, N, D, **f32)  # V_p
        self.gate = torch.zeros(L, S, KVH, G, **f32)  # gate after activation, grouped like q
        self.bias = torch.zeros(L, S, shape.num_heads * D, **f32)  # g * V_p, used when N == 1
        self.mask = torch.full((S, N), float("-inf"), **f32)  # 0 for real prefix tokens
        self.mask[:, 0] = 0.0  # slot 0 and free slots: one zero key, so softmax stays finite
        self.ntok = np.zeros(S, dtype=np.int64)  # N per slot (0 = empty)
        self.adapted_layers = {h.index for h in layers}
        self._slots: dict[str, int] = {}
        self._free = list(range(S - 1, 0, -1))
        self.loads = 0
        self.evictions = 0

    def lookup(self, key: str) -> int:
        return self._slots.get(key, 0)

    def keys(self) -> list[str]:
        return list(self._slots)

    @torch.inference_mode()
    def put(self, key: str, adapter: Adapter) -> int:
        """Load an adapter under `key` (idempotent). Raises TableFull or ValueError."""
        if key in self._slots:
            return self._slots[key]
        s = self.shape
        if adapter.tokens > s.max_tokens:
            raise ValueError(f"adapter has {adapter.tokens} tokens; the engine allows {s.max_tokens}")
        if adapter.gate.shape[1] < s.head_offset + s.num_heads:
            raise ValueError(f"adapter has {adapter.gate.shape[1]} heads; this rank needs {s.head_offset + s.num_heads}")
        if not self._free:
            raise TableFull(f"all {s.max_slots} adapter slots are in use")
        slot = self._free.pop()
        self._clear(slot)
        n, G = adapter.tokens, s.num_heads // s.num_kv_heads
        gates = adapter.gate_values()[:, s.head_offset : s.head_offset + s.num_heads]  # [L - start, H]
        device = self.k.device
        prefix = adapter.prefix.to(device=device, dtype=self.dtype)  # [N, hidden]
        for layer in self.layers:
            if layer.index < adapter.start_layer:
                continue
            proj = getattr(layer.qkv_proj, "base_layer", layer.qkv_proj)  # unwrap a LoRA wrapper
            qkv = proj(prefix)
            qkv = qkv[0] if isinstance(qkv, tuple) else qkv  # vLLM linears return (out, bias)
            _, kp, vp = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
            kp = kp.reshape(n, s.num_kv_heads, s.head_dim)  # [N, KVH, D]
            if layer.k_norm is not None:
                kp = layer.k_norm(kp)
            vp = vp.reshape(n, s.num_kv_heads, s.head_dim)
            l = layer.index
            self.k[l, slot, :, :n] = kp.transpose(0, 1).float()
            self.v[l, slot, :, :n] = vp.transpose(0, 1).float()
            self.gate[l, slot] = gates[l - adapter.start_layer].to(device).view(s.num_kv_heads, G)
            if n == 1:
                self.bias[l, slot] = single_token_bias(self.v[l, slot, :, :1], self.gate[l, slot])
        self.mask[slot, :n] = 0.0
        self.ntok[slot] = n
        self._slots[key] = slot
        self.loads += 1
        return slot

    def evict(self, key: str, *, in_use: set[int]) -> bool:
        """Free `key`'s slot unless a batch row still uses it. Missing keys count as evicted."""
        slot = self._slots.get(key)
        if slot is None:
            return True
        if slot in in_use:
            return False
        del self._slots[key]
        self._clear(slot)
        self._free.append(slot)
        self.evictions += 1
        return True

    def _clear(self, slot: int) -> None:
        self.k[:, slot] = 0.0
        self.v[:, slot] = 0.0
        self.gate[:, slot] = 0.0
        self.bias[:, slot] = 0.0
        self.mask[slot] = float("-inf")
        self.mask[slot, 0] = 0.0
        self.ntok[slot] = 0

    def stats(self) -> dict[str, int]:
        return {
            "resident": len(self._slots),
            "max_slots": self.shape.max_slots,
            "loads": self.loads,
            "evictions": self.evictions,
            "bytes": sum(t.numel() * t.element_size() for t in (self.k, self.v, self.gate, self.bias, self.mask)),
        }
