"""The engine's vLLM configuration on a CUDA platform (simulated here: this machine has none) keeps the Aligner
op out of every CUDA graph unless the op is graph-safe; and the V2 runner's model state, which only a GPU runs,
routes a fake input batch."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support import linear_layers, tiny_spec

from aligner_core.adapter_format import Adapter
from server.engine import facade, op, vllm_glue
from server.engine.facade import ALIGNER_OP, EngineError, EngineOptions
from server.engine.routing import Routing
from server.engine.table import AdapterTable, TableShape, reference_term


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch):
    """A CUDA platform as the engine options see it; `cuda(triton=False)` without the Triton kernel."""

    def platform(*, triton: bool = True) -> None:
        monkeypatch.setattr(facade, "_on_cpu", lambda: False)
        monkeypatch.setattr(facade, "_triton_available", lambda: triton)

    return platform


def options(**kw) -> EngineOptions:
    return EngineOptions(model_path="m", served_name="m:0123", **kw)


def parsed(argv: list[str]):
    """The flags as vLLM's own parser reads them (the engine is built from exactly this)."""
    return vllm_glue.engine_args(argv)


@pytest.mark.parametrize(("routing", "triton"), [("v1", True), ("v1", False), ("v2", False)])
def test_not_graph_safe_on_cuda_means_piecewise_with_the_op_as_a_splitting_op(cuda, routing, triton) -> None:
    cuda(triton=triton)
    o = options(routing=routing)
    said, flags = o.cuda_graphs()
    assert "splitting op" in said and ALIGNER_OP in said
    cc = parsed(o.argv()).compilation_config
    assert str(cc.cudagraph_mode) == "PIECEWISE" or cc.cudagraph_mode.name == "PIECEWISE"
    assert ALIGNER_OP in cc.splitting_ops
    assert set(vllm_glue.CompilationConfig._attention_ops) <= set(cc.splitting_ops)  # vLLM's own splits kept
    # vLLM's own post-processing (at VLLM_COMPILE) keeps a given list and the piecewise mode
    from vllm.config.compilation import CompilationMode

    cc.mode = CompilationMode.VLLM_COMPILE
    cc.set_splitting_ops_for_v1(all2all_backend="naive")
    assert ALIGNER_OP in cc.splitting_ops and cc.cudagraph_mode.name == "PIECEWISE"


def test_graph_safe_on_cuda_keeps_vllms_modes(cuda) -> None:
    cuda(triton=True)
    o = options(routing="v2")
    said, flags = o.cuda_graphs()
    assert flags == [] and "graph-safe" in said
    argv = o.argv()
    assert "--compilation-config" not in argv
    aligner = json.loads(argv[argv.index("--additional-config") + 1])["aligner"]
    assert aligner["routing"] == "v2"  # the worker turns graph-safe mode on from this (model.install)


def test_a_users_compilation_config_is_refused_where_the_op_is_not_graph_safe(cuda) -> None:
    cuda(triton=False)
    for flag in (["--compilation-config", '{"cudagraph_mode": "FULL"}'], ["-cc.cudagraph_mode=FULL"], ["-O3"]):
        with pytest.raises(EngineError, match="--enforce-eager") as e:
            options(routing="v1", extra_args=tuple(flag)).argv()
        assert str(e.value).startswith(flag[0])  # names the flag


@pytest.mark.parametrize("kw", [{"enforce_eager": True}, {"aligner_enabled": False}])
def test_eager_or_stock_on_cuda_adds_nothing(cuda, kw) -> None:
    cuda(triton=False)
    assert options(routing="v1", **kw).cuda_graphs()[1] == []


def test_cpu_adds_nothing() -> None:
    said, flags = options().cuda_graphs()  # this machine: vLLM's CPU platform
    assert flags == [] and "no CUDA graphs" in said


# ---- the V2 runner's model state, against a fake input batch ----

SPEC = tiny_spec()
H, D = SPEC.num_heads, SPEC.head_dim


@pytest.mark.parametrize("graph_safe", [True, False], ids=["graph-safe", "eager"])
def test_v2_model_state_routes_a_fake_batch(graph_safe: bool) -> None:
    from server.engine.routing_v2 import AlignerModelState

    torch.manual_seed(0)
    layers = linear_layers(SPEC)
    table = AdapterTable(
        TableShape.unsharded(SPEC, max_slots=4, max_tokens=4), layers, device=torch.device("cpu"), dtype=torch.float32
    )
    st = op.WorkerState(table=table, routing=Routing(8), scale=1 / math.sqrt(D))
    if graph_safe:
        st.enable_graphs(16)
    adapters = {
        "ka": Adapter.random(SPEC, tokens=1, start_layer=1, seed=1, gate_scale=0.5),
        "kb": Adapter.random(SPEC, tokens=3, start_layer=0, seed=2, gate_scale=0.9),
    }
    for key, a in adapters.items():
        st.load(key, a)
    state = AlignerModelState.__new__(AlignerModelState)  # vLLM builds it with a GPU model; these suffice
    state.rope_state, state.prompt_embeds_state = None, None

    def request(key: str | None):
        return SimpleNamespace(sampling_params=vllm_glue.SamplingParams(extra_args={"aligner": key} if key else None))

    op.set_worker_state(st)
    try:
        state.add_request(5, request("ka"))
        state.add_request(2, request("kb"))
        state.add_request(0, request(None))
        # the coming forward: requests 2, 0, 5 with 3, 1 and 4 tokens
        batch = SimpleNamespace(
            num_reqs=3, idx_mapping_np=np.array([2, 0, 5, 7]), query_start_loc_np=np.array([0, 3, 4, 8, 8])
        )
        assert state.prepare_inputs(batch, None) == {}
        names = ["kb", "kb", "kb", None, "ka", "ka", "ka", "ka"]
        if graph_safe:
            want = [table.lookup(n) if n else 0 for n in names]
            assert st.token_slots[0].tolist() == want + [0] * 8
        torch.manual_seed(3)
        q, base = torch.randn(8, H * D), torch.randn(SPEC.num_layers, 8, H * D)
        out = base.clone()
        for layer, out_layer in enumerate(out.unbind(0)):
            op.apply_term(out_layer, q, layer)
    finally:
        op.set_worker_state(None)
    per_token = [adapters[n] if n else None for n in names]
    want_out = torch.stack([base[l] + reference_term(layers[l], q, per_token, D) for l in range(SPEC.num_layers)])
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 3], base[:, 3])  # the request without an adapter
