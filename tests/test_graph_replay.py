"""The Aligner op under CUDA-graph semantics, on this CPU: record one forward's work as a graph capture would,
change the routing and the table, replay, compare with the reference.

A CUDA graph records the kernels a forward launches, with their arguments (tensor addresses, grid, trip
counts), and replays exactly those later without running any Python. `GraphRecord` does the same at the level
of torch's dispatcher: every aten call the op issues while recording is kept with its arguments; at replay the
calls run again in order, reading the *current* contents of every tensor that came from outside the record
(the attention output, q, the table, the routing buffer) and the replayed values of the ones made inside it.
Python the op runs between calls (a branch on the routing, a plan made from numpy) is not replayed, which is
how a graph bakes it in; a call that needs the host to read a device value (`.item()`, `nonzero`) cannot be
captured on CUDA and is refused here.

The graph-safe op (op.py: persistent `token_slots`, one fixed launch per layer) replays right for any
routing; the eager op does not (`test_the_eager_op_is_not_replayable`), which is why it only ever runs
outside graphs (as a splitting op, `facade.EngineOptions.cuda_graphs`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from support import linear_layers, tiny_spec
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from aligner_core.adapter_format import Adapter
from server.engine import op
from server.engine.routing import Routing
from server.engine.table import AdapterTable, TableShape, reference_term

SPEC = tiny_spec()
H, D = SPEC.num_heads, SPEC.head_dim
T = 12  # the captured size (a padded batch)
ADAPTERS = {
    "a": Adapter.random(SPEC, tokens=1, start_layer=1, seed=1, gate_scale=0.5),
    "b": Adapter.random(SPEC, tokens=3, start_layer=0, gate_activation="tanh", seed=2, gate_scale=0.9),
    "c": Adapter.random(SPEC, tokens=4, start_layer=2, seed=4, gate_scale=0.5),
}
# Host-sync calls: a CUDA graph cannot capture them (the host would read a device value mid-capture).
NOT_CAPTURABLE = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class NotCapturable(RuntimeError):
    pass


class GraphRecord(TorchDispatchMode):
    """Records aten calls (see the module doc); `replay()` runs them again on the tensors' current contents."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, Any, Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.split(".")[0] in NOT_CAPTURABLE:
            raise NotCapturable(f"{func} reads a device value on the host: not capturable in a CUDA graph")
        result = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, result))
        return result

    def replay(self) -> None:
        made: dict[int, torch.Tensor] = {}  # id of a tensor made while recording -> its replayed value

        def now(x: Any) -> Any:
            return made.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for func, args, kwargs, result in self.calls:
            again = func(*tree_map(now, args), **tree_map(now, kwargs))
            for old, new in zip(_tensors(result), _tensors(again), strict=True):
                made[id(old)] = new


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def make_state(*, graph_safe: bool, lanes: int = 1) -> tuple[op.WorkerState, list]:
    torch.manual_seed(0)
    layers = linear_layers(SPEC)
    shape = TableShape.unsharded(SPEC, max_slots=8, max_tokens=4)
    table = AdapterTable(shape, layers, device=torch.device("cpu"), dtype=torch.float32)
    st = op.WorkerState(table=table, routing=Routing(8, lanes=lanes), scale=1 / math.sqrt(D))
    if graph_safe:
        st.enable_graphs(32)
    return st, layers


def forward(outs: list[torch.Tensor], q: torch.Tensor) -> None:
    """The op at every layer of one forward; `outs[l]` is layer l's output (views of one [L, T, H*D] tensor
    made before recording, so a record holds the op's calls only and every layer is checked)."""
    for layer, out_layer in enumerate(outs):
        op.apply_term(out_layer, q, layer)


def layers_of(out: torch.Tensor) -> list[torch.Tensor]:
    return list(out.unbind(0))


