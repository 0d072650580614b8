"""The Aligner op on a GPU, end to end below the engine: a two-tier table on CUDA (hot slots, cold adapters
staged per forward, promotion), the op's Triton dispatch and its torch paths, all against the per-token
reference computed from the raw adapters.

Needs CUDA and triton (skips otherwise); imports no vllm: the routing's forward-context lookup is patched
out (a fresh object per forward stands in for it) and the V2-style token routing is set directly, as the V2 model state does before each forward.
Run on a lent GPU by bench/gpu/run_triton_check.sh.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import linear_layers

from aligner_core.adapter_format import Adapter
from aligner_core.model_spec import ModelSpec
from server.engine import op, routing
from server.engine.kernels.triton import triton_available
from server.engine.op import WorkerState
from server.engine.table import AdapterTable, LayerHandle, TableShape, reference_term

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()),
    reason="no CUDA device (or no triton): the op's GPU tests run only where a GPU is present",
)

# SmolLM2-135M's attention shape, fewer layers
PREFILL_RUN = 64  # a prefill chunk of one adapter
SPEC = ModelSpec(
    name="gpu-op", hidden_size=576, num_layers=6, num_heads=9, num_kv_heads=3, head_dim=64, fingerprint="0" * 12
)
H, KVH, D = SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim
ADAPTERS = {
    "a": Adapter.random(SPEC, tokens=1, start_layer=2, seed=1, gate_scale=0.5),
    "b": Adapter.random(SPEC, tokens=3, start_layer=0, gate_activation="tanh", seed=2, gate_scale=0.9),
    "c": Adapter.random(SPEC, tokens=1, start_layer=0, seed=3, gate_scale=0.7),
    "d": Adapter.random(SPEC, tokens=4, start_layer=1, seed=4, gate_scale=0.5),
    "e": Adapter.random(SPEC, tokens=2, start_layer=3, gate_activation="tanh", seed=5, gate_scale=0.8),
    "f": Adapter.random(SPEC, tokens=1, start_layer=0, gate_activation="tanh", seed=6, gate_scale=0.6),
}
BF16 = dict(atol=2e-2, rtol=2e-2)  # bf16 `out` against the fp32 reference


@pytest.fixture
def layers() -> list[LayerHandle]:
    torch.manual_seed(0)
    return linear_layers(SPEC, device="cuda", dtype=torch.bfloat16)


_forward: list[object] = [None]  # stands in for vLLM's forward context: one object per forward


@pytest.fixture(autouse=True)
def no_vllm(monkeypatch):
    monkeypatch.setattr(routing, "_current_forward_context", lambda: _forward[0])
    yield
    op.set_worker_state(None)


def make_state(layers, *, use_triton: bool) -> WorkerState:
    shape = TableShape.unsharded(SPEC, max_slots=2, max_tokens=4, cold_slots=16, scratch=16)
    table = AdapterTable(shape, layers, device=torch.device("cuda"), dtype=torch.bfloat16)
    rt = routing.Routing(16)
    return WorkerState(table=table, routing=rt, scale=1 / math.sqrt(D), kernel="triton" if use_triton else "torch")


def reference(layers, layer: int, q: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """[T, H*D] fp32 from the raw adapters: P projected by the layer (in bf16, like a token), gates, softmax."""
    return reference_term(layers[layer], q, [ADAPTERS[n] if n else None for n in names], D)


def run_op(st: WorkerState, q: torch.Tensor, names: list[str | None], ids: dict[str, int]) -> list[torch.Tensor]:
    """The op, as the model calls it per layer: out (zeros, bf16) += the Aligner term."""
    op.set_worker_state(st)
    st.set_tokens(np.array([ids[n] if n else 0 for n in names]))
    _forward[0] = object()  # a new forward: the plan (and cold staging) is made once, for all layers
    outs = []
    for l in range(SPEC.num_layers):
        out = torch.zeros(len(names), H * D, device="cuda", dtype=torch.bfloat16)
        op.apply_(out, q, l)
        outs.append(out.float())
    torch.cuda.synchronize()
    return outs


BATCHES = {
    "decode mix": [None, "a", "c", "d", "e", "f", "b", None, "c", "d"],
    "all N=1": ["a", "c", None, "f", "a", "c"],
    "prefill run + decode": ["d"] * (PREFILL_RUN + 6) + ["b", None, "a"] + ["e"] * 5,
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
def test_cold_and_hot_adapters_match_the_reference_on_gpu(layers, batch, use_triton) -> None:
    names = BATCHES[batch]
    st = make_state(layers, use_triton=use_triton)
    for n in ADAPTERS:
        st.table.put(n, ADAPTERS[n])
    busy = {1, 2}  # both hot slots busy: everything but a and b stays cold and is staged per forward
    ids = {n: st.table.lookup(n, busy) for n in ADAPTERS}
    assert ids["a"] == 1 and ids["b"] == 2 and all(ids[n] >= st.table.cold_base for n in "cdef")
    torch.manual_seed(7)
    q = torch.randn(len(names), H * D, device="cuda").to(torch.bfloat16)
    got = run_op(st, q, names, ids)
    staged = st.table.staged
    assert staged == len({n for n in names if n and n in "cdef"})
    for l, g in enumerate(got):
        want = reference(layers, l, q, names)
        per_token = (g - want).abs().amax(1).tolist()
        torch.testing.assert_close(
            g,
            want,
            **BF16,
            msg=lambda m, l=l, per_token=per_token: (
                f"layer {l}: {m}\nper-token max |diff|: " + ", ".join(f"{n}:{d:.3g}" for n, d in zip(names, per_token))
            ),
        )
        for i, n in enumerate(names):
            if n is None or l < ADAPTERS[n].start_layer:
                assert torch.equal(g[i], torch.zeros_like(g[i])), f"token {i} ({n}) layer {l} must be untouched"
    assert any(r.abs().max() > 0.05 for r in got)

    # promotion on the GPU: idle hot slots take the cold adapters; the answer must not change
    st.set_tokens(None)
    promoted: dict[str, int] = {}
    for n in reversed(ADAPTERS):  # as the frontend routes a new batch: slots taken by earlier rows are in use
        promoted[n] = st.table.lookup(n, set(promoted.values()))
    assert st.table.stats()["promotions"] == 2 and sorted(promoted.values())[:2] == [1, 2]
    again = run_op(st, q, names, promoted)
    for l in range(SPEC.num_layers):
        torch.testing.assert_close(again[l], got[l], atol=1e-2, rtol=1e-2)


def test_triton_and_torch_paths_agree_on_gpu(layers) -> None:
    names = BATCHES["decode mix"] * 7
    results = []
    for use_triton in (True, False):
        st = make_state(layers, use_triton=use_triton)
        ids = {n: st.table.put(n, ADAPTERS[n]) for n in ADAPTERS}
        torch.manual_seed(9)
        q = torch.randn(len(names), H * D, device="cuda").to(torch.bfloat16)
        results.append(run_op(st, q, names, ids))
    for l in range(SPEC.num_layers):
        torch.testing.assert_close(results[0][l], results[1][l], atol=1e-2, rtol=1e-2)
