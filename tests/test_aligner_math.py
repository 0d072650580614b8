"""The Aligner term: every kernel (server/engine/kernels/) against the per-token reference, on a real slot table."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from support import linear_layers, tiny_spec

from aligner_core.adapter_format import Adapter
from server.engine import kernels
from server.engine.aligner_math import delta_general
from server.engine.kernels import cpu as cpu_kernel
from server.engine.kernels.torch import add_term
from server.engine.op import WorkerState
from server.engine.routing import Routing, StepPlan, step_plan
from server.engine.table import AdapterTable, LayerHandle, TableShape, reference_term

SPEC = tiny_spec()  # hidden 64, 4 layers, 4 heads, 2 kv heads, head_dim 16
H, KVH, D = SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim


@pytest.fixture
def layers() -> list[LayerHandle]:
    torch.manual_seed(0)
    return linear_layers(SPEC)


KERNELS = ("torch", "cpu")  # the kernels a CPU runs (triton: tests/test_triton_kernel.py, on a GPU)
PREFILL_RUN = 64  # a prefill chunk of one adapter


def make_state(layers: list[LayerHandle], kernel: str, max_slots: int = 4, cold_slots: int = 0) -> WorkerState:
    shape = TableShape.unsharded(
        SPEC, max_slots=max_slots, max_tokens=4, cold_slots=cold_slots, scratch=8 if cold_slots else 0
    )
    table = AdapterTable(shape, layers, device=torch.device("cpu"), dtype=torch.float32)
    routing = Routing(8)
    return WorkerState(table=table, routing=routing, scale=1 / math.sqrt(D), kernel=kernel)


def term(st: WorkerState, plan: StepPlan | None, q: torch.Tensor, layer: int) -> torch.Tensor:
    """[T, H*D] what the state's kernel adds for `layer` (zeros when the plan is None: no adapted token)."""
    out = torch.zeros(q.shape[0], H * D)
    if plan is not None:
        st.impl().add(out, q.contiguous(), layer, plan)
    return out


ADAPTERS = {
    "a": Adapter.random(SPEC, tokens=1, start_layer=1, seed=1, gate_scale=0.5),
    "b": Adapter.random(SPEC, tokens=3, start_layer=0, gate_activation="tanh", seed=2, gate_scale=0.9),
    "c": Adapter.random(SPEC, tokens=1, start_layer=0, gate_activation="tanh", seed=3, gate_scale=0.7),
    "d": Adapter.random(SPEC, tokens=4, start_layer=2, seed=4, gate_scale=0.5),
}


def reference(layers: list[LayerHandle], layer: int, q: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """[T, H*D] from the raw adapter math, independent of the table."""
    return reference_term(layers[layer], q, [ADAPTERS[n] if n else None for n in names], D)


def run_paths(layers, names: list[str | None]) -> dict[str, list[torch.Tensor]]:
    torch.manual_seed(5)
    q = torch.randn(len(names), H * D)
    results: dict[str, list[torch.Tensor]] = {
        "reference": [reference(layers, l, q, names) for l in range(SPEC.num_layers)]
    }
    for kernel in KERNELS:
        st = make_state(layers, kernel)
        slots = {n: st.table.put(n, ADAPTERS[n]) for n in sorted({n for n in names if n})}
        plan = st.plan_tokens(np.array([slots[n] if n else 0 for n in names]), len(names))
        results[kernel] = [term(st, plan, q, l) for l in range(SPEC.num_layers)]
    return results


def assert_paths_match(results: dict[str, list[torch.Tensor]]) -> None:
    for kernel in KERNELS:
        for l, (got, want) in enumerate(zip(results[kernel], results["reference"])):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"{kernel} kernel, layer {l}")
    assert any(r.abs().max() > 1e-3 for r in results["reference"])  # the term is not trivially zero


def test_mixed_batch(layers) -> None:
    assert_paths_match(run_paths(layers, [None, "a", "a", "b", "c", None, "d", "d", "b", None]))


def test_single_token_adapters_only(layers) -> None:
    names = [None, "a", "a", "c", None, "c"]
    assert_paths_match(run_paths(layers, names))


