"""The `aligner/v1` adapter file: safetensors only, never pickle.

Tensors:
    prefix  [N, hidden]          the N shared prefix tokens P
    gate    [L - start_layer, H]  one raw gate per head per adapted layer
Metadata (all strings): format, start_layer, gate_activation, hidden_size, num_layers, num_heads,
base_model.

`decode` checks what a file says about itself (structure, dtypes, finite values); `check_fits` checks
it against the served model. The server stores the canonical re-encoding (`encode`), so the content hash
covers tensors and metadata, not an uploaded file's byte layout: two encodings of one adapter share one
identity inside the engine.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from aligner_core.errors import AdapterFormatError, AdapterMismatch
from aligner_core.model_spec import ModelSpec

FORMAT = "aligner/v1"
GATE_ACTIVATIONS = ("identity", "tanh")
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
REQUIRED_METADATA = (
    "format",
    "start_layer",
    "gate_activation",
    "hidden_size",
    "num_layers",
    "num_heads",
    "base_model",
)
_MAX_HEADER = 64 * 1024  # two tensors and a few strings never need more


@dataclass(frozen=True)
class Adapter:
    """One Aligner adapter, as stored and as sent to the engine."""

    prefix: torch.Tensor  # [N, hidden]
    gate: torch.Tensor  # [L - start_layer, H], raw (before gate_activation)
    start_layer: int
    gate_activation: str
    num_layers: int
    base_model: str

    @property
    def tokens(self) -> int:
        return int(self.prefix.shape[0])

    @property
    def params(self) -> int:
        return self.prefix.numel() + self.gate.numel()

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "start_layer": str(self.start_layer),
            "gate_activation": self.gate_activation,
            "hidden_size": str(self.prefix.shape[1]),
            "num_layers": str(self.num_layers),
            "num_heads": str(self.gate.shape[1]),
            "base_model": self.base_model,
        }

    def sha256(self) -> str:
        """Content hash: sha256 of the canonical encoding (tensors + metadata, deterministic layout).

        It is the adapter's immutable identity inside the engine, and `sha256sum` of the stored file.
        """
        return hashlib.sha256(encode(self)).hexdigest()

    def gate_values(self) -> torch.Tensor:
        """Gates after the activation, float32: [L - start_layer, H]."""
        g = self.gate.float()
        return torch.tanh(g) if self.gate_activation == "tanh" else g

    @classmethod
    def random(
        cls,
        spec: ModelSpec,
        *,
        tokens: int = 1,
        start_layer: int = 2,
        gate_activation: str = "identity",
        prefix_scale: float = 1.0,
        gate_scale: float = 0.05,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Adapter:
        """A random adapter of realistic scale: P ~ N(0, s^2), gates ~ U(-g, g). For tests and benches."""
        gen = torch.Generator().manual_seed(seed)
        prefix = torch.randn(tokens, spec.hidden_size, generator=gen) * prefix_scale
        gate = (torch.rand(spec.num_layers - start_layer, spec.num_heads, generator=gen) * 2 - 1) * gate_scale
        return cls(
            prefix=prefix.to(dtype),
            gate=gate.to(dtype),
            start_layer=start_layer,
            gate_activation=gate_activation,
            num_layers=spec.num_layers,
            base_model=spec.identity,
        )


def encode(adapter: Adapter) -> bytes:
    """Serialise to aligner/v1 safetensors bytes, deterministically.

    The safetensors library writes metadata in hash-map order, which differs between calls; the content
    hash needs one canonical layout, so the (simple) container is written here: an 8-byte little-endian
    header length, a JSON header with sorted keys padded to 8 bytes, then the raw tensors in name order.
    """
    codes = {v: k for k, v in DTYPES.items()}
    header: dict = {"__metadata__": adapter.metadata()}
    chunks: list[bytes] = []
    offset = 0
    for name, t in sorted({"gate": adapter.gate, "prefix": adapter.prefix}.items()):
        t = t.detach().contiguous().cpu()
        if t.dtype not in codes:
            raise AdapterFormatError(
                f"tensor '{name}' has dtype {t.dtype}; allowed: float32, bfloat16, float16", param=name
            )
        raw = t.view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def save(adapter: Adapter, path: str | Path) -> None:
    Path(path).write_bytes(encode(adapter))


def load(path: str | Path, *, max_bytes: int | None = None) -> Adapter:
    return decode(Path(path).read_bytes(), max_bytes=max_bytes)


def _read_header(data: bytes) -> dict:
    """Parse the safetensors JSON header ourselves, so that a bad file gets a message a person can act on."""
    if len(data) < 8:
        raise AdapterFormatError(f"not a safetensors file: only {len(data)} bytes", param="file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or n > len(data) - 8:
        hint = " (a pickle or zip file?)" if data[:2] in (b"\x80\x02", b"\x80\x04", b"PK") else ""
        raise AdapterFormatError(
            f"not a safetensors file: header claims {n} bytes but the file has {len(data)}{hint}", param="file"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: "[[[[..." nesting
        raise AdapterFormatError(f"not a safetensors file: header is not JSON ({e})", param="file") from None
    if not isinstance(header, dict):
        raise AdapterFormatError("not a safetensors file: header is not a JSON object", param="file")
    return header


def _int_meta(meta: dict[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise AdapterFormatError(f"metadata '{key}' must be an integer, got {meta[key]!r}", param=key) from None


def decode(data: bytes, *, max_bytes: int | None = None) -> Adapter:
    """Parse and structurally validate aligner/v1 bytes. Raises AdapterFormatError."""
    if max_bytes is not None and len(data) > max_bytes:
        raise AdapterFormatError(f"adapter file is {len(data)} bytes; the limit is {max_bytes}", param="file")
    header = _read_header(data)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFormatError("safetensors metadata must map strings to strings", param="metadata")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise AdapterFormatError(f"metadata is missing {', '.join(missing)}", param="metadata")
    if meta["format"] != FORMAT:
        raise AdapterFormatError(f"metadata format is {meta['format']!r}; expected {FORMAT!r}", param="format")
    if set(header) != {"prefix", "gate"}:
        raise AdapterFormatError(
            f"expected exactly the tensors 'prefix' and 'gate', found {sorted(header)}", param="tensors"
        )
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
            got = info.get("dtype") if isinstance(info, dict) else info
            raise AdapterFormatError(f"tensor '{name}' has dtype {got!r}; allowed: {', '.join(DTYPES)}", param=name)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type for every malformed layout
        raise AdapterFormatError(f"not a valid safetensors file: {e}", param="file") from None
    prefix, gate = tensors["prefix"], tensors["gate"]
    if prefix.dim() != 2 or prefix.shape[0] < 1:
        raise AdapterFormatError(f"prefix must be [N, hidden] with N >= 1, got {list(prefix.shape)}", param="prefix")
    if gate.dim() != 2:
        raise AdapterFormatError(f"gate must be [layers, heads], got {list(gate.shape)}", param="gate")
    for name, t in (("prefix", prefix), ("gate", gate)):
        if not torch.isfinite(t.float()).all():
            raise AdapterFormatError(f"tensor '{name}' contains NaN or infinite values", param=name)
    if meta["gate_activation"] not in GATE_ACTIVATIONS:
        raise AdapterFormatError(
            f"gate_activation {meta['gate_activation']!r} is not one of {', '.join(GATE_ACTIVATIONS)}",
            param="gate_activation",
        )
    start, layers = _int_meta(meta, "start_layer"), _int_meta(meta, "num_layers")
    hidden, heads = _int_meta(meta, "hidden_size"), _int_meta(meta, "num_heads")
    if not 0 <= start < layers:
        raise AdapterFormatError(f"start_layer {start} must be in [0, num_layers={layers})", param="start_layer")
    expect_gate = [layers - start, heads]
    if list(gate.shape) != expect_gate:
        raise AdapterFormatError(
            f"gate has shape {list(gate.shape)}; metadata says [num_layers - start_layer, num_heads] = {expect_gate}",
            param="gate",
        )
    if prefix.shape[1] != hidden:
        raise AdapterFormatError(f"prefix has hidden size {prefix.shape[1]}; metadata says {hidden}", param="prefix")
    return Adapter(
        prefix=prefix,
        gate=gate,
        start_layer=start,
        gate_activation=meta["gate_activation"],
        num_layers=layers,
        base_model=meta["base_model"],
    )


def check_fits(adapter: Adapter, spec: ModelSpec, *, max_tokens: int) -> None:
    """Refuse an adapter made for another model, or one with more prefix tokens than the server allows."""
    if adapter.base_model != spec.identity:
        raise AdapterMismatch(
            f"adapter was made for base model {adapter.base_model!r}, but this server serves {spec.identity!r}",
            param="base_model",
        )
    shape = (adapter.prefix.shape[1], adapter.num_layers, adapter.gate.shape[1])
    want = (spec.hidden_size, spec.num_layers, spec.num_heads)
    if shape != want:
        raise AdapterMismatch(
            f"adapter shape (hidden, layers, heads) = {shape} does not match the served model's {want}",
            param="prefix",
        )
    if adapter.tokens > max_tokens:
        raise AdapterFormatError(
            f"adapter has {adapter.tokens} prefix tokens; this server allows at most {max_tokens}", param="prefix"
        )
