"""The `aligner::apply_` custom op: adds the Aligner term to an attention output, in place.

It is opaque to torch.compile (a `torch.library.custom_op` with a fake impl), so per-step routing is read
at run time and never baked into a graph. The worker's table and routing live in one per-process
`WorkerState`, set when the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine import triton_kernel
from server.engine.aligner_math import delta_chunked, delta_general, delta_grouped, delta_single_token
from server.engine.routing import Routing, StepPlan
from server.engine.table import AdapterTable

# auto: pick a fast path per step (the Triton kernel on CUDA when triton imports); gather: always the
# general torch path; triton: always the kernel (refused at start where it cannot run)
PATHS = ("auto", "gather", "triton")
GROUPED_MIN_RUN = 64  # a run this long (a prefill chunk) is cheaper grouped than gathered
CHUNKED_MIN_N = 8  # from this many prefix tokens, chunks of tokens per adapter beat per-token gathers (CPU)
CHUNK_ROWS = 4


@dataclass
class WorkerState:
    table: AdapterTable
    routing: Routing
    scale: float  # 1 / sqrt(D), the attention's own scale
    path: str = "auto"
    use_triton: bool = False  # resolved once at start from `path` and the device (`resolve_triton`)


def resolve_triton(path: str, device: torch.device) -> bool:
    """Whether the op uses the Triton kernel: always for path "triton" (which must be able to run), on CUDA
    devices with triton installed for "auto", never for "gather"."""
    from server.engine.triton_kernel import triton_available

    if path not in PATHS:
        raise ValueError(f"unknown Aligner path {path!r}; one of {PATHS}")
    can = device.type == "cuda" and triton_available()
    if path == "triton" and not can:
        raise RuntimeError("the Aligner path 'triton' needs a CUDA device and the triton package")
    return path == "triton" or (path == "auto" and can)


_state: WorkerState | None = None


def set_worker_state(state: WorkerState | None) -> None:
    global _state
    _state = state


def worker_state() -> WorkerState | None:
    return _state


@torch.library.custom_op("aligner::apply_", mutates_args=("out",))
def apply_(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    """out: [T, H*D] attention output before o_proj; q: [T, H*D] post-RoPE queries."""
    st = _state
    if st is None or layer not in st.table.adapted_layers:
        return
    plan = st.routing.plan(q.shape[0])
    if plan is None:
        return
    if st.use_triton:
        t = st.table
        triton_kernel.aligner_delta_triton(out, q, plan.tok_slot, t.k[layer], t.v[layer], t.mask, t.gate[layer], st.scale, plan.max_tokens)
        return
    out.add_(aligner_delta(st, plan, q, layer).to(out.dtype))


@apply_.register_fake
def _(out: torch.Tensor, q: torch.Tensor, layer: int) -> None:
    return None


def aligner_delta(st: WorkerState, plan: StepPlan, q: torch.Tensor, layer: int) -> torch.Tensor:
    """The term for every token of the step: [T, H*D] float32. Tokens without an adapter get exact zeros."""
    t = st.table
    T = q.shape[0]
    KVH, D = t.shape.num_kv_heads, t.shape.head_dim
    n = plan.max_tokens
    if st.path == "auto" and n == 1:
        return delta_single_token(t.bias[layer][plan.tok_slot])
    qg = q.view(T, KVH, -1, D).float()  # [T, KVH, G, D]
    if st.path == "auto" and plan.longest_run >= GROUPED_MIN_RUN:
        k, v = t.k[layer, :, :, :n], t.v[layer, :, :, :n]  # [S, KVH, n, D]
        delta = delta_grouped(qg, plan.tok_slot, k, v, t.mask[:, :n], t.gate[layer], st.scale, plan.runs())
        return delta.reshape(T, -1)
    if st.path == "auto" and n >= CHUNKED_MIN_N:
        rows, chunk_slot, inverse = plan.chunks(CHUNK_ROWS)
        delta = delta_chunked(qg, rows, chunk_slot, inverse, t.k[layer], t.v[layer], t.mask, t.gate[layer], st.scale, n)
        return delta.reshape(T, -1)
    if st.path == "auto" and plan.adapted is not None:  # few adapted tokens: compute only those
        idx = plan.adapted
        slots = plan.tok_slot[idx]
        part = delta_general(
            qg[idx], t.k[layer, slots, :, :n], t.v[layer, slots, :, :n], t.mask[slots, :n], t.gate[layer, slots], st.scale
        )
        return torch.zeros(T, qg.shape[1] * qg.shape[2] * D, device=q.device).index_copy_(0, idx, part.reshape(len(idx), -1))
    slots = plan.tok_slot
    delta = delta_general(qg, t.k[layer, slots, :, :n], t.v[layer, slots, :, :n], t.mask[slots, :n], t.gate[layer, slots], st.scale)
    return delta.reshape(T, -1)