def test_few_adapted_tokens(layers) -> None:
    assert_paths_match(run_paths(layers, [None] * 9 + ["b", "d"] + [None] * 5))


def test_long_prefill_runs(layers) -> None:
    names = [None] * 5 + ["b"] * PREFILL_RUN + ["d"] * 3 + [None] * 2 + ["a"] * 10
    assert_paths_match(run_paths(layers, names))


def test_no_adapter_tokens_get_exact_zero(layers) -> None:
    results = run_paths(layers, [None, "b", None])
    for kernel in KERNELS:
        for r in results[kernel]:
            assert torch.equal(r[0], torch.zeros_like(r[0])) and torch.equal(r[2], torch.zeros_like(r[2]))


def test_evicted_slot_is_clean_when_reused(layers) -> None:
    st = make_state(layers, "torch", max_slots=1)
    slot = st.table.put("b", ADAPTERS["b"])
    assert st.table.evict("b", in_use={slot}) is False  # a batch row still uses it
    assert st.table.evict("b", in_use=set()) is True
    assert st.table.put("a", ADAPTERS["a"]) == slot
    assert st.table.ntok[slot] == 1 and torch.isinf(st.table.mask[slot, 1:]).all()
    assert torch.equal(st.table.gate[0, slot], torch.zeros_like(st.table.gate[0, slot]))  # a starts at layer 1


def test_table_full_and_idempotent_put(layers) -> None:
    from server.engine.table import TableFull

    st = make_state(layers, "torch", max_slots=2)
    assert st.table.put("a", ADAPTERS["a"]) == st.table.put("a", ADAPTERS["a"])
    st.table.put("b", ADAPTERS["b"])
    with pytest.raises(TableFull):
        st.table.put("c", ADAPTERS["c"])
    assert st.table.stats()["resident"] == 2


def test_routing_rows_moves_and_swaps() -> None:
    r = Routing(2)
    r.set_row(0, 1)
    r.set_row(3, 2)  # grows
    r.move(3, 1, swap=False)
    assert list(r.row_slot[:4]) == [1, 2, 0, 0]
    r.move(0, 1, swap=True)
    assert list(r.row_slot[:2]) == [2, 1]
    assert r.slots_in_use() == {1, 2}
    plan = step_plan(np.array([2, 2, 0, 1]), 6, np.array([0, 1, 4]), torch.device("cpu"))
    assert plan.max_tokens == 4 and plan.tok_slot.tolist() == [2, 2, 0, 1, 0, 0]


# ---- two-tier table: cold adapters (raw P and gates) projected on the fly ----


def cold_paths(
    layers, names: list[str | None], *, max_slots: int, in_use_all: bool = True
) -> dict[str, list[torch.Tensor]]:
    """Like `run_paths`, on a table with `max_slots` hot slots and a cold tier holding the rest."""
    torch.manual_seed(5)
    q = torch.randn(len(names), H * D)
    results: dict[str, list[torch.Tensor]] = {
        "reference": [reference(layers, l, q, names) for l in range(SPEC.num_layers)]
    }
    for kernel in KERNELS:
        st = make_state(layers, kernel, max_slots=max_slots, cold_slots=8)
        for n in sorted({n for n in names if n}):
            st.table.put(n, ADAPTERS[n])
        pinned = set(range(1, max_slots + 1)) if in_use_all else set()  # no promotion when every hot slot is busy
        ids = {n: st.table.lookup(n, pinned) for n in sorted({n for n in names if n})}
        plan = st.plan_tokens(np.array([ids[n] if n else 0 for n in names]), len(names))
        results[kernel] = [term(st, plan, q, l) for l in range(SPEC.num_layers)]
        results[f"{kernel}-ids"] = ids
    return results


def test_cold_adapters_match_the_reference(layers) -> None:
    names = ["a", "b", None, "c", "d", "b", "a"]
    results = cold_paths(layers, names, max_slots=1)
    ids = results.pop("torch-ids")
    results.pop("cpu-ids")
    assert ids["a"] == 1 and all(ids[n] > 1 + 8 for n in "bcd")  # a hot; b, c, d cold (past the scratch slots)
    assert_paths_match(results)


