"""`aligner train` on a tiny random Llama (hidden 64): SFT and DPO learn, and the saved file is the trained adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support import quick_train, tiny_llama_config

from aligner_core.adapter_format import load
from aligner_core.model_spec import ModelSpec
from aligner_core.reference import attached, attached_adapter, load_hf_model
from training.train import main, sft_example

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
WORDS = "the a cat dog sat ran on mat log what did do say yes no arr matey hello".split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 3-layer Llama with a word-level tokenizer and a chat template, saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "system", "?", ".", ","] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(vocab),
        num_hidden_layers=3,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=1,
        eos_token_id=3,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _identity(folder: Path) -> str:
    return ModelSpec.from_config(json.loads((folder / "config.json").read_text()), name=folder.name).identity


def _sft_data(path: Path) -> Path:
    rows = []
    for q in ("what did the cat do ?", "what did the dog do ?", "say hello", "what sat on the mat ?", "say yes"):
        for _ in range(4):
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": "arr matey arr matey ."},
                    ]
                }
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_example_masks_all_but_assistant_turns(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [
        {"role": "user", "content": "say yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "say no"},
        {"role": "assistant", "content": "no ."},
    ]
    ids, labels = sft_example(tok, msgs, 512)
    kept = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != -100])
    assert kept == ["yes", "<|im_end|>", "no", ".", "<|im_end|>"]


def test_sft_learns_and_saves_the_trained_adapter(tiny_model, tmp_path):
    data, out = _sft_data(tmp_path / "d.jsonl"), tmp_path / "out" / "persona.safetensors"
    # with a validation split, and the loss plot where it goes by default (<output>.loss.png)
    res = quick_train(
        data, out, model=str(tiny_model), tokens=2, start_layer=1, lr=0.05, steps=25, val_split=0.2, plot=None
    )
    hist = json.loads(out.with_suffix(".log.json").read_text())
    losses = [r["loss"] for r in hist["train"]]
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    assert hist["val"][-1]["loss"] < 0.7 * hist["val"][0]["loss"], hist["val"]
    assert out.with_suffix(".loss.png").stat().st_size > 1000

    ad = load(out)
    assert ad.base_model == _identity(tiny_model) and ad.base_model.startswith("tiny-llama:")
    assert (ad.tokens, ad.start_layer, ad.gate_activation, ad.num_layers) == (2, 1, "identity", 3)
    assert ad.params == 2 * 64 + 2 * 4 and list(ad.gate.shape) == [2, 4]
    assert ad.gate.abs().max() > 0  # the zero-initialised gates moved

    model = load_hf_model(str(tiny_model))
    ids = torch.tensor([[4, 7, 16, 17, 18, 3]])
    with torch.no_grad():
        with attached_adapter(model, ad):
            from_file = model(input_ids=ids).logits
        with attached(model, prefix=res.prefix, gate=res.gate, start_layer=1):
            in_memory = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert torch.equal(from_file, in_memory)
    assert not torch.allclose(from_file, base, atol=1e-3)


def test_dpo_loss_falls_below_log2(tiny_model, tmp_path):
    rows = [
        {"prompt": q, "chosen": "yes arr matey .", "rejected": "no the cat sat ."}
        for q in ("say yes", "what did the cat do ?", "say hello", "what sat on the mat ?")
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    out = tmp_path / "dpo.safetensors"
    rc = main(
        [
            "--method",
            "dpo",
            "--data",
            str(data),
            "--output",
            str(out),
            "--model",
            str(tiny_model),
            "--lr",
            "0.3",
            "--steps",
            "15",
            "--batch-size",
            "4",
            "--val-split",
            "0",
            "--plot",
            "",
            "-q",
        ]
    )
    assert rc == 0
    hist = json.loads(out.with_suffix(".log.json").read_text())
    losses = [r["loss"] for r in hist["train"]]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # zero gates: the policy is the reference
    assert max(losses[-3:]) < 0.8 * math.log(2), losses
    assert load(out).base_model == _identity(tiny_model)


def test_dpo_with_a_reference_adapter_starts_from_it(tiny_model, tmp_path):
    sft = tmp_path / "sft.safetensors"
    quick_train(_sft_data(tmp_path / "d.jsonl"), sft, model=str(tiny_model), lr=0.05, steps=3)
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "say yes"}], "chosen": "yes .", "rejected": "no ."}) + "\n"
    )
    out = tmp_path / "dpo.safetensors"
    res = quick_train(data, out, model=str(tiny_model), method="dpo", ref_adapter=str(sft), steps=2, batch_size=1)
    assert res.history["train"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert res.adapter.tokens == load(sft).tokens and res.adapter.start_layer == 2


def test_bad_arguments_are_refused(tiny_model, tmp_path, capsys):
    data = _sft_data(tmp_path / "d.jsonl")
    with pytest.raises(SystemExit):
        main(
            [
                "--data",
                str(data),
                "--output",
                str(tmp_path / "x.safetensors"),
                "--model",
                str(tiny_model),
                "--start-layer",
                "3",
                "-q",
            ]
        )
    assert (
        main(
            [
                "--data",
                str(tmp_path / "missing.jsonl"),
                "--output",
                str(tmp_path / "x.safetensors"),
                "--model",
                str(tiny_model),
                "-q",
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.safetensors").exists()


def test_init_adapter_is_the_starting_point(tiny_model, tmp_path):
    data = _sft_data(tmp_path / "d.jsonl")
    first = tmp_path / "first.safetensors"
    quick_train(data, first, model=str(tiny_model), tokens=3, start_layer=1, lr=0.05, steps=2)
    again = tmp_path / "again.safetensors"
    quick_train(data, again, model=str(tiny_model), init_adapter=str(first), lr=0.0, steps=1)
    a, b = load(first), load(again)
    assert (b.tokens, b.start_layer) == (3, 1)
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)


def test_decision_weight_stresses_the_layout_tokens(tiny_model):
    """--decision-weight: the loss is the weighted mean over label tokens, the layout tokens (first token of
    the reply, end of turn) weighted; weight 1 is plain SFT."""
    from transformers import AutoTokenizer

    from training.train import _weights, layout_positions, sft_loss

    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes arr matey ."}]
    ids, labels = sft_example(tok, msgs, 512)
    picked = tok.convert_ids_to_tokens([ids[j] for j in layout_positions(tok, ids, labels)])
    assert picked == ["yes", "<|im_end|>"]
    model = load_hf_model(str(tiny_model))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        w = torch.tensor(_weights(tok, ids, labels, 5.0)[1:])
        keep = torch.tensor(labels[1:]) != -100
        want = -(lp * w)[keep].sum() / w[keep].sum()
        plain = -lp[keep].mean()
        got, n = sft_loss(model, [(ids, labels, _weights(tok, ids, labels, 5.0))], "cpu")
        got1, _ = sft_loss(model, [(ids, labels)], "cpu")
    assert n == int(w[keep].sum()) == 3 + 2 * 5  # 3 plain tokens + 2 layout tokens at weight 5
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got1, plain)
    assert not torch.isclose(got, got1)
