"""Our side of the vLLM touch points: the plugin, the model classes, the routers, the flags and the salts as
vLLM takes them. The vLLM names themselves (their presence, signatures and fields) are checked in
tests/test_vllm_glue.py."""

from __future__ import annotations

import dataclasses

from server.engine.config import AlignerEngineConfig
from server.engine.facade import EngineOptions, cache_salt
from server.engine.plugin import BASE_ARCHITECTURES, aligner_architecture, register


def test_register_is_reentrant_and_registers_every_architecture() -> None:
    from server.engine.vllm_glue import ModelRegistry

    register()
    register()
    archs = ModelRegistry.get_supported_archs()
    for base in BASE_ARCHITECTURES:
        assert aligner_architecture(base) in archs


def test_model_classes_resolve() -> None:
    from server.engine import model

    for base in BASE_ARCHITECTURES:
        cls = getattr(model, aligner_architecture(base))
        assert cls.__mro__[1] is model.AlignerMixin and cls.__mro__[2].__name__ == base


def test_our_flags_parse_with_vllm_serve_parser() -> None:
    from server.engine.vllm_glue import engine_args

    opts = EngineOptions(
        model_path="/m",
        served_name="m:1",
        aligner=AlignerEngineConfig(max_slots=7, max_tokens=3),
        routing="v1",
        extra_args=("--max-num-batched-tokens", "64"),
    )
    args = engine_args(opts.argv())
    assert args.hf_overrides == {"architectures": ["AlignerLlamaForCausalLM"]}
    assert args.additional_config == {
        "aligner": {"max_slots": 7, "cold_slots": 0, "max_tokens": 3, "max_stack": 4, "path": "auto", "routing": "v1"}
    }
    assert args.worker_extension_cls == "server.engine.worker_ext.AlignerWorkerExtension"
    assert args.logits_processors == ["server.engine.routing_v1:AlignerRoutingLP"]
    assert args.max_num_batched_tokens == 64 and args.served_model_name == ["m:1"]
    plain = engine_args(dataclasses.replace(opts, aligner_enabled=False).argv())
    assert plain.hf_overrides in (None, {}) and not plain.logits_processors


def test_v1_router_never_changes_the_argmax() -> None:
    from server.engine.routing_v1 import AlignerRoutingLP

    assert AlignerRoutingLP.is_argmax_invariant(None) is True


def test_v2_model_state_is_vllms() -> None:
    """The V2 path cannot run on CPU; at least its class must be vLLM's model state (whose hooks it overrides,
    checked in tests/test_vllm_glue.py)."""
    from server.engine.routing_v2 import AlignerModelState
    from server.engine.vllm_glue import DefaultModelState

    assert issubclass(AlignerModelState, DefaultModelState)


def test_cache_salt_is_valid_for_vllm() -> None:
    from server.engine.vllm_glue import ChatCompletionRequest

    salt = cache_salt("ten_1", "a" * 64, "user/salt@x" * 20)
    assert len(salt) <= 128 and not any(c in salt for c in "@/\\\x00")
    ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], cache_salt=salt)  # vLLM accepts it


def test_cache_salt_separates_tenants_adapters_and_client_salts() -> None:
    """The server's salt of one (tenant, adapter content, client salt) is no other's: not another tenant's,
    not another adapter's or the base model's, and no client salt reproduces any of them."""
    a, b = "a" * 64, "b" * 64
    salts = {cache_salt(t, k, u) for t in ("ten_1", "ten_2", None) for k in (a, b, None) for u in (None, "x", "y")}
    assert len(salts) == 27
    # the old format (the salt text itself, then the client's) cannot be forged through the client salt
    for forged in (f"aligner-{a}", a, "base", "ten_2", '"ten_2"'):
        assert cache_salt("ten_1", None, forged) not in {
            cache_salt("ten_2", None),
            cache_salt("ten_1", a),
            cache_salt(None, None),
        }
    assert cache_salt("ten_1", a) == cache_salt("ten_1", a)  # stable: the cache keeps hitting within a tenant