def test_cold_single_token_adapters(layers) -> None:
    results = cold_paths(layers, ["c", "a", "c", None], max_slots=1)
    results.pop("torch-ids"), results.pop("cpu-ids")
    assert_paths_match(results)


def test_cold_prefill_run_matches_the_reference(layers) -> None:
    names = ["d"] * (PREFILL_RUN + 3) + ["b", None]
    results = cold_paths(layers, names, max_slots=1)
    results.pop("torch-ids"), results.pop("cpu-ids")
    assert_paths_match(results)


def test_promotion_demotes_the_least_recently_used_idle_hot_adapter(layers) -> None:
    st = make_state(layers, "torch", max_slots=1, cold_slots=4)
    assert st.table.put("a", ADAPTERS["a"]) == 1
    cold_b = st.table.put("b", ADAPTERS["b"])
    assert cold_b == st.table.cold_base + 1
    assert st.table.lookup("b", {1}) == cold_b  # slot 1 busy: b stays cold
    assert st.table.lookup("b", set()) == 1  # slot 1 idle: a demoted, b promoted
    assert st.table.lookup("a", {1}) == st.table.cold_base + 0  # a is still resident, now cold
    assert st.table.stats()["promotions"] == 1 and st.table.stats()["resident"] == 2
    # after all that shuffling the hot slot holds exactly b's projections
    names = ["b", "a", "b"]
    torch.manual_seed(5)
    q = torch.randn(3, H * D)
    plan = st.plan_tokens(np.array([1, st.table.cold_base, 1]), 3)
    for l in range(SPEC.num_layers):
        torch.testing.assert_close(term(st, plan, q, l), reference(layers, l, q, names), atol=2e-5, rtol=1e-4)


def test_cold_evict_respects_rows_and_capacity(layers) -> None:
    from server.engine.table import TableFull

    st = make_state(layers, "torch", max_slots=1, cold_slots=2)
    st.table.put("a", ADAPTERS["a"])
    cold_b = st.table.put("b", ADAPTERS["b"])
    st.table.put("c", ADAPTERS["c"])
    with pytest.raises(TableFull):
        st.table.put("d", ADAPTERS["d"])
    assert st.table.evict("b", in_use={cold_b}) is False  # a row still routes to the cold id
    assert st.table.evict("b", in_use=set()) is True and st.table.lookup("b", {1}) == 0
    assert st.table.put("d", ADAPTERS["d"]) >= st.table.cold_base  # the raw index is reused
    names = ["d", "a", "c"]
    torch.manual_seed(5)
    q = torch.randn(3, H * D)
    ids = [st.table.lookup(n, {1}) for n in names]
    plan = st.plan_tokens(np.array(ids), 3)
    for l in range(SPEC.num_layers):
        torch.testing.assert_close(term(st, plan, q, l), reference(layers, l, q, names), atol=2e-5, rtol=1e-4)


def test_raw_store_memory_per_adapter() -> None:
    """SmolLM2's shape: one N = 1 adapter costs its own parameters (f32) plus the index, nothing per layer."""
    from server.engine.raw_store import CHUNK, RawStore

    raw = RawStore(3 * CHUNK, (30, 9), device=torch.device("cpu"), dtype=torch.float32)
    for i in range(2 * CHUNK):
        raw.add(f"k{i}", torch.zeros(1, 576), torch.zeros(30, 9))
    per_adapter = raw.nbytes() / len(raw)
    assert 576 * 4 + 30 * 9 * 4 <= per_adapter < 576 * 4 + 30 * 9 * 4 + 64, per_adapter


def test_raw_store_first_adapter_of_a_size_does_not_touch_its_whole_chunk() -> None:
    """A new token count N opens a pool chunk for 4,096 adapters (N = 16 at SmolLM2's width: 151 MB). Zeroing
    it faulted in every page inside that first upload (~0.4 s); only the rows written may be touched, and
    what is read back is exactly what was added."""
    import psutil

    from server.engine.raw_store import CHUNK, RawStore

    proc = psutil.Process()
    raw = RawStore(CHUNK, (30, 9), device=torch.device("cpu"), dtype=torch.float32)
    chunk_bytes = CHUNK * 16 * 576 * 4
    before = proc.memory_info().rss
    prefix, gates = torch.randn(16, 576), torch.randn(30, 9)
    c = raw.add("big", prefix, gates)
    grown = proc.memory_info().rss - before
    assert grown < chunk_bytes / 8, (
        f"RSS grew {grown / 2**20:.0f} MiB for one adapter (chunk {chunk_bytes / 2**20:.0f} MiB)"
    )
    ((positions, got_p, got_g),) = raw.fetch([c]).values()
    assert positions == [0] and torch.equal(got_p[0], prefix) and torch.equal(got_g[0], gates)


