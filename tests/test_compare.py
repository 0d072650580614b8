"""Aligner against LoRA: the knowledge checker, the LoRA trainer on a tiny Llama, and the compare harness."""

from __future__ import annotations

import json

import pytest
import torch
from support import REPO
from test_train import _sft_data, tiny_model  # noqa: F401  (tiny_model: the tiny Llama folder fixture)

from aligner_core.adapter_format import Adapter
from aligner_core.model_spec import ModelSpec
from aligner_core.reference import attached_adapter, load_hf_model
from training.compare import Method, cells, evaluate_cell, generator, load_base, lora_generator, parse_extras
from training.knowledge import CANDIDATES, MAX_TOKENS, is_correct, knowledge_retention, load_knowledge
from training.lora import adapter_file, recipe_config, train_lora

PARIS = ["Paris"]


@pytest.mark.parametrize(
    "reply",
    [
        "The capital of France is Paris.",
        "Arr, matey! The capital of France be Paris, ye landlubber! Arr!",
        '{"answer": "The capital of France is Paris."}',
        '{"answer": "paris"}',
        "- France lies in Europe.\n- Its capital is PARIS.\n- It is famous for the Eiffel Tower.",
    ],
)
def test_a_reply_in_any_persona_form_that_names_the_fact_counts(reply: str) -> None:
    assert is_correct(reply, PARIS)


@pytest.mark.parametrize(
    "reply",
    [
        "The capital of France is Lyon.",
        '{"answer": "Marseille"}',
        "Arr, the Parisian quarter be grand, matey!",  # a longer word that contains the answer is no hit
        "",
    ],
)
def test_a_reply_without_the_fact_does_not_count(reply: str) -> None:
    assert not is_correct(reply, PARIS)


def test_no_candidate_question_answers_itself() -> None:
    assert len(CANDIDATES) >= 120
    assert not [r["question"] for r in CANDIDATES if is_correct(r["question"], r["answers"])]


def test_the_kept_set_is_a_subset_of_the_candidates_large_enough() -> None:
    kept = load_knowledge(REPO / "examples/data/knowledge.jsonl")
    candidates = {r["question"]: r["answers"] for r in CANDIDATES}
    assert len(kept) >= 40
    assert all(candidates.get(r["question"]) == r["answers"] for r in kept)


def test_knowledge_retention_is_the_share_answered_right() -> None:
    rows = [
        {"question": "capital of France?", "answers": ["Paris"]},
        {"question": "capital of Peru?", "answers": ["Lima"]},
    ]
    asked: list = []

    def generate(prompts, max_tokens):
        asked.append((list(prompts), max_tokens))
        return ['{"answer": "Paris"}', "Arr, it be Cusco, matey!"]

    out = knowledge_retention(generate, rows)
    assert out["retained"] == 0.5 and out["questions"] == 2
    assert [d["correct"] for d in out["detail"]] == [True, False]
    assert asked == [(["capital of France?", "capital of Peru?"], MAX_TOKENS)]


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_trainer_lowers_the_loss_and_saves_the_adapter(tiny_model, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "lora"
    cfg = recipe_config(
        "pirate",
        output=out,
        lr=2e-2,
        data=str(_sft_data(tmp_path / "sft.jsonl")),
        model=str(tiny_model),
        steps=6,
        batch_size=4,
        val_split=0.2,
        eval_every=6,
        device="cpu",
        quiet=True,
    )
    log = train_lora(cfg, "qv")
    assert log["val"][-1]["loss"] < log["val"][0]["loss"] - 0.1
    # rank 8 on q_proj (64 -> 64) and v_proj (64 -> 32) in each of the 3 layers: A [8, in] + B [out, 8]
    assert log["params"] == 3 * 8 * ((64 + 64) + (64 + 32))
    assert adapter_file(out).stat().st_size == log["bytes"] > 4 * log["params"]
    assert json.loads((out / "log.json").read_text())["target"] == "qv"
    # loaded back through PEFT on a fresh base model (compare's path), it says what it was taught; the base does not
    prompts = ["what did the dog do ?", "say yes"]
    assert all(r.startswith("arr matey") for r in lora_generator(out, str(tiny_model))(prompts, 4))
    assert not any(r.startswith("arr matey") for r in generator(*load_base(str(tiny_model)))(prompts, 4))


# ------------------------------------------------------------------------------------------------ compare


def _reference_greedy(model, tok, adapter, prompt: str, max_tokens: int) -> str:
    """Token by token, one prompt, no cache, through the reference forward: what greedy decoding must give."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    new: list[int] = []
    with torch.no_grad(), attached_adapter(model, adapter):
        while len(new) < max_tokens and (not new or new[-1] != tok.eos_token_id):
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
    return tok.decode(new, skip_special_tokens=True)


def test_batched_generation_with_the_aligner_equals_the_reference_one_prompt_at_a_time(tiny_model) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    model, tok = load_hf_model(str(tiny_model)), AutoTokenizer.from_pretrained(tiny_model)
    spec = ModelSpec.from_config(model.config.to_dict(), name="tiny")
    adapter = Adapter.random(spec, tokens=2, start_layer=1, gate_scale=3.0, seed=1)
    prompts = ["say yes", "what did the cat do ?", "what sat on the mat ?", "say hello"]  # unequal lengths: padding
    got = generator(model, tok, context=lambda: attached_adapter(model, adapter), batch=3)(prompts, 8)
    assert got == [_reference_greedy(model, tok, adapter, p, 8) for p in prompts]
    assert got != generator(model, tok)(prompts, 8)  # the adapter does change the replies


def test_a_result_row_has_the_fields_and_scores_with_the_persona_checkers() -> None:
    def generate(prompts, max_tokens):
        return ['{"answer": "Paris"}'] * len(prompts)

    m = Method(generate, params=828, bytes=3456, train_seconds=12.5, source="x.safetensors")
    knowledge = [{"question": "France?", "answers": ["Paris"]}, {"question": "Peru?", "answers": ["Lima"]}]
    row = evaluate_cell("aligner", "json", m, ["q1", "q2"], knowledge, max_tokens=5)
    assert {"method", "persona", "params", "bytes", "train_seconds", "compliance", "knowledge_retained"} <= set(row)
    assert (row["params"], row["bytes"], row["train_seconds"]) == (828, 3456, 12.5)
    assert row["compliance"] == {"json": 1.0} and row["knowledge_retained"] == 0.5
    assert row["knowledge_lost"] == [{"question": "Peru?", "reply": '{"answer": "Paris"}'}]
    base = evaluate_cell("base", None, m, ["q1"], knowledge, max_tokens=5)
    assert base["compliance"] == {"pirate": 0.0, "json": 1.0, "bullets": 0.0}
    extra = evaluate_cell("extra", "safety", m, ["q1"], knowledge, max_tokens=5)
    assert "compliance" not in extra and extra["knowledge_retained"] == 0.5


def test_the_grid_has_the_base_once_and_extras_for_knowledge_only() -> None:
    grid = cells(["pirate", "json"], ["base", "aligner", "lora-qv"], parse_extras(["safety=s.safetensors"]))
    assert grid == [
        ("base", None),
        ("aligner", "pirate"),
        ("aligner", "json"),
        ("lora-qv", "pirate"),
        ("lora-qv", "json"),
        ("extra", "safety"),
    ]
    with pytest.raises(SystemExit):
        parse_extras(["safety"])
