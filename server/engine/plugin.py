"""The `vllm.general_plugins` entry point: registers the Aligner model classes.

Registration is lazy (classes named by "module:Class" strings) and opt-in: an engine only uses them when
`hf_overrides` names an Aligner architecture, so other engines in the same process are untouched.
"""

from __future__ import annotations

# Base architectures whose attention modules have the `qkv_proj` + `attn` layout the Aligner term needs.
BASE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_registered = False


def aligner_architecture(base: str) -> str:
    return f"Aligner{base}"


def register() -> None:
    """Re-entrant: vLLM calls it once per process; a second call does nothing."""
    global _registered
    if _registered:
        return
    from server.engine.vllm_glue import ModelRegistry

    for base in BASE_ARCHITECTURES:
        name = aligner_architecture(base)
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"server.engine.model:{name}")
    _registered = True
