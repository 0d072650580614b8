"""Aligner model classes: the stock vLLM model, with every attention layer adding the Aligner term.

The class of each `Attention` instance is swapped to a subclass (same object, same registration name,
same KV cache binding) while the model is built, so torch.compile traces the term from the start;
patching after load would be silently ignored by a compiled graph.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, cast

import torch

import server.engine.op  # noqa: F401  registers torch.ops.aligner.apply_
from server.engine import kernels
from server.engine.config import AlignerEngineConfig
from server.engine.op import WorkerState, apply_term, set_worker_state
from server.engine.routing import Routing
from server.engine.table import AdapterTable, LayerHandle, TableShape
from server.engine.vllm_glue import (
    Attention,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    VllmConfig,
    extract_layer_index,
    get_tensor_model_parallel_rank,
)

log = logging.getLogger(__name__)

_attention_classes: dict[type, type] = {}


def _aligner_attention(base: type[Attention]) -> type:
    """A subclass of `base` whose forward adds the Aligner term to the attention output."""
    if base not in _attention_classes:

        def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
            out = base.forward(self, query, key, value, *args, **kwargs)  # [T, H*D]
            if torch.compiler.is_compiling():
                torch.ops.aligner.apply_(out, query, self.aligner_layer)
            else:
                apply_term(out, query, self.aligner_layer)  # eager: no dispatcher round trip
            return out

        _attention_classes[base] = type(f"Aligner{base.__name__}", (base,), {"forward": forward})
    return _attention_classes[base]


def install(model: torch.nn.Module, vllm_config: VllmConfig) -> WorkerState:
    """Swap the attention classes and build this worker's adapter table."""
    # vLLM types additional_config `dict | SupportsHash`; the engine's is a dict (plugin args, or empty)
    cfg = AlignerEngineConfig.from_additional_config(cast("dict[str, Any]", vllm_config.additional_config))
    handles: list[LayerHandle] = []
    attn0: Attention | None = None
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if not isinstance(attn, Attention) or not hasattr(module, "qkv_proj"):
            continue
        index = extract_layer_index(attn.layer_name)
        attn.__class__ = _aligner_attention(type(attn))
        cast(Any, attn).aligner_layer = index  # an attribute of the Aligner subclass, not typed on Attention
        handles.append(
            LayerHandle(
                index=index,
                qkv_proj=cast(torch.nn.Module, module.qkv_proj),
                k_norm=getattr(module, "k_norm", None),
                q_size=attn.num_heads * attn.head_size,
                kv_size=attn.num_kv_heads * attn.head_size,
            )
        )
        attn0 = attn0 or attn
    if attn0 is None:
        raise RuntimeError(f"{type(model).__name__} has no attention layer with qkv_proj; Aligner cannot attach")
    param = next(model.parameters())
    shape = TableShape(
        num_layers=max(h.index for h in handles) + 1,
        num_heads=attn0.num_heads,
        num_kv_heads=attn0.num_kv_heads,
        head_dim=attn0.head_size,
        head_offset=get_tensor_model_parallel_rank() * attn0.num_heads,
        max_slots=cfg.max_slots,
        max_tokens=cfg.max_tokens,
        cold_slots=cfg.cold_slots,
        # one per batch row and lane (a row's stack stages each of its cold adapters)
        scratch=vllm_config.scheduler_config.max_num_seqs * cfg.max_stack if cfg.cold_slots else 0,
    )
    dtype = cast(torch.dtype, vllm_config.model_config.dtype)  # resolved to a torch.dtype by ModelConfig
    kernel = kernels.choose(cfg.path, param.device, dtype, attn0.head_size, cfg.max_tokens)
    # The C kernel reads a bfloat16 model's K_p/V_p in bfloat16 (exact: they are projected in it); the
    # torch and Triton kernels read float32.
    kv_dtype = dtype if kernel == "cpu" and dtype == torch.bfloat16 else torch.float32
    table = AdapterTable(shape, handles, device=param.device, dtype=dtype, kv_dtype=kv_dtype)
    routing = Routing(vllm_config.scheduler_config.max_num_seqs, lanes=cfg.max_stack)
    state = WorkerState(table=table, routing=routing, scale=1.0 / math.sqrt(attn0.head_size), kernel=kernel)
    if kernel == "triton" and cfg.routing == "v2":  # vLLM may capture the op in CUDA graphs: see op.py
        state.enable_graphs(max(vllm_config.scheduler_config.max_num_batched_tokens, _largest_capture(vllm_config)))
    log.info("Aligner op: kernel %s (routing %s)", state.kernel_mode, cfg.routing)
    set_worker_state(state)
    return state


def _largest_capture(vllm_config: VllmConfig) -> int:
    """The most tokens a captured CUDA graph runs (its padded batch), 0 without graphs."""
    return int(getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0)


if TYPE_CHECKING:
    _MixinBase = torch.nn.Module  # the mixin comes before a vLLM model class, an nn.Module
else:
    _MixinBase = object


class AlignerMixin(_MixinBase):
    """Build the base model, then attach the Aligner term. V2 runners get our ModelState."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install(self, vllm_config)

    def get_model_state_cls(self) -> type:
        from server.engine.routing_v2 import AlignerModelState

        return AlignerModelState


class AlignerLlamaForCausalLM(AlignerMixin, LlamaForCausalLM):
    pass


class AlignerMistralForCausalLM(AlignerMixin, MistralForCausalLM):
    pass


class AlignerQwen2ForCausalLM(AlignerMixin, Qwen2ForCausalLM):
    pass


class AlignerQwen3ForCausalLM(AlignerMixin, Qwen3ForCausalLM):
    pass
