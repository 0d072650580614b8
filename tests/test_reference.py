"""The HF reference forward: base-exact with zero gates, equal to the engine math, differentiable."""

from __future__ import annotations

import math

import pytest
import torch
from support import tiny_llama

from aligner_core.adapter_format import Adapter
from aligner_core.reference import attached, attached_adapter, layer_term
from server.engine.aligner_math import delta_reference


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def logits(model, ids, adapter=None):
    with torch.no_grad(), attached_adapter(model, adapter):
        return model(input_ids=ids).logits


def test_zero_gates_give_exactly_the_base_model(tiny) -> None:
    model, spec = tiny
    ids = torch.randint(0, 128, (2, 9))
    a = Adapter.random(spec, tokens=3, start_layer=0, gate_scale=0.0)
    assert torch.equal(logits(model, ids, a), logits(model, ids))


def test_adapter_changes_output_and_detaches_cleanly(tiny) -> None:
    model, spec = tiny
    ids = torch.randint(0, 128, (1, 7))
    a = Adapter.random(spec, tokens=2, start_layer=1, gate_scale=0.5, seed=1)
    assert not torch.allclose(logits(model, ids, a), logits(model, ids))
    # leaving the block restores the class forward: the base model again, exactly
    base_again = logits(model, ids)
    assert torch.equal(base_again, logits(model, ids))


def test_tanh_gate_differs_from_identity(tiny) -> None:
    model, spec = tiny
    ids = torch.randint(0, 128, (1, 5))
    a = Adapter.random(spec, tokens=1, start_layer=0, gate_scale=1.0, seed=2)
    t = Adapter(a.prefix, a.gate, a.start_layer, "tanh", a.num_layers, a.base_model)
    assert not torch.allclose(logits(model, ids, a), logits(model, ids, t))


def test_term_equals_engine_reference_math(tiny) -> None:
    model, spec = tiny
    attn = model.model.layers[0].self_attn
    a = Adapter.random(spec, tokens=3, start_layer=0, gate_scale=0.7, seed=3)
    q = torch.randn(1, spec.num_heads, 6, spec.head_dim)  # [B, H, T, D]
    gate = a.gate_values()[0]
    got = layer_term(q, a.prefix, gate, attn)[0]  # [T, H, D]
    with torch.no_grad():
        kp = attn.k_proj(a.prefix).view(3, spec.num_kv_heads, spec.head_dim)
        vp = attn.v_proj(a.prefix).view(3, spec.num_kv_heads, spec.head_dim)
    want = delta_reference(q[0].transpose(0, 1), [kp] * 6, [vp] * 6, [gate] * 6, 1 / math.sqrt(spec.head_dim))
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)


def test_gradients_reach_prefix_and_gate_only(tiny) -> None:
    model, spec = tiny
    prefix = torch.nn.Parameter(torch.randn(2, spec.hidden_size))
    gate = torch.nn.Parameter(torch.full((spec.num_layers - 2, spec.num_heads), 0.1))
    ids = torch.randint(0, 128, (1, 6))
    for p in model.parameters():
        p.requires_grad_(False)
    with attached(model, prefix=prefix, gate=gate, start_layer=2):
        model(input_ids=ids).logits.sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert gate.grad is not None and gate.grad.abs().sum() > 0
