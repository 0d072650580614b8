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

Shapes are read from the file (hidden size and N from P, heads from the gates, layers from the base model);
the base model is LLaMA-2 7B or 13B by the prefix's hidden size, or given. Older checkpoints with one gate
per layer (a scalar) have it spread over the heads, as the authors' loader does.

CLI: `aligner convert SRC -o DST [--base-model ID] [--dtype float32|bfloat16|float16]`; SRC may be a folder
(the authors' `out/...` tree): every *.pth under it is converted into the same layout under DST.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
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

# The keys of meta-llama/Llama-2-{7b,13b}-hf config.json that decide the model identity (the ModelSpec
# fingerprint): the base models of the authors' released checkpoints.
_LLAMA2_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "model_type": "llama",
    "hidden_act": "silu",
}


def _llama2_config(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        **_LLAMA2_COMMON,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,  # no GQA in LLaMA-2 7B and 13B
    }


LLAMA2_7B_NAME, LLAMA2_7B_CONFIG = "Llama-2-7b-hf", _llama2_config(4096, 11008, 32, 32)
LLAMA2_13B_NAME, LLAMA2_13B_CONFIG = "Llama-2-13b-hf", _llama2_config(5120, 13824, 40, 40)

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def known_bases() -> list[ModelSpec]:
    """The base models a checkpoint's shapes are matched against when no `--base-model` is given: the
    released checkpoints' (LLaMA-2 7B and 13B). Their hidden sizes differ, so the prefix decides."""
    return [
        ModelSpec.from_config(LLAMA2_7B_CONFIG, name=LLAMA2_7B_NAME),
        ModelSpec.from_config(LLAMA2_13B_CONFIG, name=LLAMA2_13B_NAME),
    ]


def llama2_7b_spec() -> ModelSpec:
    """The ModelSpec of LLaMA-2-7B (the base model of most released checkpoints)."""
    return known_bases()[0]


def llama2_7b_base_model() -> str:
    """`Llama-2-7b-hf:<fingerprint>`: the identity of a 7B-shaped checkpoint's base model."""
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


@dataclass
class Converted:
    """A converted checkpoint and what the conversion noticed on the way (shown by the CLI)."""

    adapter: Adapter
    notes: list[str] = field(default_factory=list)


def convert_lit_llama(path: str | Path, **options: Any) -> Adapter:
    """`convert_checkpoint(path, **options).adapter`."""
    return convert_checkpoint(path, **options).adapter


