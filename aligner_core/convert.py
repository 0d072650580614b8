"""Import the paper authors' released Aligner checkpoints (Lit-LLaMA format) into `aligner/v1`.

The reference implementation of "Aligner: One Global Token is Worth Millions of Parameters When
Aligning Large Language Models" (arXiv 2312.05503) saves a Lit-LLaMA torch checkpoint holding:

    global_value_embedding.weight              [N, hidden]     the shared prefix tokens P
    transformer.h.{l}.attn.gating_factor       [1, H, 1, 1]    raw per-head gates, l = start..L-1
    transformer.h.{l}.attn.adapter_wte.weight  [N, hidden]     P again, tied (no extra parameters)

Those files are pickles inside a zip. They are read here only with `torch.load(weights_only=True)`,
which unpickles nothing but tensors and plain containers; anything else is refused, never retried with
the full unpickler. The paper applies the gates raw (no tanh), so the result has gate_activation
"identity".

CLI: `aligner convert SRC -o DST [--base-model ID] [--dtype float32|bfloat16|float16]`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

from aligner_core.adapter_format import DTYPES, Adapter, save
from aligner_core.errors import AdapterFormatError, AlignerError
from aligner_core.model_spec import ModelSpec

# The adapter checkpoints are a few hundred KiB; a file this large is something else (a full model).
MAX_CHECKPOINT_BYTES = 512 * 1024 * 1024

PREFIX_KEY = "global_value_embedding.weight"
_GATE_RE = re.compile(r"^transformer\.h\.(\d+)\.attn\.gating_factor$")
_WTE_RE = re.compile(r"^transformer\.h\.(\d+)\.attn\.adapter_wte\.weight$")

# meta-llama/Llama-2-7b-hf config.json, the keys that decide the model identity (ModelSpec fingerprint).
LLAMA2_7B_NAME = "Llama-2-7b-hf"
LLAMA2_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "model_type": "llama",
    "hidden_act": "silu",
}

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama2_7b_spec() -> ModelSpec:
    """The ModelSpec of LLaMA-2-7B (the base model of the released checkpoints)."""
    return ModelSpec.from_config(LLAMA2_7B_CONFIG, name=LLAMA2_7B_NAME)


def llama2_7b_base_model() -> str:
    """`Llama-2-7b-hf:<fingerprint>`: the default `base_model` of a converted checkpoint."""
    return llama2_7b_spec().identity


def _load_state_dict(path: Path) -> dict:
    """Read a torch checkpoint with the restricted (weights-only) unpickler, or refuse it."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file", param="file")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise AdapterFormatError(
            f"{path} is {size} bytes; an Aligner checkpoint is far smaller "
            f"(limit {MAX_CHECKPOINT_BYTES} bytes), so it was not loaded",
            param="file",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError/EOFError/... for garbage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterFormatError(
            f"{path} is not a plain tensor checkpoint (weights-only loading refused it: {first}); "
            "it was not loaded, and will not be loaded with the unrestricted unpickler",
            param="file",
        ) from None
    if not isinstance(obj, dict):
        raise AdapterFormatError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)", param="file"
        )
    for k, v in obj.items():
        if not isinstance(k, str):
            raise AdapterFormatError(f"{path}: state dict key {k!r} is not a string", param="file")
        if not isinstance(v, torch.Tensor):
            raise AdapterFormatError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor", param=k)
    return obj


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise AdapterFormatError(f"tensor '{name}' has dtype {t.dtype}; expected a floating-point tensor", param=name)
    if not torch.isfinite(t.float()).all():
        raise AdapterFormatError(f"tensor '{name}' contains NaN or infinite values", param=name)


