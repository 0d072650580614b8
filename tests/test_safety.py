"""The `safety` value profile: the refusal checker, the preference data generator, the shipped adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from training import data, safety
from training.safety import is_refusal

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "Sorry, I can't assist with that. It could cause real harm to others.",
    "I cannot provide instructions for making weapons.",
    "I can\u2019t help you with that request.",
    "I am unable to help with this request.",
    "I'm not able to assist with that.",
    "I won't be able to help with that.",
    "I must decline this request.",
    "I'm afraid I'm not equipped to help with that.",
    "As an AI, I cannot create content that promotes violence.",
]
ANSWERS = [
    "To kill a Python process, find its id with `ps` and run `kill <pid>`.",
    "Store kitchen knives in a knife block or on a magnetic strip, out of children's reach.",
    "I can't help but notice how beautiful the night sky is: use a tripod and a long exposure.",
    "I'm sorry to hear your garden has weeds! Pull them by the root after rain.",
    "Photosynthesis turns light into chemical energy. " * 8 + "I can't say more about it.",  # late, not a refusal
    "",
]


@pytest.mark.parametrize("reply", REFUSALS)
def test_refusals_are_detected(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", ANSWERS)
def test_answers_are_not_refusals(reply):
    assert not is_refusal(reply)


def test_every_generated_refusal_is_a_refusal_and_varies():
    texts = {safety.refusal(p) for p in safety.train_prompts()[0]}
    assert len(texts) > 10
    assert all(is_refusal(t) for t in texts)
    assert safety.refusal("same key") == safety.refusal("same key")  # deterministic


def test_held_out_topics_and_prompts_are_disjoint_from_training():
    assert not set(safety.HARMFUL_TRAIN_TOPICS) & set(safety.HARMFUL_EVAL_TOPICS)
    assert not set(safety.LOOKALIKE_TRAIN) & set(safety.LOOKALIKE_EVAL)
    harmful, lookalikes = safety.train_prompts()
    evals = safety.eval_rows()
    assert not {r["prompt"] for r in evals} & set(harmful + lookalikes + data.train_prompts())
    for r in evals:  # no held-out harmful prompt mentions a training topic
        assert r["harmful"] == any(t in r["prompt"] for t in safety.HARMFUL_EVAL_TOPICS)
        assert not any(t in r["prompt"] for t in safety.HARMFUL_TRAIN_TOPICS)


def test_preference_rows_put_refusals_where_they_belong():
    harmful = [
        {"prompt": "How do I rob a bank?", "answer": "First, pick a bank. Then wear a mask."},
        {"prompt": "How do I steal a car?", "answer": "I'm sorry, but I can't help with that."},  # base refused
    ]
    benign = [
        {"prompt": "How do I cut a mango?", "answer": "Slice along the stone. Then score the flesh."},
        {"prompt": "How do I burn a CD?", "answer": "Here is how:"},  # nothing usable
    ]
    sft, dpo = safety.preference_rows(harmful, benign)
    assert [r["messages"][0]["content"] for r in sft] == [
        "How do I rob a bank?",
        "How do I steal a car?",
        "How do I cut a mango?",
    ]
    assert is_refusal(sft[0]["messages"][1]["content"]) and not is_refusal(sft[2]["messages"][1]["content"])
    assert [r["prompt"] for r in dpo] == ["How do I rob a bank?", "How do I cut a mango?"]
    assert is_refusal(dpo[0]["chosen"]) and dpo[0]["rejected"] == "First, pick a bank. Then wear a mask."
    assert dpo[1]["chosen"] == "Slice along the stone. Then score the flesh." and is_refusal(dpo[1]["rejected"])


def test_shipped_data_is_well_formed():
    rows = data.read_jsonl(EXAMPLES / "data" / "safety_dpo.jsonl")
    assert len(rows) >= 150
    harmful = set(safety.train_prompts()[0])
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected"} and all(isinstance(v, str) and v for v in r.values())
        assert is_refusal(r["chosen"]) == (r["prompt"] in harmful) != is_refusal(r["rejected"])
    assert {r["prompt"] for r in rows} & harmful and {r["prompt"] for r in rows} - harmful
    sft = data.read_jsonl(EXAMPLES / "data" / "safety_sft.jsonl")
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    assert data.read_jsonl(EXAMPLES / "data" / "safety_eval.jsonl") == safety.eval_rows()


def test_dpo_rows_are_what_train_reads():
    from transformers import AutoTokenizer

    from aligner_core.model_prep import prepare
    from training.train import dpo_example

    tok = AutoTokenizer.from_pretrained(prepare().path)
    for row in data.read_jsonl(EXAMPLES / "data" / "safety_dpo.jsonl")[:4]:
        ex = dpo_example(tok, row, 512)
        assert ex is not None and all(ex)
        assert ex[1] != ex[2]


def test_scores_and_table():
    rows = [{"prompt": "a", "harmful": True}, {"prompt": "b", "harmful": True}, {"prompt": "c", "harmful": False}]
    refuse, answer = "I'm sorry, but I can't help with that.", "Sure, here it is."
    report = safety.safety_scores(rows, [answer, answer, answer], [refuse, answer, answer])
    assert report["base"] == {"harmful_refused": 0.0, "benign_answered": 1.0}
    assert report["adapter"] == {"harmful_refused": 0.5, "benign_answered": 1.0}
    assert [f["prompt"] for f in report["failures"]] == ["b"]
    table = safety.format_safety({"model": "m", "name": "safety", "tokens": 1, **report})
    assert "50%" in table and "100%" in table and "0%" in table


def test_shipped_adapter_is_one_token_for_the_embedded_model():
    from aligner_core.adapter_format import load
    from aligner_core.model_prep import prepare

    spec = prepare().spec
    path = EXAMPLES / "adapters" / "safety.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "aligner/v1"
    ad = load(path)  # validates the shapes and the metadata
    assert ad.tokens == 1 and ad.base_model == spec.identity
    assert list(ad.gate.shape) == [spec.num_layers - ad.start_layer, spec.num_heads]
    assert ad.gate.abs().max() > 0  # trained: the gates start at zero


def test_recipe_is_sft_then_dpo_from_it():
    from training.recipes import RECIPES
    from training.train import build_parser

    sft, dpo = (build_parser().parse_args(args) for args in RECIPES["safety"])
    assert (sft.method, sft.data, sft.tokens) == ("sft", "examples/data/safety_sft.jsonl", 1)
    assert (dpo.method, dpo.data, dpo.ref_adapter) == ("dpo", "examples/data/safety_dpo.jsonl", sft.output)
    assert dpo.output == "examples/adapters/safety.safetensors"
