"""Encode an `aligner/v1` adapter file from tensors, without the server's code.

Accepts torch tensors (float32, bfloat16, float16), numpy arrays (float32, float16) or nested lists of
floats (written as float32); torch and numpy are imported only if the caller's values are theirs. The
layout is the server's canonical one (8-byte little-endian header length, JSON header with sorted keys
padded to 8 bytes with spaces, then the tensors in name order), so the bytes' sha256 equals the
`sha256` the server reports for the upload.

    prefix  [N, hidden]            N prefix tokens shared by all adapted layers
    gate    [num_layers - start_layer, num_heads]
    metadata  format=aligner/v1, start_layer, gate_activation (identity|tanh), hidden_size,
              num_layers, num_heads, base_model
"""

from __future__ import annotations

import json
import struct
from typing import Any

FORMAT = "aligner/v1"
GATE_ACTIVATIONS = ("identity", "tanh")


def _shape(x: Any) -> list[int]:
    if hasattr(x, "shape"):
        return [int(d) for d in x.shape]
    if isinstance(x, (list, tuple)):
        rows = [list(r) for r in x]
        widths = {len(r) for r in rows}
        if len(widths) > 1:
            raise ValueError("ragged nested list: every row must have the same length")
        return [len(rows), widths.pop() if widths else 0]
    raise TypeError(f"expected a torch tensor, a numpy array or a nested list, got {type(x).__name__}")


def _raw(name: str, x: Any) -> tuple[str, bytes]:
    """(safetensors dtype code, little-endian bytes) of a 2-D value."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        import torch

        torch_codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
        if x.dtype not in torch_codes:
            raise ValueError(f"tensor '{name}' has dtype {x.dtype}; allowed: float32, bfloat16, float16")
        t = x.detach().contiguous().cpu()
        return torch_codes[x.dtype], t.view(torch.uint8).numpy().tobytes()
    if mod == "numpy":
        import numpy as np

        np_codes = {np.dtype("float32"): ("F32", "<f4"), np.dtype("float16"): ("F16", "<f2")}
        if x.dtype not in np_codes:
            raise ValueError(f"array '{name}' has dtype {x.dtype}; allowed: float32, float16")
        code, le = np_codes[x.dtype]
        return code, np.ascontiguousarray(x, dtype=le).tobytes()
    flat = [float(v) for row in x for v in row]
    return "F32", struct.pack(f"<{len(flat)}f", *flat)


def encode_adapter(
    prefix: Any, gate: Any, *, start_layer: int = 2, gate_activation: str = "identity", base_model: str
) -> bytes:
    """aligner/v1 safetensors bytes for `prefix` [N, hidden] and `gate` [num_layers - start_layer, num_heads]."""
    ps, gs = _shape(prefix), _shape(gate)
    if len(ps) != 2 or ps[0] < 1 or ps[1] < 1:
        raise ValueError(f"prefix must be [N, hidden] with N >= 1, got {ps}")
    if len(gs) != 2 or gs[0] < 1 or gs[1] < 1:
        raise ValueError(f"gate must be [num_layers - start_layer, num_heads], got {gs}")
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    if start_layer < 0:
        raise ValueError("start_layer must be >= 0")
    if not base_model:
        raise ValueError("base_model is required: the id of the server's base model (GET /v1/models)")
    metadata = {
        "format": FORMAT,
        "start_layer": str(start_layer),
        "gate_activation": gate_activation,
        "hidden_size": str(ps[1]),
        "num_layers": str(gs[0] + start_layer),
        "num_heads": str(gs[1]),
        "base_model": base_model,
    }
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    offset = 0
    for name, value, shape in (("gate", gate, gs), ("prefix", prefix, ps)):
        code, raw = _raw(name, value)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)