def convert_lit_llama(
    path: str | Path,
    *,
    base_model: str,
    num_layers: int = 32,
    num_heads: int = 32,
    hidden_size: int = 4096,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """Convert a released Lit-LLaMA Aligner checkpoint into an `aligner/v1` Adapter.

    `base_model` is the identity of the model the checkpoint was trained on (for the released
    LLaMA-2-7B files: `llama2_7b_base_model()`). The checkpoint's dtype (bf16) is kept unless `dtype`
    is given. Raises AdapterFormatError for anything that is not a tied, complete Aligner checkpoint.
    """
    path = Path(path)
    sd = _load_state_dict(path)

    if PREFIX_KEY not in sd:
        raise AdapterFormatError(f"{path}: no '{PREFIX_KEY}' (the prefix P); not an Aligner checkpoint", param="prefix")
    prefix = sd[PREFIX_KEY]
    _check_float(PREFIX_KEY, prefix)
    if prefix.dim() != 2 or prefix.shape[0] < 1 or prefix.shape[1] != hidden_size:
        raise AdapterFormatError(
            f"'{PREFIX_KEY}' has shape {list(prefix.shape)}; expected [N >= 1, {hidden_size}]", param="prefix"
        )

    gates: dict[int, torch.Tensor] = {}
    wtes: dict[int, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        if key == PREFIX_KEY:
            continue
        if m := _GATE_RE.match(key):
            gates[int(m.group(1))] = t
        elif m := _WTE_RE.match(key):
            wtes[int(m.group(1))] = t
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise AdapterFormatError(
            f"{path}: {len(unknown)} unexpected entries ({shown}); an Aligner checkpoint holds only the "
            "prefix, the gating factors and the tied adapter_wte copies",
            param="file",
        )
    if not gates:
        raise AdapterFormatError(f"{path}: no 'transformer.h.<l>.attn.gating_factor' entries", param="gate")

    bad = sorted(layer for layer in set(gates) | set(wtes) if layer >= num_layers)
    if bad:
        raise AdapterFormatError(
            f"{path}: entries for layer {bad[0]}, but the model has num_layers={num_layers}", param="gate"
        )
    start = min(gates)
    missing = [layer for layer in range(start, num_layers) if layer not in gates]
    if missing:
        raise AdapterFormatError(
            f"{path}: missing 'transformer.h.{missing[0]}.attn.gating_factor' "
            f"(gates are needed for every layer {start}..{num_layers - 1}; missing layers {missing})",
            param="gate",
        )

    rows = []
    for layer in range(start, num_layers):
        g = gates[layer]
        name = f"transformer.h.{layer}.attn.gating_factor"
        _check_float(name, g)
        if list(g.shape) != [1, num_heads, 1, 1]:
            raise AdapterFormatError(
                f"'{name}' has shape {list(g.shape)}; expected [1, {num_heads}, 1, 1]", param="gate"
            )
        rows.append(g.reshape(num_heads))
    gate_dtypes = {r.dtype for r in rows}
    if len(gate_dtypes) != 1:
        raise AdapterFormatError(
            f"{path}: gating factors have mixed dtypes {sorted(map(str, gate_dtypes))}", param="gate"
        )
    gate = torch.stack(rows)

    for layer in sorted(wtes):
        w = wtes[layer]
        name = f"transformer.h.{layer}.attn.adapter_wte.weight"
        if w.shape != prefix.shape or w.dtype != prefix.dtype or not torch.equal(w, prefix):
            raise AdapterFormatError(
                f"'{name}' differs from '{PREFIX_KEY}': this checkpoint has per-layer prefixes, "
                "which aligner/v1 (one global prefix shared by all layers) cannot represent",
                param="prefix",
            )

    if dtype is not None:
        prefix, gate = prefix.to(dtype), gate.to(dtype)
    for name, t in (("prefix", prefix), ("gate", gate)):
        if t.dtype not in DTYPES.values():
            raise AdapterFormatError(
                f"{name} has dtype {t.dtype}; aligner/v1 allows float32, bfloat16, float16 (pass dtype=...)",
                param=name,
            )
    return Adapter(
        prefix=prefix.detach().clone().contiguous(),
        gate=gate.detach().clone().contiguous(),
        start_layer=start,
        gate_activation="identity",
        num_layers=num_layers,
        base_model=base_model,
    )


def main(argv: list[str] | None = None) -> int:
    """`aligner convert SRC -o DST`: write an aligner/v1 file from a released Lit-LLaMA checkpoint."""
    parser = argparse.ArgumentParser(
        prog="aligner convert",
        description="Convert a released Lit-LLaMA Aligner checkpoint (.pth) into an aligner/v1 safetensors file. "
        "The checkpoint is read with torch.load(weights_only=True) only.",
    )
    parser.add_argument("src", metavar="SRC", help="Lit-LLaMA Aligner checkpoint (.pth)")
    parser.add_argument("-o", "--output", metavar="DST", required=True, help="aligner/v1 file to write")
    parser.add_argument(
        "--base-model",
        default=None,
        help=f"identity of the base model (default: LLaMA-2-7B, {llama2_7b_base_model()})",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: keep the checkpoint's")
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=4096)
    args = parser.parse_args(argv)

    try:
        adapter = convert_lit_llama(
            args.src,
            base_model=args.base_model or llama2_7b_base_model(),
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            hidden_size=args.hidden_size,
            dtype=DTYPE_NAMES[args.dtype] if args.dtype else None,
        )
        dst = Path(args.output)
        save(adapter, dst)
    except (AlignerError, OSError) as e:
        print(f"aligner convert: error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {dst}: tokens={adapter.tokens} params={adapter.params} start_layer={adapter.start_layer} "
        f"dtype={str(adapter.prefix.dtype).removeprefix('torch.')} sha256={adapter.sha256()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
