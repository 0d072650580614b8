"""The Aligner forward on Hugging Face `transformers` Llama-family models: ground truth and training path.

Independent of vLLM. Each attention layer l >= start_layer adds, per head, before o_proj:
    g_l[h] * softmax_N(q_t @ K_p.T * scale) @ V_p,   K_p = k_proj(P), V_p = v_proj(P)  (no RoPE, no mask)
The prefix and gate are used by reference, so `nn.Parameter`s attached here train through it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from aligner_core.adapter_format import Adapter


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no Llama-style attention modules")
    return mods


def aligner_term(
    q: torch.Tensor,  # [B, H, T, D] post-RoPE queries
    prefix: torch.Tensor,  # [N, hidden]
    gate: torch.Tensor,  # [H] after activation
    attn: nn.Module,  # the HF attention module (k_proj, v_proj, head_dim, scaling)
) -> torch.Tensor:  # [B, T, H, D]
    H, D = q.shape[1], attn.head_dim
    kp = attn.k_proj(prefix.to(attn.k_proj.weight.dtype)).view(prefix.shape[0], -1, D)  # [N, KVH, D]
    vp = attn.v_proj(prefix.to(attn.v_proj.weight.dtype)).view(prefix.shape[0], -1, D)
    if hasattr(attn, "k_norm"):
        kp = attn.k_norm(kp)
    group = H // kp.shape[1]
    kp = kp.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, N, D]
    vp = vp.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q, kp.transpose(-1, -2).unsqueeze(0)) * attn.scaling  # [B, H, T, N]
    a = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), vp.unsqueeze(0))  # [B, H, T, D]
    return (gate.to(a.dtype)[None, :, None, None] * a).transpose(1, 2)


def _forward_with_aligner(self: nn.Module, hidden_states: torch.Tensor, position_embeddings: Any = None,
                          attention_mask: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any):
    from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, apply_rotary_pos_emb, eager_attention_forward

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
    ad = self._aligner
    if ad is not None and self.layer_idx >= ad["start_layer"]:
        gate = ad["gate"][self.layer_idx - ad["start_layer"]]
        gate = torch.tanh(gate) if ad["gate_activation"] == "tanh" else gate
        out = out + aligner_term(q, ad["prefix"], gate, self)
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
    mods = _attention_modules(model)
    state = {"prefix": prefix, "gate": gate, "start_layer": start_layer, "gate_activation": gate_activation}
    for m in mods:
        m._aligner = state
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


@torch.no_grad()
def teacher_forced(
    model: nn.Module, adapter: Adapter | None, prompt_ids: list[int], completion_ids: list[int]
) -> tuple[list[int], list[float]]:
    """One forward over prompt + completion: the greedy token and the completion token's logprob at each step.

    If the greedy tokens equal `completion_ids`, greedy decoding would have produced exactly that completion.
    """
    ids = torch.tensor([prompt_ids + completion_ids])
    with attached_adapter(model, adapter):
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