def reference(layers: list, q: torch.Tensor, base: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    adapters = [ADAPTERS[n] if n else None for n in names] + [None] * (T - len(names))
    return torch.stack([base[l] + reference_term(layers[l], q, adapters, D) for l in range(SPEC.num_layers)])


def route(st: op.WorkerState, names: list[str | None]) -> None:
    """The runner's step before a forward: the tokens' slots (a real batch may be shorter than the capture)."""
    slots = [st.table.lookup(n) if n else 0 for n in names]
    st.set_tokens(np.array(slots, dtype=np.int64) if any(slots) else None)


ROUTINGS: list[list[str | None]] = [
    ["a", "a", None, "b", "b", "b", "c", None, "a", "c"],  # mixed, 10 of the 12 captured tokens
    [None] * 12,  # no adapter at all
    ["c"] * 12,  # one adapter everywhere
    ["b", None, "a", "d", "d", None, "c", "b", "a", "d", "c", None],  # "d" loaded after the capture
]


@pytest.mark.parametrize("captured_with", [0, 1], ids=["capture-mixed", "capture-no-adapter"])
def test_the_graph_safe_op_replays_right_for_any_routing_and_table(captured_with: int) -> None:
    st, layers = make_state(graph_safe=True)
    for name in ("a", "b", "c"):
        st.table.put(name, ADAPTERS[name])
    torch.manual_seed(1)
    q, base = torch.randn(T, H * D), torch.randn(SPEC.num_layers, T, H * D)
    out = base.clone()
    op.set_worker_state(st)
    try:
        route(st, ROUTINGS[captured_with])
        views = layers_of(out)
        with GraphRecord() as graph:  # the capture: one forward at size T
            forward(views, q)
        assert graph.calls, "the graph-safe op launches on every forward, adapters or not"
        for i, names in enumerate(ROUTINGS):
            if i == 3:  # the table changes after the capture: another adapter in a slot, one evicted
                st.table.evict("a", in_use=set())
                ADAPTERS["d"] = Adapter.random(SPEC, tokens=2, start_layer=0, seed=9, gate_scale=0.7)
                st.table.put("d", ADAPTERS["d"])
                st.table.put("a", ADAPTERS["a"])
            route(st, names)
            torch.manual_seed(10 + i)
            q.copy_(torch.randn(T, H * D))  # the new step's queries, in the captured input's memory
            out.copy_(base)
            graph.replay()
            torch.testing.assert_close(out, reference(layers, q, base, names), rtol=1e-5, atol=1e-5)
            untouched = [t for t, n in enumerate(names + [None] * (T - len(names))) if n is None]
            assert torch.equal(out[:, untouched], base[:, untouched])  # a token without an adapter: exactly base
    finally:
        op.set_worker_state(None)
        ADAPTERS.pop("d", None)


STACKED: list[list[list[tuple[str, float]]]] = [  # per token: its stack of (adapter, scale), lane order
    [[("a", 1.0)], [("a", 0.5), ("b", 1.0)], [], [("c", -1.0), ("b", 2.0), ("a", 1.0)]] * 3,
    [[]] * 12,
    [[("b", 1.5), ("c", 1.0)]] * 6 + [[("a", 1.0)]] * 6,
]


def test_the_graph_safe_op_replays_stacks_right() -> None:
    """Three lanes, captured with no adapter: every lane's launch is in the graph, and each replay (plain,
    scaled and stacked tokens; none at all) equals the sum of the scaled reference terms."""
    from server.engine.config import scaled_key

    st, layers = make_state(graph_safe=True, lanes=3)
    ids = {}
    for stacks in STACKED:
        for stack in stacks:
            for name, scale in stack:
                ids[(name, scale)] = st.load(scaled_key(name, scale), ADAPTERS[name], scale)
    torch.manual_seed(1)
    q, base = torch.randn(T, H * D), torch.randn(SPEC.num_layers, T, H * D)
    out = base.clone()
    op.set_worker_state(st)
    try:
        st.set_tokens(None)
        with GraphRecord() as graph:
            forward(layers_of(out), q)
        for i, stacks in enumerate(STACKED):
            lanes = np.array([[ids[s[k]] if k < len(s) else 0 for s in stacks] for k in range(3)], dtype=np.int64)
            st.set_tokens(lanes if lanes.any() else None)
            torch.manual_seed(20 + i)
            q.copy_(torch.randn(T, H * D))
            out.copy_(base)
            graph.replay()
            want = base.clone()
            for k in range(3):
                entries = [s[k] if k < len(s) else None for s in stacks]
                scales = torch.tensor([e[1] if e else 0.0 for e in entries])[:, None]
                for l in range(SPEC.num_layers):
                    plain = reference_term(layers[l], q, [ADAPTERS[e[0]] if e else None for e in entries], D)
                    want[l] += plain * scales
            torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5, msg=f"routing {i}")
    finally:
        op.set_worker_state(None)


