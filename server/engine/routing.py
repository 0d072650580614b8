"""Which adapter slot each token of the current forward uses.

Rows (requests in the persistent batch) get their slot from a runner-specific tracker: the V1 logits
processor (`routing_v1`) or the V2 model state (`routing_v2`). Per forward, rows expand to tokens with
the step's `query_start_loc`, once, and the result is cached for all layers of that forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np
import torch

from server.engine.aligner_math import chunk_layout, token_runs


class StepPlan:
    """What the Aligner op needs to know about one forward. The C kernel reads only the host token slots
    and N; what the torch and Triton paths use besides is made on first use, once for all layers."""

    def __init__(self, tokens: np.ndarray, max_tokens: int, device: torch.device) -> None:
        self.tok_slot_host = tokens  # [T] contiguous int64; 0 = no adapter
        self.max_tokens = max_tokens  # largest N among the step's adapters
        self._device = device
        self._chunks: dict = {}

    @cached_property
    def tok_slot(self) -> torch.Tensor:
        """[T] long, on the model's device."""
        return torch.from_numpy(self.tok_slot_host).to(self._device)

    @cached_property
    def _adapted_host(self) -> np.ndarray:
        return np.flatnonzero(self.tok_slot_host)

    @property
    def num_adapted(self) -> int:
        return len(self._adapted_host)

    @cached_property
    def adapted(self) -> torch.Tensor | None:
        """[T_a] indices of adapted tokens when they are a minority, else None."""
        idx = self._adapted_host
        return torch.from_numpy(idx).to(self._device) if 2 * len(idx) < len(self.tok_slot_host) else None

    @cached_property
    def longest_run(self) -> int:
        """The longest contiguous run of one adapter (a prefill chunk)."""
        tokens = self.tok_slot_host
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(tokens)) + 1, [len(tokens)]])
        return int(np.diff(bounds).max())

    def runs(self) -> list[tuple[int, int, int]]:
        return token_runs(self.tok_slot_host.tolist())

    def chunks(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`chunk_layout` of the step's tokens (rows, chunk_slot, inverse) on the model's device, made once
        per forward for all layers."""
        got = self._chunks.get(size)
        if got is None:
            dev = self._device
            got = self._chunks[size] = tuple(torch.from_numpy(x).to(dev) for x in chunk_layout(self.tok_slot_host, size))
        return got


class Routing:
    """Row -> slot state, and the per-forward token plan."""

    def __init__(self, max_rows: int, ntok: np.ndarray, device: torch.device,
                 stage: Callable[[np.ndarray], np.ndarray] | None = None):  # fmt: skip
        self.row_slot = np.zeros(max_rows, dtype=np.int64)  # persistent-batch row -> routing id
        self._ntok = ntok  # the table's N per slot
        self._stage = stage  # the table's cold tier: routing ids -> slots, staging cold adapters
        self._device = device
        self._cache_ctx: object = None  # the forward context the cached plan belongs to
        self._cache_tokens = -1
        self._cache: StepPlan | None = None
        self._v2_tokens: np.ndarray | None = None  # set by the V2 model state before each forward
        self.unknown_key_events = 0

    # ---- row bookkeeping (V1 logits processor) ----
    def set_row(self, row: int, slot: int) -> None:
        self._ensure(row)
        self.row_slot[row] = slot

    def move(self, src: int, dst: int, *, swap: bool) -> None:
        self._ensure(max(src, dst))
        a, b = self.row_slot[src], self.row_slot[dst]
        self.row_slot[dst] = a
        self.row_slot[src] = b if swap else 0

    def slots_in_use(self) -> set[int]:
        used = set(np.unique(self.row_slot).tolist())
        if self._v2_tokens is not None:
            used |= set(np.unique(self._v2_tokens).tolist())
        used.discard(0)
        return used

    def _ensure(self, row: int) -> None:
        if row >= len(self.row_slot):
            grown = np.zeros(max(row + 1, 2 * len(self.row_slot)), dtype=np.int64)
            grown[: len(self.row_slot)] = self.row_slot
            self.row_slot = grown

    # ---- token plan ----
    def set_v2_tokens(self, tok_slot: np.ndarray | None) -> None:
        """V2 runner: the model state hands over token -> slot for the coming forward."""
        self._v2_tokens = tok_slot
        self._cache_ctx = None

    def plan(self, num_tokens: int) -> StepPlan | None:
        """The plan for the forward now running, or None when no token has an adapter."""
        ctx = _current_forward_context()
        if ctx is not None and ctx is self._cache_ctx and num_tokens == self._cache_tokens:
            return self._cache
        tokens = self._v2_tokens if self._v2_tokens is not None else self._v1_tokens(ctx)
        plan = self.plan_tokens(tokens, num_tokens) if tokens is not None else None
        # Holding the context object keeps its id from being reused by a later forward.
        self._cache_ctx, self._cache_tokens, self._cache = ctx, num_tokens, plan
        return plan

    def _v1_tokens(self, ctx: object) -> np.ndarray | None:
        if ctx is None:
            return None
        meta = ctx.attn_metadata
        if not meta:
            return None  # profiling and warm-up runs
        if isinstance(meta, list):
            raise RuntimeError("Aligner routing does not support micro-batching (DBO)")
        if isinstance(meta, dict):
            meta = next(iter(meta.values()))
        qsl = getattr(meta, "query_start_loc_cpu", None)
        if qsl is None:
            qsl = meta.query_start_loc.cpu()  # CPU backends: already on the host, no sync
        qsl = qsl.numpy() if isinstance(qsl, torch.Tensor) else np.asarray(qsl)
        rows = min(len(qsl) - 1, len(self.row_slot))
        slots = self.row_slot[:rows]
        if not slots.any():
            return None
        return np.repeat(slots, np.diff(qsl[: rows + 1]))

    def plan_tokens(self, tokens: np.ndarray, num_tokens: int) -> StepPlan | None:
        """The plan for a token -> slot layout (padded with slot 0 up to num_tokens)."""
        tokens = tokens[:num_tokens]
        if not tokens.any():
            return None
        if self._stage is not None:
            tokens = self._stage(tokens)
        if len(tokens) < num_tokens:  # padding tokens carry no adapter
            tokens = np.concatenate([tokens, np.zeros(num_tokens - len(tokens), dtype=tokens.dtype)])
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)  # the CPU kernel reads it as int64
        return StepPlan(tokens, int(self._ntok[tokens].max()), self._device)


_context_fns: tuple | None = None  # vLLM's (is_forward_context_available, get_forward_context), imported once


def _current_forward_context() -> object:
    """vLLM's context of the forward now running, or None. Called once per layer: the import runs once."""
    global _context_fns
    if _context_fns is None:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        _context_fns = (is_forward_context_available, get_forward_context)
    available, get = _context_fns
    return get() if available() else None