def test_op_dispatches_to_the_triton_kernel_with_the_right_tensors(layers, monkeypatch) -> None:
    """The kernel itself is tested on GPU (tests/test_triton_kernel.py); here the torch kernel, which has its
    signature, stands in to check what the op hands it: the layer's table slices, the step's slots and
    longest prefix, in-place add."""
    from server.engine import op
    from server.engine.kernels import triton

    calls = []

    def twin(out, q, tok_slot, k_layer, v_layer, mask, gate_layer, scale, n_max_used):
        calls.append(n_max_used)
        return add_term(out, q, tok_slot, k_layer, v_layer, mask, gate_layer, scale, n_max_used)

    monkeypatch.setattr(triton.TritonKernel, "launch", staticmethod(twin))
    names = ["b", None, "d", "a", "b"]
    st = make_state(layers, "triton")
    slots = {n: st.table.put(n, ADAPTERS[n]) for n in "abd"}
    st.set_tokens(np.array([slots[n] if n else 0 for n in names]))
    torch.manual_seed(5)
    q = torch.randn(len(names), H * D)
    try:
        op.set_worker_state(st)
        for l in range(SPEC.num_layers):
            via_kernel = torch.zeros(len(names), H * D)
            op.apply_(via_kernel, q, l)
            torch.testing.assert_close(via_kernel, reference(layers, l, q, names), atol=2e-5, rtol=1e-4)
    finally:
        op.set_worker_state(None)
    assert calls == [4] * SPEC.num_layers  # every layer went through the kernel, with d's N = 4


def test_triton_path_is_refused_where_it_cannot_run() -> None:
    cpu = torch.device("cpu")
    assert kernels.choose("auto", cpu, torch.float32, 64, 16) == "cpu"
    assert kernels.choose("torch", cpu, torch.float32, 64, 16) == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        kernels.choose("triton", cpu, torch.float32, 64, 16)
    with pytest.raises(ValueError, match="unknown Aligner kernel path"):
        kernels.choose("gather", cpu, torch.float32, 64, 16)  # the old general path is the torch kernel now


# ---- the fused CPU kernel (server/engine/kernels/cpu_kernel.c) ----


def kernel_state(layers, names: list[str | None]) -> tuple[WorkerState, np.ndarray]:
    st = make_state(layers, "cpu")
    slots = {n: st.table.put(n, ADAPTERS[n]) for n in sorted({n for n in names if n})}
    return st, np.array([slots[n] if n else 0 for n in names])


@pytest.mark.parametrize(
    "names",
    [
        [None, "a", "a", "b", "c", None, "d", "d", "b", None],  # mixed N
        [None, "a", "a", "c", None, "c"],  # N = 1 only
        [None] * 5 + ["b"] * PREFILL_RUN + ["d"] * 3 + [None] * 2 + ["a"] * 10,  # prefill runs
        [None, None],  # no adapter
    ],
    ids=["mixed", "single-token", "prefill", "none"],
)
def test_cpu_kernel_through_the_op_matches_the_reference(layers, names) -> None:
    from server.engine import op

    st, tokens = kernel_state(layers, names)
    torch.manual_seed(5)
    q = torch.randn(len(names), (H + 2 * KVH) * D)[:, : H * D]  # a view into fused qkv, as in vLLM
    base = torch.randn(len(names), H * D)  # the attention output the term is added to
    op.set_worker_state(st)
    st.set_tokens(tokens)
    try:
        for l in range(SPEC.num_layers):
            out = base.clone()
            op.apply_(out, q, l)
            want = reference(layers, l, q, names)
            torch.testing.assert_close(out - base, want, atol=2e-5, rtol=1e-4, msg=f"layer {l}")
            for t, name in enumerate(names):
                if name is None or l < ADAPTERS[name].start_layer:
                    assert torch.equal(out[t], base[t])  # untouched, bit for bit
    finally:
        op.set_worker_state(None)
    assert st.kernel == "cpu"
    assert (st.op_seconds > 0) == any(names)  # timed only when some token has an adapter


