"""The `aligner::apply_` custom op: adds the Aligner term to an attention output, in place.

It is opaque to torch.compile (a `torch.library.custom_op` with a fake impl), so per-step routing is read
at run time and never baked into a graph. The worker's table and routing live in one per-process
`WorkerState`, set when the model is built. The routers and the worker extension call its verbs only; the
routing reads just the two views of the table it is built with (N per slot, the cold tier's staging), and
the table never sees the routing:

    V1 logits processor, V2 model state -- assign / release / move / set_batch --> WorkerState
        assign: AdapterTable.lookup(key, Routing.slots_in_use()) per stacked key -> slots -> Routing row
                (or counted unknown)
    worker extension -- load / load_many / evict / counters / stats --> WorkerState -> AdapterTable
    apply_term, once per layer -- plan --> WorkerState -> Routing.tokens (once per forward) -> StepPlans

A request's routing key is one engine key, or several joined by "+" (`config.STACK_SEP`): a stack, each
adapter in its own routing lane, one kernel call per lane in use (its own softmax), the terms summed in lane
order. A scaled adapter is its own engine key (`config.scaled_key`), its gates times the scale when loaded.

Graph-safe mode (`WorkerState.graph_safe`: the V2 runner with the Triton kernel, where vLLM captures CUDA
graphs): the token -> slot routing of each forward is written, before the forward and outside any graph, into
one persistent buffer (`token_slots`, fixed address, one row per lane), and every forward launches the kernel
once per lane on every adapted layer with a geometry fixed by the token count and the table's maximum N,
whether or not a token has an adapter (slot 0 adds nothing). No Python decision depends on the routing, so a
captured launch is right at replay for any routing and any table contents. Everywhere else vLLM captures no
graph around the op (CPU, --enforce-eager, or the op is a splitting op: `facade.EngineOptions.cuda_graphs`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from server.engine import kernels
from server.engine import routing as _routing
from server.engine.config import STACK_SEP
from server.engine.routing import Routing, StepPlan, step_plan, step_plans
from server.engine.table import AdapterTable

if TYPE_CHECKING:
    from aligner_core.adapter_format import Adapter

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    table: AdapterTable
    routing: Routing
    scale: float  # 1 / sqrt(D), the attention's own scale
    kernel: str = "torch"  # "torch", "triton" or "cpu": chosen once at start (`kernels.choose`)
    op_seconds: float = 0.0  # host time spent computing the term (on CUDA: launching it), for benchmarks
    _cached: tuple[object, int, int, list[StepPlan]] | None = None  # (forward context, T, routing version, plans)
    _impl: kernels.Kernel | None = None
    # graph-safe mode (`enable_graphs`): the persistent routing and each captured size's steps
    token_slots: torch.Tensor | None = None  # [lanes, most tokens a forward has] long on the model's device
    _graph_steps: dict[int, list[StepPlan]] = field(default_factory=dict)

    @property
    def graph_safe(self) -> bool:
        return self.token_slots is not None

    @property
    def kernel_mode(self) -> str:
        """The kernel's name, "-graph" added in graph-safe mode (the stats and the start-up log say it)."""
        return self.kernel + ("-graph" if self.graph_safe else "")

    def impl(self) -> kernels.Kernel:
        """The kernel, bound to the table on first use."""
        if self._impl is None:
            self._impl = kernels.make(self.kernel, self.table, self.scale)
        return self._impl

    def enable_graphs(self, max_tokens_per_forward: int) -> None:
        """Graph-safe mode (see the module doc): the routing of each forward goes into one persistent buffer,
        and every forward launches the kernel. Only a graph-safe kernel can run so."""
        if not self.impl().graph_safe:
            raise RuntimeError(f"the {self.kernel} kernel is not graph-safe; it cannot run inside CUDA graphs")
        lanes = self.routing.lanes
        self.token_slots = torch.zeros(lanes, max_tokens_per_forward, dtype=torch.long, device=self.table.k.device)

    # ---- rows: the routers' verbs ----
    def assign(self, row: int, key: str | None) -> int:
        """Route batch row `row` (V2: the request's persistent index) to `key`'s adapter, or to each adapter of a
        stack (`stack_key`), lane by lane; returns lane 0's routing id. A cold adapter is promoted into a hot
        slot no row uses, where one can be freed. A key the table does not hold (any of a stack's), or a stack
        deeper than the lanes, gets 0 on every lane: the row runs as the base model, and is counted
        (`counters`): never a part of its stack."""
        parts = key.split(STACK_SEP) if key else []
        slots: list[int] = []
        if len(parts) <= self.routing.lanes:
            in_use = self.routing.slots_in_use()
            for part in parts:
                slot = self.table.lookup(part, in_use | set(slots))  # a stack's own slots stay hot
                if slot == 0:
                    break
                slots.append(slot)
        if len(slots) < len(parts):
            self.routing.set_unknown(row)
            return 0
        self.routing.set_row(row, slots or 0)
        return slots[0] if slots else 0

    def release(self, row: int) -> None:
        self.routing.set_row(row, 0)

    def move(self, src: int, dst: int, *, swap: bool) -> None:
        self.routing.move(src, dst, swap=swap)

    def set_batch(self, rows: np.ndarray, query_start_loc: np.ndarray) -> None:
        """V2 runner, before each forward: batch entry i is row `rows[i]`, its tokens query_start_loc[i:i+2]."""
        self.routing.set_batch(rows, query_start_loc)
        self._fill_token_slots()

    def set_tokens(self, tok_slot: np.ndarray | None) -> None:
        """Token -> routing id for the coming forward, as is (a V2-style layout made by hand)."""
        self.routing.set_tokens(tok_slot)
        self._fill_token_slots()

    def _fill_token_slots(self) -> None:
        """Graph-safe mode: write the coming forward's token slots (cold adapters staged), lane by lane, into
        the persistent buffer, zeros past them; outside any graph, before the forward."""
        buf = self.token_slots
        if buf is None:
            return
        tokens = self.routing.tokens(None)
        if tokens is None or not tokens.any():
            buf.zero_()
            return
        if tokens.shape[1] > buf.shape[1]:
            raise RuntimeError(
                f"a forward of {tokens.shape[1]} tokens exceeds the Aligner routing buffer ({buf.shape[1]})"
            )
        slots = self._stage(tokens) if self._stage else tokens  # [lanes used, T]
        buf.zero_()
        buf[: slots.shape[0], : slots.shape[1]].copy_(torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)))

    def plan(self, num_tokens: int) -> list[StepPlan]:
        """The op's plans for the forward now running, one per lane in use (none: no token is adapted). Made
        at the forward's first attention layer and reused by the others (the op runs once per layer)."""
        ctx = _routing._current_forward_context()
        c = self._cached
        if c is not None and ctx is not None and c[0] is ctx and c[1] == num_tokens and c[2] == self.routing.version:
            return c[3]
        tokens = self.routing.tokens(ctx)
        t = self.table
        plans = step_plans(tokens, num_tokens, t.ntok, t.k.device, self._stage) if tokens is not None else []
        # Holding the context object keeps its id from being reused by a later forward.
        self._cached = (ctx, num_tokens, self.routing.version, plans)
        return plans

    def plan_tokens(self, tokens: np.ndarray, num_tokens: int) -> StepPlan | None:
        """The plan for a given token -> routing id layout of one lane (tests, benchmarks), cold adapters staged."""
        t = self.table
        return step_plan(tokens, num_tokens, t.ntok, t.k.device, self._stage)

    @property
    def _stage(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The table's cold tier (routing ids -> slots, staging the cold adapters), None without one."""
        return self.table.stage if self.table.shape.cold_slots else None

    # ---- residency: the worker extension's verbs ----
    def load(self, key: str, adapter: Adapter, scale: float = 1.0) -> int:
        """Make `key` resident (idempotent), its gates times `scale`; returns its routing id. Raises TableFull
        or ValueError."""
        return self.table.put(key, adapter, scale=scale)

    def load_many(self, items: Iterable[tuple[str, Adapter]]) -> int:
        """`load` each; returns how many adapters are resident afterwards."""
        for key, adapter in items:
            self.load(key, adapter)
        return len(self.table.raw)

    def evict(self, key: str, *, force: bool = False) -> bool:
        """Drop `key`; without `force`, refused (False) while a batch row still routes to it."""
        return self.table.evict(key, in_use=set() if force else self.routing.slots_in_use())

    def counters(self) -> dict[str, int]:
        """The counters /metrics pulls on each scrape (cheap: no key list)."""
        return {"unknown_key_events": self.routing.unknown_key_events}

    def stats(self) -> dict[str, Any]:
        t = self.table
        return {
            **t.stats(),
            "kernel": self.kernel_mode,
            "kv_dtype": str(t.k.dtype).removeprefix("torch."),
            "op_seconds": self.op_seconds,
            **self.counters(),
            "keys": t.keys(),
        }

    # ---- the op's ----
    def graph_steps(self, num_tokens: int) -> list[StepPlan]:
        """Graph-safe mode: the steps of a forward of `num_tokens` tokens, one per lane, the same for any
        routing (each lane's first tokens of the persistent buffer, every key of the table)."""
        steps = self._graph_steps.get(num_tokens)
        if steps is None:
            buf = self.token_slots
            assert buf is not None
            if num_tokens > buf.shape[1]:
                raise RuntimeError(
                    f"a forward of {num_tokens} tokens exceeds the Aligner routing buffer ({buf.shape[1]})"
                )
            N = self.table.shape.max_tokens
            steps = [StepPlan(None, N, buf.device, buf[lane, :num_tokens]) for lane in range(len(buf))]
            self._graph_steps[num_tokens] = steps
        return steps


_state: WorkerState | None = None


def set_worker_state(state: WorkerState | None) -> None:
    global _state
    _state = state


def worker_state() -> WorkerState | None:
    return _state


def apply_term(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    """out: [T, H*D] attention output before o_proj, updated in place; q: [T, H*D] post-RoPE queries.

    Eager forwards call this directly (the custom-op dispatcher costs about 20 µs a call on CPU, 0.6 ms
    per 30-layer forward); compiled graphs reach it through `apply_`."""
    st = _state
    if st is None or layer not in st.table.adapted_layers:
        return
    t0 = time.perf_counter()
    # graph-safe: fixed launches whatever the routing (see the module doc); else the forward's plans, if any
    steps = st.graph_steps(q.shape[0]) if st.token_slots is not None else st.plan(q.shape[0])
    if not steps:
        return
    impl = st.impl()
    for step in steps:  # one per lane: a stack's terms, each with its own softmax, added in lane order
        impl.add(out, q, layer, step)
    st.op_seconds += time.perf_counter() - t0


@torch.library.custom_op("aligner::apply_", mutates_args=("out",))
def apply_(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    """The op as torch.compile sees it: opaque, so per-step routing is never baked into a graph."""
    apply_term(out, q, layer)


@apply_.register_fake
def _(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    return None
