"""The Aligner forward on Hugging Face `transformers` Llama-family models: ground truth and training path.

Independent of vLLM. Each attention layer l >= start_layer adds, per head, before o_proj:
    g_l[h] * softmax_N(q_t @ K_p.T * scale) @ V_p,   K_p = k_proj(P), V_p = v_proj(P)  (no RoPE, no mask)
The prefix and gate are used by reference, so `nn.Parameter`s attached here train through it.

`aligner_term` is the one reference of the term: this forward (and so training) computes it, and the
engine's fast paths, the Triton kernel and the C kernel are tested against it (the engine imports it from
here: this module needs only torch until a model is loaded).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from transformers import PretrainedConfig

    from aligner_core.adapter_format import Adapter

    class HFAttention(Protocol):
        """What is used here of an HF Llama-family attention module (q_norm and k_norm: only where present)."""

        config: PretrainedConfig
        layer_idx: int
        head_dim: int
        scaling: float
        q_proj: nn.Linear
        k_proj: nn.Linear
        v_proj: nn.Linear
        o_proj: nn.Linear
        q_norm: nn.Module
        k_norm: nn.Module
        forward: Callable[..., Any]
        _aligner: list[dict[str, Any]] | None


def _attention_modules(model: nn.Module) -> list[HFAttention]:
    mods = [
        m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))
    ]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no Llama-style attention modules")
    return cast("list[HFAttention]", mods)


def aligner_term(
    q: torch.Tensor,  # [..., H, T, D] post-RoPE queries of tokens that share one adapter
    kp: torch.Tensor,  # [N, KVH, D] K_p: the layer's keys of the N prefix tokens
    vp: torch.Tensor,  # [N, KVH, D] V_p
    gate: torch.Tensor,  # [H] after activation
    scale: float,  # the attention's own, 1 / sqrt(D)
) -> torch.Tensor:  # [..., H, T, D]
    """gate[h] * softmax_N(q_t @ K_p.T * scale) @ V_p for every token t and head h: a separate softmax over
    the N prefix keys, no causal mask, kv heads repeated for GQA. Softmax in float32, products in q's dtype."""
    group = q.shape[-3] // kp.shape[1]
    kp = kp.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, N, D]
    vp = vp.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q, kp.transpose(-1, -2)) * scale  # [..., H, T, N]
    a = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), vp)  # [..., H, T, D]
    return gate.to(a.dtype)[:, None, None] * a


def prefix_kv(attn: HFAttention, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K_p, V_p [N, KVH, D] of prefix [N, hidden] in one HF attention layer: its own k/v projections (bias
    included) and key norm, no RoPE."""
    D = attn.head_dim
    kp = attn.k_proj(prefix.to(attn.k_proj.weight.dtype)).view(prefix.shape[0], -1, D)  # [N, KVH, D]
    vp = attn.v_proj(prefix.to(attn.v_proj.weight.dtype)).view(prefix.shape[0], -1, D)
    if hasattr(attn, "k_norm"):
        kp = attn.k_norm(kp)
    return kp, vp


def layer_term(
    q: torch.Tensor,  # [B, H, T, D] post-RoPE queries
    prefix: torch.Tensor,  # [N, hidden]
    gate: torch.Tensor,  # [H] after activation
    attn: HFAttention,  # the HF attention module (k_proj, v_proj, head_dim, scaling)
) -> torch.Tensor:  # [B, T, H, D], the layout of HF's attention output
    return aligner_term(q, *prefix_kv(attn, prefix), gate, attn.scaling).transpose(1, 2)


def _forward_with_aligner(
    self: HFAttention,
    hidden_states: torch.Tensor,
    position_embeddings: Any = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
):
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, D]
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)  # [B, T, H, D]
    for ad in self._aligner or ():  # a stack: each adapter's own softmax, the terms summed in order
        if self.layer_idx < ad["start_layer"]:
            continue
        gate = ad["gate"][self.layer_idx - ad["start_layer"]]
        gate = torch.tanh(gate) if ad["gate_activation"] == "tanh" else gate
        if ad["scale"] != 1.0:
            gate = gate * ad["scale"]  # the term is linear in the gate: scale_i * gate_i * softmax(q K_i^T) V_i
        out = out + layer_term(q, ad["prefix"], gate, self)
    out = self.o_proj(out.reshape(*input_shape, -1).contiguous())
    return out, weights


@contextlib.contextmanager
def attached(
    model: nn.Module,
    *,
    prefix: torch.Tensor,
    gate: torch.Tensor,
    start_layer: int,
    gate_activation: str = "identity",
) -> Iterator[nn.Module]:
    """Run `model` with an Aligner adapter inside the block; the tensors are used by reference."""
    state = {"prefix": prefix, "gate": gate, "start_layer": start_layer, "gate_activation": gate_activation}
    with _attached_states(model, [state | {"scale": 1.0}]):
        yield model


@contextlib.contextmanager
def _attached_states(model: nn.Module, states: list[dict[str, Any]]) -> Iterator[nn.Module]:
    mods = _attention_modules(model)
    for m in mods:
        m._aligner = states
        m.forward = types.MethodType(_forward_with_aligner, m)
    try:
        yield model
    finally:
        for m in mods:
            del m.forward  # back to the class's forward
            m._aligner = None


def attached_adapter(model: nn.Module, adapter: Adapter | None) -> contextlib.AbstractContextManager:
    if adapter is None:
        return contextlib.nullcontext(model)
    return attached(
        model,
        prefix=adapter.prefix.float(),
        gate=adapter.gate.float(),
        start_layer=adapter.start_layer,
        gate_activation=adapter.gate_activation,
    )


def attached_stack(model: nn.Module, stack: list[tuple[Adapter, float]]) -> contextlib.AbstractContextManager:
    """Run `model` with a stack of adapters, each at its scale: at every layer the sum over the stack of
    scale_i * gate_i * softmax(q K_i^T / sqrt(D)) V_i, each adapter with its own softmax over its own prefix
    and from its own start layer. An empty stack is the base model."""
    if not stack:
        return contextlib.nullcontext(model)
    states = [
        {
            "prefix": a.prefix.float(),
            "gate": a.gate.float(),
            "start_layer": a.start_layer,
            "gate_activation": a.gate_activation,
            "scale": float(scale),
        }
        for a, scale in stack
    ]
    return _attached_states(model, states)


@torch.no_grad()
def teacher_forced(
    model: nn.Module,
    adapter: Adapter | list[tuple[Adapter, float]] | None,
    prompt_ids: list[int],
    completion_ids: list[int],
) -> tuple[list[int], list[float]]:
    """One forward over prompt + completion: the greedy token and the completion token's logprob at each step.
    `adapter` is one adapter, a stack of (adapter, scale) (`attached_stack`) or None (the base model).

    If the greedy tokens equal `completion_ids`, greedy decoding would have produced exactly that completion.
    """
    ids = torch.tensor([prompt_ids + completion_ids])
    ctx = attached_stack(model, adapter) if isinstance(adapter, list) else attached_adapter(model, adapter)
    with ctx:
        logits = model(input_ids=ids).logits[0].float()  # [P + C, V]
    steps = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion_ids)]
    logprobs = torch.log_softmax(steps, dim=-1)
    greedy = steps.argmax(dim=-1).tolist()
    chosen = logprobs.gather(1, torch.tensor(completion_ids)[:, None])[:, 0].tolist()
    return greedy, chosen


def load_hf_model(path: str, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.eval()
    return model
