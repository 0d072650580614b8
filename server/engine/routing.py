"""Which adapter slot each token of the current forward uses.

Rows (requests in the persistent batch; on the V2 runner, persistent request indices) get their slots
through the worker state (`op.WorkerState.assign`), called by a runner-specific tracker: the V1 logits
processor (`routing_v1`) or the V2 model state (`routing_v2`). Per forward, rows expand to tokens with
the step's `query_start_loc`, once, and the result is cached for all layers of that forward.

A row has one slot per lane: lane 0 holds a plain request's adapter; a stacked request (several adapters,
each with its own softmax, their terms summed) holds its k-th adapter in lane k. Each lane in use is one
kernel call per layer, so a stack's terms are added one after another, each exactly a plain adapter's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np
import torch


class StepPlan:
    """What a kernel needs to know about one forward: each token's slot and the largest N among them. The
    host slots (the C kernel's) are given; the device tensor (the torch and Triton kernels') is made on first
    use, once for all layers, unless it is given (graph-safe mode: a view of the persistent buffer)."""

    def __init__(
        self, tokens: np.ndarray | None, max_tokens: int, device: torch.device, tok_slot: torch.Tensor | None = None
    ) -> None:
        self.tok_slot_host = tokens  # [T] contiguous int64; 0 = no adapter (None: only tok_slot is known)
        self.max_tokens = max_tokens  # keys read per token
        self._device = device
        if tok_slot is not None:
            self.__dict__["tok_slot"] = tok_slot

    @cached_property
    def tok_slot(self) -> torch.Tensor:
        """[T] long, on the model's device."""
        assert self.tok_slot_host is not None
        return torch.from_numpy(self.tok_slot_host).to(self._device)


class Routing:
    """Row -> routing ids (one per lane) state, and which tokens of the forward now running carry which ids.
    Rows change only through the worker state's verbs (`op.WorkerState`), which also does the table lookups
    and turns the tokens into the op's `StepPlan`s (`step_plans`)."""

    def __init__(self, max_rows: int, lanes: int = 1) -> None:
        if lanes < 1:
            raise ValueError(f"a routing needs at least one lane, not {lanes}")
        self.lanes = lanes  # the most adapters one row may stack
        self._rows = np.zeros((lanes, max_rows), dtype=np.int64)  # [lanes, rows] routing id per lane and row
        self._tokens: np.ndarray | None = None  # [lanes used, T], set before a forward on the V2 runner
        self.version = 0  # bumped by `set_tokens`: a plan cached for a forward is stale after it
        self.unknown_key_events = 0  # rows whose adapter key the table did not hold: they ran as the base model

    @property
    def row_slot(self) -> np.ndarray:
        """[rows] lane 0's routing id per row (a plain request's adapter)."""
        return self._rows[0]

    def row_slots(self, row: int) -> list[int]:
        """Row `row`'s routing ids, lane by lane, without the unused lanes."""
        ids = self._rows[:, row].tolist() if row < self._rows.shape[1] else []
        while ids and ids[-1] == 0:
            ids.pop()
        return ids

    # ---- row bookkeeping ----
    def set_row(self, row: int, slots: int | list[int]) -> None:
        """Route `row` to `slots` (lane k gets slots[k]; an int is lane 0 alone)."""
        ids = [slots] if isinstance(slots, int) else list(slots)
        if len(ids) > self.lanes:
            raise ValueError(f"{len(ids)} adapters on one row; the routing has {self.lanes} lanes")
        self._ensure(row)
        self._rows[:, row] = 0
        self._rows[: len(ids), row] = ids

    def set_unknown(self, row: int) -> None:
        """A row whose adapter key is not resident: it runs as the base model (slot 0), and is counted."""
        self.set_row(row, 0)
        self.unknown_key_events += 1

    def move(self, src: int, dst: int, *, swap: bool) -> None:
        self._ensure(max(src, dst))
        a, b = self._rows[:, src].copy(), self._rows[:, dst].copy()
        self._rows[:, dst] = a
        self._rows[:, src] = b if swap else 0

    def slots_in_use(self) -> set[int]:
        used = set(np.unique(self._rows).tolist())
        if self._tokens is not None:
            used |= set(np.unique(self._tokens).tolist())
        used.discard(0)
        return used

    def _ensure(self, row: int) -> None:
        if row >= self._rows.shape[1]:
            grown = np.zeros((self.lanes, max(row + 1, 2 * self._rows.shape[1])), dtype=np.int64)
            grown[:, : self._rows.shape[1]] = self._rows
            self._rows = grown

    # ---- tokens of a forward ----
    def set_tokens(self, tok_slot: np.ndarray | None) -> None:
        """Token -> routing ids for the coming forward (V2 runner), instead of reading rows from the forward
        context: [T] (lane 0 alone) or [lanes used, T]; None: no token has an adapter."""
        if tok_slot is not None and tok_slot.ndim == 1:
            tok_slot = tok_slot[None]
        if tok_slot is not None and len(tok_slot) > self.lanes:
            raise ValueError(f"{len(tok_slot)} lanes of token slots; the routing has {self.lanes}")
        self._tokens = tok_slot
        self.version += 1

    def set_batch(self, rows: np.ndarray, query_start_loc: np.ndarray) -> None:
        """V2 runner, before each forward: batch entry i is row `rows[i]`, its tokens query_start_loc[i:i+2]."""
        self.set_tokens(_expand(self._rows[:, rows], query_start_loc))

    def tokens(self, ctx: object) -> np.ndarray | None:
        """[lanes used, T] routing ids per token of the forward of context `ctx` (lane 0 first), or None when no
        token has an adapter."""
        return self._tokens if self._tokens is not None else self._v1_tokens(ctx)

    def _v1_tokens(self, ctx: object) -> np.ndarray | None:
        if ctx is None:
            return None
        meta = ctx.attn_metadata  # type: ignore[attr-defined]  # vLLM's ForwardContext
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
        rows = min(len(qsl) - 1, self._rows.shape[1])
        return _expand(self._rows[:, :rows], qsl[: rows + 1])


