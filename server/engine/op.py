"""The `aligner::apply_` custom op: adds the Aligner term to an attention output, in place.

It is opaque to torch.compile (a `torch.library.custom_op` with a fake impl), so per-step routing is read
at run time and never baked into a graph. The worker's table and routing live in one per-process
`WorkerState`, set when the model is built. The routers and the worker extension call its verbs only; the
routing reads just the two views of the table it is built with (N per slot, the cold tier's staging), and
the table never sees the routing:

    V1 logits processor, V2 model state -- assign / release / move / set_batch --> WorkerState
        assign: AdapterTable.lookup(key, Routing.slots_in_use()) -> slot -> Routing row (or counted unknown)
    worker extension -- load / load_many / evict / counters / stats --> WorkerState -> AdapterTable
    apply_term, once per layer -- plan --> WorkerState -> Routing.plan (once per forward) -> StepPlan

Graph-safe mode (`WorkerState.graph_safe`: the V2 runner with the Triton kernel, where vLLM captures CUDA
graphs): the token -> slot routing of each forward is written, before the forward and outside any graph, into
one persistent buffer (`token_slots`, fixed address), and every forward launches the kernel on every adapted
layer with a geometry fixed by the token count and the table's maximum N, whether or not a token has an
adapter (slot 0 adds nothing). No Python decision depends on the routing, so a captured launch is right at
replay for any routing and any table contents. Everywhere else vLLM captures no graph around the op (CPU,
--enforce-eager, or the op is a splitting op: `facade.EngineOptions.cuda_graphs`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from server.engine import cpu_kernel, triton_kernel
from server.engine import routing as _routing
from server.engine.aligner_math import delta_chunked, delta_general, delta_grouped, delta_single_token
from server.engine.routing import Routing, StepPlan, step_plan
from server.engine.table import AdapterTable

if TYPE_CHECKING:
    from aligner_core.adapter_format import Adapter

log = logging.getLogger(__name__)

# auto: a kernel where one runs (Triton on CUDA, the C kernel on CPU), else the torch fast paths picked per
# step; torch: always the torch fast paths; gather: always the general torch path; triton, cpu: always that
# kernel (refused at start where it cannot run)
PATHS = ("auto", "torch", "gather", "triton", "cpu")
GROUPED_MIN_RUN = 64  # a run this long (a prefill chunk) is cheaper grouped than gathered
CHUNKED_MIN_N = 8  # from this many prefix tokens, chunks of tokens per adapter beat per-token gathers (CPU)
CHUNK_ROWS = 4
FAST = ("auto", "torch")  # paths that pick the torch fast paths per step


@dataclass
class WorkerState:
    table: AdapterTable
    routing: Routing
    scale: float  # 1 / sqrt(D), the attention's own scale
    path: str = "auto"
    use_triton: bool = False  # resolved once at start from `path` and the device (`resolve_triton`)
    use_cpu_kernel: bool = False  # likewise (`resolve_cpu_kernel`)
    op_seconds: float = 0.0  # host time spent computing the term (on CUDA: launching it), for benchmarks
    _cpu: cpu_kernel.BoundKernel | None = None
    _cpu_plan: StepPlan | None = None  # the forward the kernel was begun for
    _cached: tuple[object, int, int, StepPlan | None] | None = None  # (forward context, T, routing version, plan)
    # graph-safe mode: the launch (the Triton kernel, or its torch twin in tests) and the persistent routing
    graph_launch: Callable[..., torch.Tensor] | None = None
    token_slots: torch.Tensor | None = None  # [max tokens a forward has] long on the model's device; 0 = none

    @property
    def graph_safe(self) -> bool:
        return self.graph_launch is not None

    # ---- rows: the routers' verbs ----
    def assign(self, row: int, key: str | None) -> int:
        """Route batch row `row` (V2: the request's persistent index) to `key`'s adapter; returns its routing
        id. A cold adapter is promoted into a hot slot no row uses, where one can be freed. A key the table
        does not hold gets 0: the row runs as the base model, and is counted (`counters`)."""
        slot = self.table.lookup(key, self.routing.slots_in_use()) if key else 0
        if key and slot == 0:
            self.routing.set_unknown(row)
        else:
            self.routing.set_row(row, slot)
        return slot

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
        """Graph-safe mode: write the coming forward's token slots (cold adapters staged) into the persistent
        buffer, zeros past them; outside any graph, before the forward."""
        buf = self.token_slots
        if buf is None:
            return
        tokens = self.routing.tokens(None)
        if tokens is None or not tokens.any():
            buf.zero_()
            return
        if len(tokens) > len(buf):
            raise RuntimeError(f"a forward of {len(tokens)} tokens exceeds the Aligner routing buffer ({len(buf)})")
        t = self.table
        slots = t.stage(tokens) if t.shape.cold_slots else tokens
        buf[len(slots) :].zero_()
        buf[: len(slots)].copy_(torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)), non_blocking=False)

    def plan(self, num_tokens: int) -> StepPlan | None:
        """The op's plan for the forward now running, or None: no token is adapted. Made at the forward's
        first attention layer and reused by the others (the op runs once per layer)."""
        ctx = _routing._current_forward_context()
        c = self._cached
        if c is not None and ctx is not None and c[0] is ctx and c[1] == num_tokens and c[2] == self.routing.version:
            return c[3]
        tokens = self.routing.tokens(ctx)
        plan = self.plan_tokens(tokens, num_tokens) if tokens is not None else None
        # Holding the context object keeps its id from being reused by a later forward.
        self._cached = (ctx, num_tokens, self.routing.version, plan)
        return plan

    def plan_tokens(self, tokens: np.ndarray, num_tokens: int) -> StepPlan | None:
        """The plan for a given token -> routing id layout (tests, benchmarks), cold adapters staged."""
        t = self.table
        return step_plan(tokens, num_tokens, t.ntok, t.k.device, t.stage if t.shape.cold_slots else None)

    # ---- residency: the worker extension's verbs ----
    def load(self, key: str, adapter: Adapter) -> int:
        """Make `key` resident (idempotent); returns its routing id. Raises TableFull or ValueError."""
        return self.table.put(key, adapter)

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
            "kernel": self.kernel(),
            "kv_dtype": str(t.k.dtype).removeprefix("torch."),
            "op_seconds": self.op_seconds,
            **self.counters(),
            "keys": t.keys(),
        }

    # ---- the op's ----
    def cpu_kernel_for(self, plan: StepPlan, out: torch.Tensor, q: torch.Tensor) -> cpu_kernel.BoundKernel:
        """The C kernel bound to the table, begun for this forward: the layout and token slots are checked at
        a forward's first layer only (its attention layers all give out and q the same layout)."""
        if self._cpu is None:
            t = self.table
            self._cpu = cpu_kernel.BoundKernel(t.k, t.v, t.gate, t.ntok, self.scale)
        if plan is not self._cpu_plan:
            self._cpu.begin(out, q, plan.tok_slot_host, plan.max_tokens)
            self._cpu_plan = plan  # held, so its token slots (which the kernel reads) stay alive
        return self._cpu

    def kernel(self) -> str:
        """What computes the term: "triton", "cpu" (the C kernel), "torch" (the torch fast paths) or "gather";
        "triton-graph" in graph-safe mode ("torch-graph": its torch twin, in tests)."""
        if self.graph_launch is not None:
            return "triton-graph" if self.use_triton else "torch-graph"
        return (
            "triton"
            if self.use_triton
            else "cpu"
            if self.use_cpu_kernel
            else "torch"
            if self.path in FAST
            else self.path
        )


def resolve_triton(path: str, device: torch.device) -> bool:
    """Whether the op uses the Triton kernel: always for path "triton" (which must be able to run), on CUDA
    devices with triton installed for "auto", never for "gather"."""
    from server.engine.triton_kernel import triton_available

    _check_path(path)
    can = device.type == "cuda" and triton_available()
    if path == "triton" and not can:
        raise RuntimeError("the Aligner path 'triton' needs a CUDA device and the triton package")
    return path == "triton" or (path == "auto" and can)


def resolve_cpu_kernel(path: str, device: torch.device, dtype: torch.dtype, head_dim: int, max_tokens: int) -> bool:
    """Whether the op uses the C kernel: always for path "cpu" (which must be able to run), for "auto" on CPU
    when it builds and takes the model (else the torch paths, with a warning saying why), never otherwise."""
    _check_path(path)
    if path not in ("auto", "cpu"):
        return False
    why = (
        "the CPU kernel runs on CPU devices only"
        if device.type != "cpu"
        else cpu_kernel.supports(dtype, head_dim, max_tokens)
    )
    if why is None:
        try:
            cpu_kernel.load()
        except cpu_kernel.KernelUnavailable as e:
            why = str(e)
    if why is None:
        return True
    if path == "cpu":
        raise RuntimeError(f"the Aligner path 'cpu' cannot run: {why}")
    if device.type == "cpu":
        log.warning("Aligner: using the torch paths on CPU (slower): %s", why)
    return False


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"unknown Aligner path {path!r}; one of {PATHS}")


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
    t = st.table
    if st.graph_launch is not None:  # graph-safe: one fixed launch, whatever the routing (see the module doc)
        T = q.shape[0]
        slots = st.token_slots[:T]  # type: ignore[index]  # set with graph_launch
        st.graph_launch(out, q, slots, t.k[layer], t.v[layer], t.mask, t.gate[layer], st.scale, t.shape.max_tokens)
        st.op_seconds += time.perf_counter() - t0
        return
    plan = st.plan(q.shape[0])
    if plan is None:
        return
    if st.use_triton:
        triton_kernel.aligner_delta_triton(
            out, q, plan.tok_slot, t.k[layer], t.v[layer], t.mask, t.gate[layer], st.scale, plan.max_tokens
        )
    elif st.use_cpu_kernel:
        st.cpu_kernel_for(plan, out, q).layer(out, q, layer)
    else:
        out.add_(aligner_delta(st, plan, q, layer).to(out.dtype))
    st.op_seconds += time.perf_counter() - t0


