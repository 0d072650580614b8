"""aligner/v1: encoding, identity, and every way a file can be refused."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save
from support import tiny_spec

from aligner_core.adapter_format import Adapter, check_fits, decode, encode
from aligner_core.errors import AdapterFormatError, AdapterMismatch

SPEC = tiny_spec()


def _raw(tensors: dict, metadata: dict) -> bytes:
    return st_save(tensors, metadata=metadata)


def _good() -> Adapter:
    return Adapter.random(SPEC, tokens=2, start_layer=1, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_keeps_values_and_dtype(dtype: torch.dtype) -> None:
    a = Adapter.random(SPEC, tokens=3, start_layer=0, dtype=dtype)
    b = decode(encode(a))
    assert b.prefix.dtype == dtype and torch.equal(b.prefix, a.prefix) and torch.equal(b.gate, a.gate)
    assert b.metadata() == a.metadata()
    assert (b.tokens, b.params) == (3, 3 * 64 + 4 * 4)


def test_encoding_is_canonical_so_the_hash_is_content() -> None:
    a = _good()
    other_layout = _raw({"prefix": a.prefix, "gate": a.gate}, a.metadata())  # library layout, random meta order
    assert decode(other_layout).sha256() == a.sha256() == decode(encode(a)).sha256()
    changed = Adapter(a.prefix + 1e-3, a.gate, a.start_layer, a.gate_activation, a.num_layers, a.base_model)
    assert changed.sha256() != a.sha256()
    tanh = Adapter(a.prefix, a.gate, a.start_layer, "tanh", a.num_layers, a.base_model)
    assert tanh.sha256() != a.sha256()


def test_smollm_param_count() -> None:
    spec = tiny_spec(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)
    assert (
        Adapter.random(spec, tokens=1, start_layer=2).params == 828
    )  # one prefix token (576) + a gate per head (9) for each of the 28 layers from 2 on


def test_check_fits_accepts_its_own_model() -> None:
    check_fits(_good(), SPEC, max_tokens=16)


def _expect(data: bytes, match: str) -> AdapterFormatError:
    with pytest.raises(AdapterFormatError, match=match) as e:
        decode(data, max_bytes=1 << 20)
    return e.value


def test_wrong_gate_shape() -> None:
    a = _good()
    _expect(_raw({"prefix": a.prefix, "gate": torch.zeros(2, 4)}, a.metadata()), r"gate has shape \[2, 4\]")


def test_wrong_hidden_size() -> None:
    a = _good()
    _expect(_raw({"prefix": torch.zeros(2, 32), "gate": a.gate}, a.metadata()), "hidden size 32")


def test_nan_and_inf_refused() -> None:
    a = _good()
    p = a.prefix.clone()
    p[0, 0] = float("nan")
    assert _expect(_raw({"prefix": p, "gate": a.gate}, a.metadata()), "NaN").param == "prefix"
    g = a.gate.clone()
    g[0, 0] = float("inf")
    assert _expect(_raw({"prefix": a.prefix, "gate": g}, a.metadata()), "NaN or infinite").param == "gate"


def test_pickle_renamed_safetensors() -> None:
    err = _expect(pickle.dumps({"prefix": [1.0]}), "not a safetensors file")
    assert "pickle" in err.message
    err = _expect(b"PK\x03\x04" + b"\0" * 100, "not a safetensors file")


def test_truncated_file() -> None:
    data = encode(_good())
    _expect(data[: len(data) - 10], "not a valid safetensors file")
    _expect(data[:5], "only 5 bytes")


def test_header_lies_about_sizes() -> None:
    a = _good()
    text = json.dumps(
        {
            "prefix": {"dtype": "F32", "shape": [100000, 64], "data_offsets": [0, 25600000]},
            "gate": {"dtype": "F32", "shape": [3, 4], "data_offsets": [25600000, 25600048]},
            "__metadata__": a.metadata(),
        }
    ).encode()
    _expect(struct.pack("<Q", len(text)) + text + b"\0" * 64, "not a valid safetensors file")


def test_wrong_dtype_and_extra_tensors() -> None:
    a = _good()
    _expect(_raw({"prefix": a.prefix.to(torch.int32), "gate": a.gate}, a.metadata()), "dtype 'I32'")
    _expect(_raw({"prefix": a.prefix, "gate": a.gate, "x": torch.zeros(1)}, a.metadata()), "exactly the tensors")


def test_incomplete_or_wrong_metadata() -> None:
    a = _good()
    meta = a.metadata()
    del meta["base_model"]
    _expect(_raw({"prefix": a.prefix, "gate": a.gate}, meta), "missing base_model")
    _expect(_raw({"prefix": a.prefix, "gate": a.gate}, a.metadata() | {"format": "lora"}), "format is 'lora'")
    _expect(_raw({"prefix": a.prefix, "gate": a.gate}, a.metadata() | {"gate_activation": "relu"}), "gate_activation")
    _expect(_raw({"prefix": a.prefix, "gate": a.gate}, a.metadata() | {"start_layer": "x"}), "must be an integer")


def test_oversized() -> None:
    with pytest.raises(AdapterFormatError, match="limit is 100"):
        decode(encode(_good()), max_bytes=100)


def test_other_base_model_named_in_message() -> None:
    a = _good()
    other = Adapter(a.prefix, a.gate, a.start_layer, a.gate_activation, a.num_layers, "Other-Model:abc")
    with pytest.raises(AdapterMismatch) as e:
        check_fits(other, SPEC, max_tokens=16)
    assert "Other-Model:abc" in e.value.message and SPEC.identity in e.value.message


def test_too_many_tokens_for_the_server() -> None:
    with pytest.raises(AdapterFormatError, match="at most 1"):
        check_fits(_good(), SPEC, max_tokens=1)


def test_shape_of_another_model() -> None:
    big = tiny_spec(num_heads=8)
    a = Adapter.random(big, tokens=1, start_layer=0)
    a = Adapter(a.prefix, a.gate, a.start_layer, a.gate_activation, a.num_layers, SPEC.identity)
    with pytest.raises(AdapterMismatch, match="does not match"):
        check_fits(a, SPEC, max_tokens=4)