def test_the_eager_op_is_not_replayable() -> None:
    """Today's eager op under a graph: captured with no adapter it records nothing (the term is never
    added at replay); captured with adapters it replays the capture's routing. This is the silent failure
    the splitting op (or the graph-safe op) exists to prevent, and it shows the harness can see it."""
    st, layers = make_state(graph_safe=False)
    for name in ("a", "b", "c"):
        st.table.put(name, ADAPTERS[name])
    torch.manual_seed(1)
    q, base = torch.randn(T, H * D), torch.randn(SPEC.num_layers, T, H * D)
    op.set_worker_state(st)
    try:
        route(st, ROUTINGS[1])
        out = base.clone()
        views = layers_of(out)
        with GraphRecord() as graph:
            forward(views, q)
        assert not graph.calls  # nothing captured
        route(st, ROUTINGS[0])
        graph.replay()
        assert torch.equal(out, base)  # the adapters' term is missing
        assert not torch.allclose(reference(layers, q, base, ROUTINGS[0]), base)

        route(st, ROUTINGS[0])
        out = base.clone()
        views = layers_of(out)
        with GraphRecord() as graph:
            forward(views, q)
        route(st, ROUTINGS[2])
        out.copy_(base)
        graph.replay()
        assert not torch.allclose(out, reference(layers, q, base, ROUTINGS[2]), atol=1e-4)  # stale routing
    finally:
        op.set_worker_state(None)


def test_the_harness_refuses_a_host_sync() -> None:
    x = torch.arange(4)
    with pytest.raises(NotCapturable), GraphRecord():
        int(x.sum())


def test_routing_buffer_keeps_its_address_and_zeroes_the_tail() -> None:
    st, _ = make_state(graph_safe=True)
    st.table.put("a", ADAPTERS["a"])
    assert st.token_slots is not None
    buf = st.token_slots[0]  # lane 0: the only lane of this routing
    address = st.token_slots.data_ptr()
    route(st, ["a"] * 20)
    assert buf[:20].tolist() == [1] * 20
    route(st, ["a", None, "a"])
    assert buf.tolist() == [1, 0, 1] + [0] * 29 and st.token_slots.data_ptr() == address
    route(st, [None, None])
    assert not buf.any()
    with pytest.raises(RuntimeError, match="routing buffer"):
        route(st, ["a"] * 40)


def test_cold_adapters_are_staged_into_the_buffer() -> None:
    torch.manual_seed(0)
    layers = linear_layers(SPEC)
    shape = TableShape.unsharded(SPEC, max_slots=1, max_tokens=4, cold_slots=4, scratch=4)
    table = AdapterTable(shape, layers, device=torch.device("cpu"), dtype=torch.float32)
    st = op.WorkerState(table=table, routing=Routing(8), scale=1 / math.sqrt(D))
    st.enable_graphs(16)
    for name in ("a", "b", "c"):
        table.put(name, ADAPTERS[name])
    names: list[str | None] = ["a", "b", "c", None]
    ids: list[int] = []
    for n in names:  # as the routers look up a batch: slots of earlier rows are in use
        ids.append(table.lookup(n, set(ids) - {0}) if n else 0)
    assert max(ids) >= table.cold_base  # cold ids reach the routing
    st.set_tokens(np.array(ids, dtype=np.int64))
    staged = st.token_slots[0, :4].tolist()
    assert max(staged) < table.cold_base and staged[3] == 0  # the op sees hot or scratch slots only
    torch.manual_seed(3)
    q, base = torch.randn(4, H * D), torch.randn(SPEC.num_layers, 4, H * D)
    out = base.clone()
    op.set_worker_state(st)
    try:
        forward(layers_of(out), q)
    finally:
        op.set_worker_state(None)
    adapters = [ADAPTERS[n] if n else None for n in names]
    want = torch.stack([base[l] + reference_term(layers[l], q, adapters, D) for l in range(SPEC.num_layers)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