def test_cpu_kernel_is_checked_once_per_forward_and_again_for_the_next(layers, monkeypatch) -> None:
    """Within a forward (one vLLM forward context) the kernel checks the layout and slots at the first layer
    only; the next forward, with other tokens and another T, is checked afresh and computed with its own."""
    from server.engine import op, routing

    forwards = [
        [None, "a", "b", "b", "d", None, "c"],
        ["d", "d", "d", None, "a"] * 5,  # another T and other slots
        [None, "c", "a"],
    ]
    st, _ = kernel_state(layers, sorted({n for f in forwards for n in f if n}))
    slot = {n: st.table.lookup(n) for n in "abcd"} | {None: 0}
    begun = []
    real_begin = cpu_kernel.BoundKernel.begin
    monkeypatch.setattr(
        cpu_kernel.BoundKernel, "begin", lambda self, *a: begun.append(a[2].copy()) or real_begin(self, *a)
    )
    ctx = [None]
    monkeypatch.setattr(routing, "_current_forward_context", lambda: ctx[0])
    op.set_worker_state(st)
    try:
        for i, names in enumerate(forwards):
            ctx[0] = object()  # a new forward
            st.set_tokens(np.array([slot[n] for n in names]))
            torch.manual_seed(i)
            q = torch.randn(len(names), (H + 2 * KVH) * D)[:, : H * D]
            base = torch.randn(len(names), H * D)
            for l in range(SPEC.num_layers):
                out = base.clone()
                op.apply_term(out, q, l)
                torch.testing.assert_close(
                    out - base, reference(layers, l, q, names), atol=2e-5, rtol=1e-4, msg=f"forward {i} layer {l}"
                )
            assert len(begun) == i + 1  # one check per forward
            assert begun[-1].tolist() == [slot[n] for n in names]
    finally:
        op.set_worker_state(None)


def test_a_bfloat16_table_holds_a_bfloat16_models_projections_exactly(layers) -> None:
    """K_p/V_p are projected in the model's dtype, so for a bfloat16 model a bfloat16 table (what the C
    kernel reads, half the bytes) holds the very values of a float32 one, and the op's output is the same
    bit for bit."""
    import copy

    from server.engine import op

    bf = [dataclasses.replace(h, qkv_proj=copy.deepcopy(h.qkv_proj).bfloat16()) for h in layers]
    shape = TableShape.unsharded(SPEC, max_slots=4, max_tokens=4)
    tables = {
        kv: AdapterTable(shape, bf, device=torch.device("cpu"), dtype=torch.bfloat16, kv_dtype=kv)
        for kv in (torch.float32, torch.bfloat16)
    }
    for t in tables.values():
        for name in "abcd":
            t.put(name, ADAPTERS[name])
    t32, t16 = tables[torch.float32], tables[torch.bfloat16]
    assert t16.k.dtype == torch.bfloat16 and t16.k.nbytes * 2 == t32.k.nbytes
    for name in ("k", "v", "gate", "mask"):
        assert torch.equal(getattr(t16, name).float(), getattr(t32, name)), name
    names = [None, "a", "b", "b", "c", "d", None, "d"]
    tokens = np.array([t32.lookup(n) if n else 0 for n in names])
    q = torch.randn(len(names), (H + 2 * KVH) * D).bfloat16()[:, : H * D]
    base = torch.randn(len(names), H * D).bfloat16()
    outs = []
    for t in (t32, t16):
        st = WorkerState(table=t, routing=Routing(8), scale=1 / math.sqrt(D), kernel="cpu")
        st.set_tokens(tokens)
        op.set_worker_state(st)
        try:
            out = base.clone()
            for l in range(SPEC.num_layers):
                op.apply_term(out, q, l)
        finally:
            op.set_worker_state(None)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], base)
    with pytest.raises(ValueError, match="float32 or the model's dtype"):
        AdapterTable(shape, bf, device=torch.device("cpu"), dtype=torch.bfloat16, kv_dtype=torch.float16)