def step_plan(
    tokens: np.ndarray,
    num_tokens: int,
    ntok: np.ndarray,
    device: torch.device,
    stage: Callable[[np.ndarray], np.ndarray] | None = None,
) -> StepPlan | None:
    """The plan for a token -> routing id layout (padded with slot 0 up to num_tokens), None when no token
    has an adapter. `ntok` is the table's N per slot, `stage` its cold tier (routing ids -> slots, staging
    the cold adapters the tokens use)."""
    tokens = tokens[:num_tokens]
    if not tokens.any():
        return None
    if stage is not None:
        tokens = stage(tokens)
    if len(tokens) < num_tokens:  # padding tokens carry no adapter
        tokens = np.concatenate([tokens, np.zeros(num_tokens - len(tokens), dtype=tokens.dtype)])
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)  # the CPU kernel reads it as int64
    return StepPlan(tokens, int(ntok[tokens].max()), device)


def step_plans(
    tokens: np.ndarray,
    num_tokens: int,
    ntok: np.ndarray,
    device: torch.device,
    stage: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[StepPlan]:
    """One plan per lane that has an adapted token, lane 0 first, for a [lanes, T] layout; the cold
    adapters of all lanes are staged together (their scratch slots must not collide)."""
    tokens = tokens[:, :num_tokens]
    if not tokens.any():
        return []
    if stage is not None:
        tokens = stage(tokens)
    return [p for lane in tokens if (p := step_plan(lane, num_tokens, ntok, device)) is not None]


def _expand(slots: np.ndarray, query_start_loc: np.ndarray) -> np.ndarray | None:
    """[lanes, R] slots per batch row -> [lanes used, T] slots per token (row i owns tokens
    query_start_loc[i:i+2]); None when no row has an adapter. Lanes no row uses are left out."""
    used = np.flatnonzero(slots.any(axis=1))
    if not len(used):
        return None
    return np.repeat(slots[: used[-1] + 1], np.diff(query_start_loc), axis=1)


_context_fns: tuple | None = None  # vLLM's (is_forward_context_available, get_forward_context), imported once


def _current_forward_context() -> object:
    """vLLM's context of the forward now running, or None. Called once per layer: the import runs once."""
    global _context_fns
    if _context_fns is None:
        from server.engine.vllm_glue import get_forward_context, is_forward_context_available

        _context_fns = (is_forward_context_available, get_forward_context)
    available, get = _context_fns
    return get() if available() else None