def convert_checkpoint(
    path: str | Path,
    *,
    base_model: str | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    hidden_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Converted:
    """Convert a released Lit-LLaMA Aligner checkpoint into an `aligner/v1` Adapter.

    The shapes come from the file: hidden size and N from the prefix, heads from the gates, the start
    layer from the first gate. The number of layers and the base model come from `base_model` when given
    (a known base's layer count, else one past the last gate), or else from the known base whose hidden
    size the prefix has (`known_bases()`: LLaMA-2 7B and 13B); a shape no known base has needs
    `base_model`, never a guess. The shape options, when given, must agree with the file. Old single-value
    gates are spread over the heads, as the authors' loader does. The checkpoint's dtype (bf16) is kept
    unless `dtype` is given. Raises AdapterFormatError for anything that is not a tied, complete Aligner
    checkpoint, naming the option to pass where one would help.
    """
    path = Path(path)
    sd = _load_state_dict(path)
    notes: list[str] = []

    if PREFIX_KEY not in sd:
        raise AdapterFormatError(f"{path}: no '{PREFIX_KEY}' (the prefix P); not an Aligner checkpoint", param="prefix")
    prefix = sd[PREFIX_KEY]
    _check_float(PREFIX_KEY, prefix)
    if prefix.dim() != 2 or prefix.shape[0] < 1:
        raise AdapterFormatError(
            f"'{PREFIX_KEY}' has shape {list(prefix.shape)}; expected [N >= 1, hidden]", param="prefix"
        )
    hidden = int(prefix.shape[1])
    if hidden_size is not None and hidden_size != hidden:
        raise AdapterFormatError(
            f"'{PREFIX_KEY}' has shape {list(prefix.shape)}, hidden size {hidden}, but --hidden-size is "
            f"{hidden_size}: drop --hidden-size (the file's own shape is used) or convert the right file",
            param="prefix",
        )

    gates, wtes = _entries(path, sd)
    start = min(gates)
    heads_in_file = _gate_heads(gates)
    base = _base(base_model, hidden, heads_in_file if heads_in_file is not None else num_heads)
    if base is not None and (base.hidden_size, base.num_heads) != (hidden, heads_in_file or base.num_heads):
        raise AdapterFormatError(
            f"{path}: the prefix has hidden size {hidden} and the gates {heads_in_file or 'single values'}, but "
            f"{base.name} has hidden size {base.hidden_size} and {base.num_heads} heads: this checkpoint was "
            "trained on another model; pass that model's --base-model",
            param="base_model",
        )
    layers = num_layers or (base.num_layers if base is not None else max(gates) + 1)
    heads = num_heads or heads_in_file or (base.num_heads if base is not None else None)
    if heads_in_file is not None and heads != heads_in_file:
        raise AdapterFormatError(
            f"the gating factors have {heads_in_file} heads ([1, {heads_in_file}, 1, 1]) but --num-heads is "
            f"{heads}: drop --num-heads (the file's own shape is used)",
            param="gate",
        )
    if heads is None:
        raise AdapterFormatError(
            f"{path}: the gates are single values (one per layer), and no known base model has hidden size "
            f"{hidden}: pass --num-heads (the base model's attention heads) and --base-model",
            param="gate",
        )
    identity = base_model or (base.identity if base is not None else None)
    if identity is None:
        known = ", ".join(f"{b.name} (hidden {b.hidden_size}, {b.num_heads} heads)" for b in known_bases())
        raise AdapterFormatError(
            f"{path}: no known base model has hidden size {hidden} with {heads} heads (known: {known}); pass "
            "--base-model with the identity of the model it was trained on (`<name>:<fingerprint>`, the id "
            "GET /v1/models lists)",
            param="base_model",
        )
    bad = sorted(layer for layer in set(gates) | set(wtes) if layer >= layers)
    if bad:
        raise AdapterFormatError(
            f"{path}: entries for layer {bad[0]}, but the model has {layers} layers "
            f"({'--num-layers' if num_layers else identity.split(':')[0]})",
            param="gate",
        )
    missing = [layer for layer in range(start, layers) if layer not in gates]
    if missing:
        raise AdapterFormatError(
            f"{path}: missing 'transformer.h.{missing[0]}.attn.gating_factor' "
            f"(gates are needed for every layer {start}..{layers - 1} of {identity.split(':')[0]}; "
            f"missing layers {missing})",
            param="gate",
        )

    gate = _gate_matrix(gates, start, layers, heads)
    if heads_in_file is None:
        notes.append(f"the gates are single values per layer (an older checkpoint): spread over the {heads} heads")
    _check_tied(prefix, wtes)
    if wtes:
        notes.append(f"the {len(wtes)} per-layer adapter_wte copies equal the global prefix (tied)")

    if dtype is not None:
        prefix, gate = prefix.to(dtype), gate.to(dtype)
    for name, t in (("prefix", prefix), ("gate", gate)):
        if t.dtype not in DTYPES.values():
            raise AdapterFormatError(
                f"{name} has dtype {t.dtype}; aligner/v1 allows float32, bfloat16, float16 (pass dtype=...)",
                param=name,
            )
    adapter = Adapter(
        prefix=prefix.detach().clone().contiguous(),
        gate=gate.detach().clone().contiguous(),
        start_layer=start,
        gate_activation="identity",
        num_layers=layers,
        base_model=identity,
    )
    return Converted(adapter, notes)


def _entries(path: Path, sd: dict) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The gating factors and the adapter_wte copies by layer; anything else in the file is refused."""
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
    for layer, g in gates.items():
        _check_float(f"transformer.h.{layer}.attn.gating_factor", g)
    return gates, wtes


def _gate_heads(gates: dict[int, torch.Tensor]) -> int | None:
    """The heads of per-head gates ([1, H, 1, 1]); None for single-value gates ([1] or [1, 1, 1, 1])."""
    shapes = {tuple(g.shape) for g in gates.values()}
    if len(shapes) != 1:
        raise AdapterFormatError(
            f"the gating factors have different shapes {sorted(map(list, shapes))}; expected one shape, "
            "[1, H, 1, 1] (one gate per head)",
            param="gate",
        )
    shape = shapes.pop()
    if shape in ((), (1,), (1, 1, 1, 1)):
        return None
    if len(shape) != 4 or shape[0] != 1 or shape[2:] != (1, 1):
        raise AdapterFormatError(
            f"the gating factors have shape {list(shape)}; expected [1, H, 1, 1] (one gate per head)", param="gate"
        )
    return shape[1]


def _base(base_model: str | None, hidden: int, heads: int | None) -> ModelSpec | None:
    """The known base model of this shape: the one named by `base_model` if it is known, else (none named)
    the one with this hidden size (and these heads, when the gates say); None when there is none."""
    for spec in known_bases():
        named = base_model is not None and base_model == spec.identity
        shaped = base_model is None and spec.hidden_size == hidden and heads in (None, spec.num_heads)
        if named or shaped:
            return spec
    return None


def _gate_matrix(gates: dict[int, torch.Tensor], start: int, layers: int, heads: int) -> torch.Tensor:
    """[layers - start, heads]: one row per adapted layer (single-value gates repeated over the heads)."""
    dtypes = {g.dtype for g in gates.values()}
    if len(dtypes) != 1:
        raise AdapterFormatError(f"the gating factors have mixed dtypes {sorted(map(str, dtypes))}", param="gate")
    return torch.stack([gates[layer].reshape(-1).expand(heads) for layer in range(start, layers)])


def _check_tied(prefix: torch.Tensor, wtes: dict[int, torch.Tensor]) -> None:
    """Each per-layer adapter_wte must be the global prefix again (the released files tie them)."""
    for layer in sorted(wtes):
        w = wtes[layer]
        name = f"transformer.h.{layer}.attn.adapter_wte.weight"
        if w.shape != prefix.shape or w.dtype != prefix.dtype or not torch.equal(w, prefix):
            raise AdapterFormatError(
                f"'{name}' differs from '{PREFIX_KEY}': this checkpoint has per-layer prefixes, "
                "which aligner/v1 (one global prefix shared by all layers) cannot represent",
                param="prefix",
            )


def main(argv: list[str] | None = None) -> int:
    """`aligner convert SRC -o DST`: write an aligner/v1 file from a released Lit-LLaMA checkpoint, or every
    checkpoint (*.pth) under a folder SRC into the same layout under DST."""
    parser = argparse.ArgumentParser(
        prog="aligner convert",
        description="Convert a released Lit-LLaMA Aligner checkpoint (.pth) into an aligner/v1 safetensors file. "
        "Shapes and the base model (LLaMA-2 7B or 13B) are read from the file; the checkpoint is read with "
        "torch.load(weights_only=True) only.",
    )
    parser.add_argument("src", metavar="SRC", help="Lit-LLaMA Aligner checkpoint (.pth), or a folder of them")
    parser.add_argument("-o", "--output", metavar="DST", required=True, help="aligner/v1 file (a folder for a folder)")
    parser.add_argument(
        "--base-model",
        default=None,
        help="identity of the base model (`<name>:<fingerprint>`); default: the known base model of the file's "
        f"shape ({', '.join(b.identity for b in known_bases())})",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: keep the checkpoint's")
    parser.add_argument("--num-layers", type=int, default=None, help="default: the base model's")
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="default: the gates' (needed only for single-value gates of an unknown base)",
    )
    parser.add_argument("--hidden-size", type=int, default=None, help="default: the prefix's (a check only)")
    args = parser.parse_args(argv)
    options = {
        "base_model": args.base_model,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "hidden_size": args.hidden_size,
        "dtype": DTYPE_NAMES[args.dtype] if args.dtype else None,
    }
    src, dst = Path(args.src), Path(args.output)
    if not src.is_dir():
        return _convert_one(src, dst, options)
    sources = sorted(src.rglob("*.pth"))
    if not sources:
        print(f"aligner convert: error: no *.pth under {src}", file=sys.stderr)
        return 1
    failed = sum(_convert_one(p, (dst / p.relative_to(src)).with_suffix(".safetensors"), options) for p in sources)
    print(f"converted {len(sources) - failed} of {len(sources)} checkpoints under {src} into {dst}")
    return 1 if failed else 0


def _convert_one(src: Path, dst: Path, options: dict[str, Any]) -> int:
    try:
        converted = convert_checkpoint(src, **options)
        dst.parent.mkdir(parents=True, exist_ok=True)
        save(converted.adapter, dst)
    except (AlignerError, OSError) as e:
        print(f"aligner convert: error: {e}", file=sys.stderr)
        return 1
    for note in converted.notes:
        print(f"aligner convert: {src.name}: {note}", file=sys.stderr)
    a = converted.adapter
    print(
        f"wrote {dst}: base_model={a.base_model} tokens={a.tokens} params={a.params} start_layer={a.start_layer} "
        f"layers={a.num_layers} heads={a.gate.shape[1]} dtype={str(a.prefix.dtype).removeprefix('torch.')} "
        f"sha256={a.sha256()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