def random_table(S: int, KVH: int, G: int, N: int, D: int, seed: int = 0):
    torch.manual_seed(seed)
    k, v = torch.randn(S, KVH, N, D), torch.randn(S, KVH, N, D)
    gate = torch.randn(S, KVH, G)
    ntok = np.array([0] + [int(x) for x in torch.randint(1, N + 1, (S - 1,))], dtype=np.int64)
    ntok[1] = N  # one slot uses every key
    mask = torch.full((S, N), float("-inf"))
    for s, n in enumerate(ntok):
        mask[s, : max(n, 1)] = 0.0
        k[s, :, n:] = 0.0
        v[s, :, n:] = 0.0
    gate[0] = 0.0
    return k, v, gate, ntok, mask


@pytest.fixture(scope="module", params=["native", "portable"])
def kernel_build(request, tmp_path_factory):
    """The kernel as the server builds it (with its AVX-512 body where the CPU has one), and its portable
    loops alone: the twin every machine without AVX-512 runs."""

    if request.param == "native":
        lib = cpu_kernel.load()
        has_avx512 = "avx512f" in Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else False
        assert lib.aligner_simd_width() == (512 if has_avx512 else 0)
        return lib
    lib = cpu_kernel.open_library(cpu_kernel.build(tmp_path_factory.mktemp("portable"), defines=("ALIGNER_PORTABLE",)))
    assert lib.aligner_simd_width() == 0
    return lib


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["table-f32", "table-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "D, G",
    [
        (64, 3),
        (128, 3),
        (80, 3),
        (64, 1),
        (128, 4),
        (64, 5),
    ],  # unrolled and generic head sizes; G past the vector body's 4
)
def test_cpu_kernel_matches_the_general_path(kernel_build, dtype, kv_dtype, D, G) -> None:

    S, KVH, N, T = 9, 3, 16, 53  # N up to 16
    k, v, gate, ntok, mask = random_table(S, KVH, G, N, D)
    k, v = k.to(kv_dtype), v.to(kv_dtype)  # a bfloat16 table: what a bfloat16 model's projections give
    tok = np.random.default_rng(2).integers(0, S, T).astype(np.int64)
    tok[20:40] = 4  # a prefill-like run
    q = torch.randn(T, (KVH * G + 2 * KVH) * D).to(dtype)[:, : KVH * G * D]  # a view into fused qkv, as in vLLM
    base = torch.randn(T, KVH * G * D).to(dtype)
    scale = 1 / math.sqrt(D)
    out = base.clone()
    cpu_kernel.aligner_apply(out, q, tok, k, v, gate, ntok, scale, N, kernel_build)
    ts = torch.from_numpy(tok)
    delta = delta_general(
        q.float().view(T, KVH, G, D), k.float()[ts], v.float()[ts], mask[ts], gate[ts], scale
    ).reshape(T, -1)
    want = base.clone().add_(delta.to(dtype))  # what the torch paths write
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)  # bf16: one ulp
    torch.testing.assert_close(out, want, **tol)
    assert delta.abs().max() > 0.1
    assert torch.equal(out[ts == 0], base[ts == 0])


def test_cpu_kernel_refuses_a_slot_outside_the_table() -> None:

    k, v, gate, ntok, _ = random_table(4, 1, 2, 2, 16)
    out, q = torch.zeros(3, 32), torch.randn(3, 32)
    with pytest.raises(ValueError, match="outside the table"):
        cpu_kernel.aligner_apply(out, q, np.array([1, 4, 2], dtype=np.int64), k, v, gate, ntok, 0.25, 2)
    assert torch.equal(out, torch.zeros(3, 32))  # nothing written
    with pytest.raises(ValueError, match="int64"):
        cpu_kernel.aligner_apply(out, q, np.array([1, 2, 2], dtype=np.int32), k, v, gate, ntok, 0.25, 2)
    with pytest.raises(ValueError, match="dtype|float16"):
        cpu_kernel.aligner_apply(out.half(), q.half(), np.array([1, 2, 2]), k, v, gate, ntok, 0.25, 2)
    with pytest.raises(ValueError, match="float32 or bfloat16 table"):
        cpu_kernel.aligner_apply(out, q, np.array([1, 2, 2]), k.half(), v.half(), gate, ntok, 0.25, 2)


