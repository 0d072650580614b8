"""Importer for the paper authors' released Lit-LLaMA Aligner checkpoints (aligner_core.convert)."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from aligner_core import convert as convert_mod
from aligner_core.adapter_format import decode, encode, load
from aligner_core.convert import (
    LLAMA2_7B_CONFIG,
    LLAMA2_13B_CONFIG,
    convert_checkpoint,
    convert_lit_llama,
    llama2_7b_base_model,
    main,
)
from aligner_core.errors import AdapterFormatError
from aligner_core.model_spec import ModelSpec

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-aligner"
RELEASED = {
    "alpaca-1token-llama2-7b.pth": (1, 5056),
    "beaver-dpo-1token-llama2-7b.pth": (1, 5056),
    "metamath-10token-llama2-7b.pth": (10, 41920),
}
BASE = llama2_7b_base_model()


@pytest.fixture(scope="module")
def fixtures() -> Path:
    missing = [n for n in RELEASED if not (FIXTURES / n).is_file()]
    if missing:
        msg = f"released Aligner checkpoints not found in {FIXTURES} (missing {', '.join(missing)})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires them")
        pytest.skip(msg)
    return FIXTURES


def _reference(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _synthetic(
    tokens: int = 1, start: int = 2, layers: int = 32, heads: int = 32, hidden: int = 4096, gate_shape=None
) -> dict:
    """A state dict in the released layout (tied adapter_wte shares P's storage, as in the real files);
    `gate_shape` (default [1, heads, 1, 1]) makes older single-value gates ([1], [1, 1, 1, 1])."""
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    sd = {"global_value_embedding.weight": p}
    for layer in range(start, layers):
        sd[f"transformer.h.{layer}.attn.gating_factor"] = (
            torch.randn(*(gate_shape or (1, heads, 1, 1)), generator=gen) * 0.1
        ).to(torch.bfloat16)
        sd[f"transformer.h.{layer}.attn.adapter_wte.weight"] = p
    return sd


def _save(sd: dict, path: Path) -> Path:
    torch.save(sd, path)
    return path


# --- the released checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_checkpoint_shapes_and_params(fixtures: Path, name: str) -> None:
    tokens, params = RELEASED[name]
    a = convert_lit_llama(fixtures / name, base_model=BASE)
    assert a.params == params
    assert a.tokens == tokens
    assert a.start_layer == 2
    assert list(a.gate.shape) == [30, 32]
    assert list(a.prefix.shape) == [tokens, 4096]
    assert a.gate_activation == "identity"
    assert a.num_layers == 32
    assert a.base_model == BASE
    assert a.prefix.dtype == torch.bfloat16 and a.gate.dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_converted_values_equal_checkpoint(fixtures: Path, name: str) -> None:
    sd = _reference(fixtures / name)
    a = convert_lit_llama(fixtures / name, base_model=BASE)
    assert torch.equal(a.prefix, sd["global_value_embedding.weight"])
    for i, layer in enumerate(range(2, 32)):
        assert torch.equal(a.gate[i], sd[f"transformer.h.{layer}.attn.gating_factor"].reshape(32)), layer
    # the gates are real, distinct per layer (guards against e.g. repeating one layer's row)
    assert not torch.equal(a.gate[0], a.gate[-1])


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_round_trip_through_encode_decode(fixtures: Path, name: str, tmp_path: Path) -> None:
    a = convert_lit_llama(fixtures / name, base_model=BASE)
    b = decode(encode(a))
    assert b.prefix.dtype == a.prefix.dtype and b.gate.dtype == a.gate.dtype
    assert torch.equal(b.prefix, a.prefix) and torch.equal(b.gate, a.gate)
    assert (b.start_layer, b.gate_activation, b.num_layers, b.base_model) == (
        a.start_layer,
        a.gate_activation,
        a.num_layers,
        a.base_model,
    )
    assert b.sha256() == a.sha256()


def test_dtype_override(fixtures: Path) -> None:
    name = "metamath-10token-llama2-7b.pth"
    a = convert_lit_llama(fixtures / name, base_model=BASE, dtype=torch.float32)
    assert a.prefix.dtype == torch.float32 and a.gate.dtype == torch.float32
    sd = _reference(fixtures / name)
    assert torch.equal(a.prefix, sd["global_value_embedding.weight"].float())  # bf16 -> f32 is exact


def test_released_files_are_distinct(fixtures: Path) -> None:
    shas = {convert_lit_llama(fixtures / n, base_model=BASE).sha256() for n in RELEASED}
    assert len(shas) == len(RELEASED)


# --- the default base model ---------------------------------------------------------------------


def test_llama2_7b_identity() -> None:
    spec = ModelSpec.from_config(LLAMA2_7B_CONFIG, name="Llama-2-7b-hf")
    assert llama2_7b_base_model() == spec.identity
    assert spec.identity.startswith("Llama-2-7b-hf:")
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        4096,
        32,
        32,
        32,
        128,
    )
    c = LLAMA2_7B_CONFIG
    assert (c["intermediate_size"], c["vocab_size"], c["max_position_embeddings"]) == (11008, 32000, 4096)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000
    assert c["architectures"] == ["LlamaForCausalLM"] and c["tie_word_embeddings"] is False


# --- refusals -----------------------------------------------------------------------------------

_RAN = {"count": 0}


def _payload(marker: str) -> str:
    """What a malicious pickle would run on load: must never be called by the converter."""
    _RAN["count"] += 1
    Path(marker).write_text("code ran")
    return "pwned"


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_payload, (self.marker,))


def _assert_refused_without_running(path: Path, marker: Path) -> None:
    before = _RAN["count"]
    with pytest.raises(AdapterFormatError) as e:
        convert_lit_llama(path, base_model=BASE)
    assert "not a plain tensor checkpoint" in str(e.value)
    assert "not loaded" in str(e.value)
    assert not marker.exists()
    assert _RAN["count"] == before


def test_torch_zip_with_custom_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    only = tmp_path / "evil-only.pth"
    torch.save({"x": Evil(marker)}, only)
    assert not marker.exists()  # saving does not run the payload
    # positive control: the payload is live; the full unpickler on the zip's data.pkl would run it
    with zipfile.ZipFile(only) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert pickle.loads(raw) == {"x": "pwned"}
    assert marker.exists()
    marker.unlink()
    _assert_refused_without_running(only, marker)
    # the same payload hidden among the real entries of an Aligner checkpoint
    mixed = tmp_path / "evil-mixed.pth"
    torch.save({**_synthetic(), "x": Evil(marker)}, mixed)
    _assert_refused_without_running(mixed, marker)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_with_custom_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    data = pickle.dumps({"global_value_embedding.weight": Evil(marker)})
    pickle.loads(data)  # positive control: the payload is live
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    _assert_refused_without_running(path, marker)


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(AdapterFormatError, match="not a plain tensor checkpoint"):
        convert_lit_llama(path, base_model=BASE)


def test_oversized_file_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_synthetic(), tmp_path / "big.pth")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    convert_lit_llama(path, base_model=BASE)  # under the limit: loads
    assert calls == [1]
    monkeypatch.setattr(convert_mod, "MAX_CHECKPOINT_BYTES", path.stat().st_size - 1)
    with pytest.raises(AdapterFormatError, match="not loaded"):
        convert_lit_llama(path, base_model=BASE)
    assert calls == [1]  # refused without calling torch.load


def test_weights_only_is_always_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_synthetic(), tmp_path / "ok.pth")
    seen = []
    real_load = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    convert_lit_llama(path, base_model=BASE)
    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil(tmp_path / "m")}, evil)
    with pytest.raises(AdapterFormatError):
        convert_lit_llama(evil, base_model=BASE)
    assert seen == [True, True]  # one call each, never retried with weights_only=False
    assert not (tmp_path / "m").exists()


def test_non_dict_is_refused(tmp_path: Path) -> None:
    path = _save([torch.zeros(1, 4096)], tmp_path / "list.pth")
    with pytest.raises(AdapterFormatError, match="not a dict"):
        convert_lit_llama(path, base_model=BASE)


def test_non_tensor_value_is_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    sd["transformer.h.5.attn.gating_factor"] = [0.0] * 32
    with pytest.raises(AdapterFormatError, match="not a tensor"):
        convert_lit_llama(_save(sd, tmp_path / "c.pth"), base_model=BASE)


def test_synthetic_checkpoint_converts(tmp_path: Path) -> None:
    sd = _synthetic(tokens=3, start=4)
    a = convert_lit_llama(_save(sd, tmp_path / "s.pth"), base_model="m:abc")
    assert a.start_layer == 4 and list(a.gate.shape) == [28, 32] and a.tokens == 3
    assert a.params == 3 * 4096 + 28 * 32
    assert torch.equal(a.gate[0], sd["transformer.h.4.attn.gating_factor"].reshape(32))
    assert torch.equal(a.gate[-1], sd["transformer.h.31.attn.gating_factor"].reshape(32))
    assert a.base_model == "m:abc"


def test_untied_adapter_wte_is_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    other = sd["global_value_embedding.weight"].clone()
    other[0, 7] += 1
    sd["transformer.h.17.attn.adapter_wte.weight"] = other
    with pytest.raises(AdapterFormatError, match="per-layer prefixes") as e:
        convert_lit_llama(_save(sd, tmp_path / "untied.pth"), base_model=BASE)
    assert "transformer.h.17.attn.adapter_wte.weight" in str(e.value)


def test_tied_copy_in_separate_storage_is_accepted(tmp_path: Path) -> None:
    sd = _synthetic()
    sd["transformer.h.17.attn.adapter_wte.weight"] = sd["global_value_embedding.weight"].clone()
    a = convert_lit_llama(_save(sd, tmp_path / "copy.pth"), base_model=BASE)
    assert a.params == 5056


def test_missing_gate_layer_is_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    del sd["transformer.h.20.attn.gating_factor"]
    with pytest.raises(AdapterFormatError, match=r"transformer\.h\.20\.attn\.gating_factor"):
        convert_lit_llama(_save(sd, tmp_path / "gap.pth"), base_model=BASE)


def test_missing_last_gate_layer_is_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    del sd["transformer.h.31.attn.gating_factor"]
    with pytest.raises(AdapterFormatError, match=r"transformer\.h\.31\.attn\.gating_factor"):
        convert_lit_llama(_save(sd, tmp_path / "end.pth"), base_model=BASE)


def test_bad_gate_shape_is_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    sd["transformer.h.9.attn.gating_factor"] = torch.zeros(1, 16, 1, 1, dtype=torch.bfloat16)
    with pytest.raises(AdapterFormatError, match=r"\[1, 32, 1, 1\]"):
        convert_lit_llama(_save(sd, tmp_path / "shape.pth"), base_model=BASE)


def test_wrong_hidden_size_is_refused(tmp_path: Path) -> None:
    sd = _synthetic(hidden=64)
    with pytest.raises(AdapterFormatError, match="Llama-2-7b-hf has hidden size 4096"):
        convert_lit_llama(_save(sd, tmp_path / "h.pth"), base_model=BASE)
    with pytest.raises(AdapterFormatError, match="--base-model"):  # no known base has hidden 64
        convert_lit_llama(tmp_path / "h.pth")
    with pytest.raises(AdapterFormatError, match="--hidden-size"):
        convert_lit_llama(tmp_path / "h.pth", base_model="m:abc", hidden_size=4096)
    a = convert_lit_llama(tmp_path / "h.pth", base_model="m:abc")
    assert list(a.prefix.shape) == [1, 64] and a.num_layers == 32 and a.base_model == "m:abc"


def test_missing_prefix_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    del sd["global_value_embedding.weight"]
    with pytest.raises(AdapterFormatError, match="global_value_embedding"):
        convert_lit_llama(_save(sd, tmp_path / "np.pth"), base_model=BASE)
    sd = _synthetic()
    sd["transformer.wte.weight"] = torch.zeros(8, 4096)
    with pytest.raises(AdapterFormatError, match="unexpected"):
        convert_lit_llama(_save(sd, tmp_path / "extra.pth"), base_model=BASE)


def test_non_finite_gate_is_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    sd["transformer.h.3.attn.gating_factor"] = torch.full((1, 32, 1, 1), float("nan"), dtype=torch.bfloat16)
    with pytest.raises(AdapterFormatError, match="NaN"):
        convert_lit_llama(_save(sd, tmp_path / "nan.pth"), base_model=BASE)


# --- shapes read from the file -------------------------------------------------------------------

LLAMA2_13B = ModelSpec.from_config(LLAMA2_13B_CONFIG, name="Llama-2-13b-hf")


def test_13b_shaped_checkpoint_converts_without_flags(tmp_path: Path) -> None:
    sd = _synthetic(tokens=10, layers=40, heads=40, hidden=5120)
    a = convert_lit_llama(_save(sd, tmp_path / "13b.pth"))
    assert a.base_model == LLAMA2_13B.identity and a.base_model.startswith("Llama-2-13b-hf:")
    assert (a.num_layers, a.start_layer, list(a.gate.shape), list(a.prefix.shape)) == (40, 2, [38, 40], [10, 5120])
    assert torch.equal(a.gate[-1], sd["transformer.h.39.attn.gating_factor"].reshape(40))
    spec = LLAMA2_13B
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        5120,
        40,
        40,
        40,
        128,
    )


def test_13b_with_the_old_shape_flags_is_labelled_13b(tmp_path: Path) -> None:
    # Before: the right shape flags but no --base-model labelled a 13B file Llama-2-7b-hf.
    path = _save(_synthetic(layers=40, heads=40, hidden=5120), tmp_path / "13b.pth")
    a = convert_lit_llama(path, num_layers=40, num_heads=40, hidden_size=5120)
    assert a.base_model == LLAMA2_13B.identity


def test_13b_named_as_7b_is_refused(tmp_path: Path) -> None:
    path = _save(_synthetic(layers=40, heads=40, hidden=5120), tmp_path / "13b.pth")
    with pytest.raises(AdapterFormatError, match="Llama-2-7b-hf has hidden size 4096"):
        convert_lit_llama(path, base_model=BASE)


def test_truncated_13b_names_the_missing_gate(tmp_path: Path) -> None:
    sd = _synthetic(layers=40, heads=40, hidden=5120)
    del sd["transformer.h.39.attn.gating_factor"], sd["transformer.h.39.attn.adapter_wte.weight"]
    with pytest.raises(AdapterFormatError, match=r"missing 'transformer\.h\.39\.attn\.gating_factor'.*Llama-2-13b-hf"):
        convert_lit_llama(_save(sd, tmp_path / "cut.pth"))


def test_300_token_checkpoint_converts(tmp_path: Path) -> None:
    a = convert_lit_llama(_save(_synthetic(tokens=300), tmp_path / "mm300.pth"))
    assert a.tokens == 300 and a.base_model == BASE and a.params == 300 * 4096 + 30 * 32


@pytest.mark.parametrize("shape", [(1,), (1, 1, 1, 1)])
def test_single_value_gates_are_spread_over_the_heads(tmp_path: Path, shape: tuple) -> None:
    sd = _synthetic(gate_shape=shape)
    converted = convert_checkpoint(_save(sd, tmp_path / "old.pth"))
    a = converted.adapter
    assert list(a.gate.shape) == [30, 32] and a.base_model == BASE
    for row, layer in enumerate(range(2, 32)):
        value = sd[f"transformer.h.{layer}.attn.gating_factor"].reshape(())
        assert torch.equal(a.gate[row], value.expand(32))
    assert any("spread over the 32 heads" in n for n in converted.notes)


def test_single_value_gates_of_an_unknown_model_need_num_heads(tmp_path: Path) -> None:
    path = _save(_synthetic(hidden=64, layers=6, gate_shape=(1,)), tmp_path / "old.pth")
    with pytest.raises(AdapterFormatError, match="--num-heads"):
        convert_lit_llama(path, base_model="m:abc")
    a = convert_lit_llama(path, base_model="m:abc", num_heads=4)
    assert list(a.gate.shape) == [4, 4] and a.num_layers == 6


def test_gate_heads_disagreeing_with_num_heads_is_refused(tmp_path: Path) -> None:
    path = _save(_synthetic(), tmp_path / "g.pth")
    with pytest.raises(AdapterFormatError, match="--num-heads"):
        convert_lit_llama(path, num_heads=16)


def test_mixed_gate_shapes_are_refused(tmp_path: Path) -> None:
    sd = _synthetic()
    sd["transformer.h.9.attn.gating_factor"] = torch.zeros(1, dtype=torch.bfloat16)
    with pytest.raises(AdapterFormatError, match="different shapes"):
        convert_lit_llama(_save(sd, tmp_path / "mixed.pth"))


def test_tied_copies_are_reported(tmp_path: Path) -> None:
    converted = convert_checkpoint(_save(_synthetic(), tmp_path / "t.pth"))
    assert any("30 per-layer adapter_wte copies equal the global prefix" in n for n in converted.notes)


# The authors' repository layout (out/<method>/<dataset>/<size>/<run>/<checkpoint>.pth), one file per
# released shape: Alpaca 1 and 10 tokens (7B, 13B), MetaMath 1, 10, 100, 300, Beaver SFT and DPO.
AUTHORS_TREE = {
    "aligner/lit-llama-2-alpaca512/7B/1vector-start_layer2-lr0.009bs64/epoch-8.0.pth": (1, "7b"),
    "aligner/lit-llama-2-alpaca512/7B/10vector-start_layer2-lr0.009bs64/epoch-5.0.pth": (10, "7b"),
    "aligner/lit-llama-2-alpaca512/13B/1vector-start_layer2-lr0.009bs64/epoch-8.0.pth": (1, "13b"),
    "aligner/lit-llama-2-alpaca512/13B/10vector-start_layer2-lr0.009bs64/epoch-5.0.pth": (10, "13b"),
    "aligner/lit-llama-2-metaMath/7B/1vector-start_layer2-lr0.009bs64/epoch-3.0.pth": (1, "7b"),
    "aligner/lit-llama-2-metaMath/7B/10vector-start_layer2-lr0.009bs64/epoch-3.0.pth": (10, "7b"),
    "aligner/lit-llama-2-metaMath/7B/100vector-start_layer2-lr0.009bs64/epoch-3.0.pth": (100, "7b"),
    "aligner/lit-llama-2-metaMath/7B/300vector-start_layer2-lr0.009bs64/epoch-3.0.pth": (300, "7b"),
    "aligner/lit-llama-2-beaver_safe/7B/1vector-start_layer2-lr0.009bs64/epoch-3.0.pth": (1, "7b"),
    "DPO/aligner/lit-llama-2-beaver_safe2/7B/1vector-start_layer2-lr0.0001bs32/epoch-3.0.pth": (1, "7b"),
}


def test_cli_converts_the_authors_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "out", tmp_path / "converted"
    for rel, (tokens, size) in AUTHORS_TREE.items():
        shape = {"7b": {}, "13b": {"layers": 40, "heads": 40, "hidden": 5120}}[size]
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        _save(_synthetic(tokens=tokens, **shape), src / rel)
    assert main([str(src), "-o", str(dst)]) == 0
    for rel, (tokens, size) in AUTHORS_TREE.items():
        a = load((dst / rel).with_suffix(".safetensors"))
        assert a.tokens == tokens
        assert a.base_model == {"7b": BASE, "13b": LLAMA2_13B.identity}[size]
    out = capsys.readouterr().out
    assert f"converted {len(AUTHORS_TREE)} of {len(AUTHORS_TREE)} checkpoints" in out


def test_cli_tree_with_a_bad_file_fails_and_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "out"
    (src / "a").mkdir(parents=True)
    _save(_synthetic(), src / "a" / "good.pth")
    (src / "a" / "bad.pth").write_bytes(b"not a checkpoint")
    assert main([str(src), "-o", str(tmp_path / "dst")]) == 1
    assert (tmp_path / "dst" / "a" / "good.safetensors").is_file()
    captured = capsys.readouterr()
    assert "bad.pth" in captured.err and "converted 1 of 2" in captured.out


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_writes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(_synthetic(tokens=2), tmp_path / "in.pth")
    dst = tmp_path / "out.safetensors"
    assert main([str(src), "-o", str(dst)]) == 0
    a = load(dst)
    assert a.base_model == BASE and a.tokens == 2 and a.start_layer == 2
    assert a.prefix.dtype == torch.bfloat16
    sha = hashlib.sha256(dst.read_bytes()).hexdigest()
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    for part in ("tokens=2", f"params={2 * 4096 + 30 * 32}", "start_layer=2", f"sha256={sha}"):
        assert part in out


def test_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(_synthetic(), tmp_path / "in.pth")
    dst = tmp_path / "out.safetensors"
    assert main([str(src), "-o", str(dst), "--base-model", "Other:123", "--dtype", "float32"]) == 0
    a = load(dst)
    assert a.base_model == "Other:123" and a.gate.dtype == torch.float32


def test_cli_released_checkpoint(fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "alpaca.safetensors"
    assert main([str(fixtures / "alpaca-1token-llama2-7b.pth"), "-o", str(dst)]) == 0
    assert load(dst).params == 5056
    assert "params=5056" in capsys.readouterr().out


def test_cli_refusal_returns_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran.txt"
    src = tmp_path / "evil.pth"
    torch.save({"x": Evil(marker)}, src)
    dst = tmp_path / "out.safetensors"
    assert main([str(src), "-o", str(dst)]) == 1
    assert not dst.exists() and not marker.exists()
    assert "not a plain tensor checkpoint" in capsys.readouterr().err