@torch.library.custom_op("aligner::apply_", mutates_args=("out",))
def apply_(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    """The op as torch.compile sees it: opaque, so per-step routing is never baked into a graph."""
    apply_term(out, q, layer)


@apply_.register_fake
def _(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    return None


def aligner_delta(st: WorkerState, plan: StepPlan, q: torch.Tensor, layer: int) -> torch.Tensor:
    """The term for every token of the step: [T, H*D] float32. Tokens without an adapter get exact zeros."""
    t = st.table
    T = q.shape[0]
    KVH, D = t.shape.num_kv_heads, t.shape.head_dim
    n = plan.max_tokens
    if st.path in FAST and n == 1:
        return delta_single_token(t.bias[layer][plan.tok_slot])
    qg = q.view(T, KVH, -1, D).float()  # [T, KVH, G, D]
    if st.path in FAST and plan.longest_run >= GROUPED_MIN_RUN:
        k, v = t.k[layer, :, :, :n], t.v[layer, :, :, :n]  # [S, KVH, n, D]
        delta = delta_grouped(qg, plan.tok_slot, k, v, t.mask[:, :n], t.gate[layer], st.scale, plan.runs())
        return delta.reshape(T, -1)
    if st.path in FAST and n >= CHUNKED_MIN_N and _chunks_pay(plan):
        rows, chunk_slot, inverse = plan.chunks(CHUNK_ROWS)
        delta = delta_chunked(qg, rows, chunk_slot, inverse, t.k[layer], t.v[layer], t.mask, t.gate[layer], st.scale, n)
        return delta.reshape(T, -1)
    if st.path in FAST and plan.adapted is not None:  # few adapted tokens: compute only those
        idx = plan.adapted
        slots = plan.tok_slot[idx]
        part = delta_general(
            qg[idx],
            t.k[layer, slots, :, :n],
            t.v[layer, slots, :, :n],
            t.mask[slots, :n],
            t.gate[layer, slots],
            st.scale,
        )
        return torch.zeros(T, qg.shape[1] * qg.shape[2] * D, device=q.device).index_copy_(
            0, idx, part.reshape(len(idx), -1)
        )
    slots = plan.tok_slot
    delta = delta_general(
        qg, t.k[layer, slots, :, :n], t.v[layer, slots, :, :n], t.mask[slots, :n], t.gate[layer, slots], st.scale
    )
    return delta.reshape(T, -1)


def _chunks_pay(plan: StepPlan) -> bool:
    """Chunks beat per-token gathers only when most chunk rows are real tokens: a decode step whose tokens
    each have a different adapter would be three quarters padding."""
    return 2 * plan.num_adapted >= len(plan.chunks(CHUNK_ROWS)[0])