def test_cpu_kernel_layer_calls_need_a_begun_step_and_a_real_layer() -> None:
    """The per-layer call passes only addresses and a layer: the kernel itself refuses a step that was never
    checked (or failed its check) and a layer outside the table, and writes nothing."""

    k, v, gate, ntok, _ = random_table(4, 1, 2, 2, 16)
    bound = cpu_kernel.BoundKernel(
        k[None].expand(3, -1, -1, -1, -1).contiguous(),
        v[None].expand(3, -1, -1, -1, -1).contiguous(),
        gate[None].expand(3, -1, -1, -1).contiguous(),
        ntok,
        0.25,
    )
    out, q = torch.zeros(3, 32), torch.randn(3, 32)
    with pytest.raises(ValueError, match="no begun step"):
        bound.layer(out, q, 0)
    with pytest.raises(ValueError, match="outside the table"):
        bound.begin(out, q, np.array([1, 9, 2], dtype=np.int64), 2)
    with pytest.raises(ValueError, match="no begun step"):
        bound.layer(out, q, 0)  # a failed check leaves no step behind
    bound.begin(out, q, np.array([1, 3, 2], dtype=np.int64), 2)
    for bad in (3, -1):
        with pytest.raises(ValueError, match=f"no layer {bad}"):
            bound.layer(out, q, bad)
    assert torch.equal(out, torch.zeros(3, 32))
    bound.layer(out, q, 2)
    assert out.abs().sum() > 0


def test_cpu_kernel_is_built_once_into_its_cache(tmp_path, monkeypatch) -> None:

    first = cpu_kernel.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_cpu_path_resolution(monkeypatch, caplog) -> None:
    cpu = torch.device("cpu")
    assert kernels.choose("cpu", cpu, torch.bfloat16, 64, 16) == "cpu"
    assert kernels.choose("auto", cpu, torch.float32, 64, 16) == "cpu"
    assert kernels.choose("torch", cpu, torch.float32, 64, 16) == "torch"
    assert kernels.choose("auto", cpu, torch.float16, 64, 16) == "torch"  # fp16: the torch kernel
    with pytest.raises(RuntimeError, match="float16"):
        kernels.choose("cpu", cpu, torch.float16, 64, 16)
    with pytest.raises(ValueError, match="unknown Aligner kernel path"):
        kernels.choose("fast", cpu, torch.float32, 64, 16)
    # No compiler: "auto" falls back to the torch kernel with a warning, "cpu" is refused with the reason.
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_error", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("ALIGNER_KERNEL_CACHE", str(cpu_kernel.cache_dir() / "never"))
    with caplog.at_level("WARNING"):
        assert kernels.choose("auto", cpu, torch.float32, 64, 16) == "torch"
    assert "torch kernel" in caplog.text and "/nonexistent/cc" in caplog.text
    with pytest.raises(RuntimeError, match="'cpu' cannot run"):
        kernels.choose("cpu", cpu, torch.float32, 64, 16)


def test_cpu_kernel_is_never_loaded_from_a_directory_others_can_write(tmp_path, monkeypatch) -> None:

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(cpu_kernel.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = cpu_kernel.build(shared)
    assert built.parent != shared and built.parent.name == f"aligner-serve-kernels-{os.getuid()}"
    assert not any(shared.iterdir())


def test_loading_the_cpu_kernel_leaves_the_process_floating_point_mode_alone() -> None:
    """A library linked with -ffast-math would turn on flush-to-zero for the whole process (the engine's
    numerics, and every library in it): subnormals must survive loading the kernel."""
    import subprocess
    import sys

    code = (
        "import sys; from server.engine.kernels import cpu as cpu_kernel; cpu_kernel.load(); "
        "import torch; assert sys.float_info.min / 2 > 0, 'flush-to-zero'; "
        "assert (torch.tensor(1e-40) * 1).item() > 0, 'denormals-are-zero'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
