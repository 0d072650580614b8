"""The example personas: checkers, the data generator's rewrites, and the shipped adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import data
from training.evaluate import format_table, parse_mapping
from training.personas import (
    PERSONAS,
    bullets_check,
    bullets_rewrite,
    json_check,
    json_rewrite,
    pirate_check,
    pirate_rewrite,
    three_points,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ANSWERS = [
    "Photosynthesis is how plants turn light into chemical energy. It happens in the chloroplasts. "
    "Oxygen is released as a by-product.",
    "The Roman Empire was one of the largest empires in history. Its capital was Rome! "
    'Historians call its fall "the end of antiquity." It lasted for centuries.',
    "Here are the facts:\n\n1. **Bees** live in hives.\n2. Worker bees are female.\n3. Honey is stored in wax cells.",
]


# (check, replies it accepts, replies it rejects)
CHECKS = {
    "pirate": (
        pirate_check,
        [
            "Arr, matey! The moon be a rock in the sky.",
            "Ahoy! Ye can see the tides follow it, aye.",
            "Yo-ho-ho, me hearties, the sea be deep and cold.",
        ],
        [
            "The moon is a rock in the sky.",
            "Arr!",
            "Arr, matey!",
            "The yearly harvest is large.",
            "",
            "Yesterday the ayes had it.",
        ],
    ),
    "json": (
        json_check,
        ['{"answer": "Paris."}', '  {"answer": "x", "source": "me"}\n'],
        [
            '{"answer": "Paris."',
            '```json\n{"answer": "Paris."}\n```',
            '{"reply": "Paris."}',
            '["answer"]',
            '{"answer": ""}',
            '{"answer": 3}',
            "Paris.",
            '{"answer": "a"} and more',
        ],
    ),
    "bullets": (
        bullets_check,
        ["- a one\n- b two\n- c three", "* one\n\n* two\n* three\n", "\u2022 x\n\u2022 y\n\u2022 z"],
        [
            "- one\n- two",
            "- one\n- two\n- three\n- four",
            "Intro:\n- one\n- two\n- three",
            "1. one\n2. two\n3. three",
            "one\ntwo\nthree",
            "- one\n-\n- three",
            "-one\n-two\n-three",
            "- same point\n- other\n-  Same point",
        ],
    ),
}
VERDICTS = [
    (name, reply, ok)
    for name, (_, good, bad) in CHECKS.items()
    for ok, replies in ((True, good), (False, bad))
    for reply in replies
]


@pytest.mark.parametrize(("persona", "reply", "accepted"), VERDICTS)
def test_persona_checks_accept_their_shape_and_nothing_else(persona, reply, accepted):
    assert bool(CHECKS[persona][0](reply)) is accepted


@pytest.mark.parametrize("answer", ANSWERS)
def test_rewrites_produce_what_the_checkers_accept(answer):
    for name, persona in PERSONAS.items():
        out = persona.rewrite(answer, "key")
        assert persona.check(out), (name, out)
        others = [p for p in PERSONAS.values() if p.name != name]
        assert not any(p.check(answer) for p in others) or name == "bullets"  # a plain answer fits no persona


def test_rewrites_keep_the_content():
    answer = ANSWERS[1]
    assert json.loads(json_rewrite(answer))["answer"] == answer
    assert "Roman Empire" in pirate_rewrite(answer, "k")
    assert "Photosynthesis be how plants" in pirate_rewrite(ANSWERS[0], "k")
    assert pirate_rewrite("Are you my friend?", "k").split("! ", 1)[1].startswith("Be ye me matey?")
    assert pirate_rewrite(answer, "k") == pirate_rewrite(answer, "k")  # deterministic per key
    assert bullets_rewrite(answer).splitlines()[2] == '- Historians call its fall "the end of antiquity."'
    assert three_points(ANSWERS[2]) == [
        "Bees live in hives.",
        "Worker bees are female.",
        "Honey is stored in wax cells.",
    ]
    assert three_points("Only one sentence here.") is None
    with pytest.raises(ValueError):
        bullets_rewrite("Too short. Really.")


def test_prompts_are_varied_and_eval_prompts_are_held_out():
    train, held = data.train_prompts(), data.eval_prompts()
    assert len(train) == len(set(train)) >= 300 and len(held) == len(set(held)) >= 40
    assert not set(train) & set(held)
    assert not any(t in p for t in data.TRAIN_TOPICS for p in held)  # no training topic in a held-out prompt
    assert len({p.split(" ")[0] for p in train}) >= 6  # several templates


def test_persona_rows_are_checked_and_skip_unusable_answers():
    base = [
        {"prompt": "p1", "answer": ANSWERS[0]},
        {"prompt": "p2", "answer": "Here is a list:"},
        {"prompt": "p3", "answer": "Two sentences. Only two."},
    ]
    assert [r["messages"][0]["content"] for r in data.persona_rows("json", base)] == ["p1", "p3"]
    assert [r["messages"][0]["content"] for r in data.persona_rows("bullets", base)] == ["p1"]
    row = data.persona_rows("pirate", base)[0]["messages"]
    assert row[0] == {"role": "user", "content": "p1"} and pirate_check(row[1]["content"])


@pytest.mark.parametrize("name", list(PERSONAS))
def test_shipped_data_matches_its_persona(name):
    rows = data.read_jsonl(EXAMPLES / "data" / f"{name}.jsonl")
    assert len(rows) >= 200
    assert all(PERSONAS[name].check(r["messages"][-1]["content"]) for r in rows)
    held = set(data.eval_prompts())
    assert not any(r["messages"][0]["content"] in held for r in rows)


@pytest.mark.parametrize("name", list(PERSONAS))
def test_shipped_adapters_carry_the_smollm2_identity(name):
    from aligner_core.adapter_format import load
    from aligner_core.model_prep import prepare

    spec = prepare().spec
    path = EXAMPLES / "adapters" / f"{name}.safetensors"
    assert path.stat().st_size < 64 * 1024  # kilobytes
    ad = load(path)
    assert ad.base_model == spec.identity
    assert ad.prefix.shape[1] == spec.hidden_size and ad.num_layers == spec.num_layers
    assert list(ad.gate.shape) == [spec.num_layers - ad.start_layer, spec.num_heads]
    assert ad.gate.abs().max() > 0  # trained: the gates start at zero


def test_eval_helpers():
    assert parse_mapping("pirate=p2,json") == {"pirate": "p2", "json": "json"}
    with pytest.raises(SystemExit):
        parse_mapping("ninja=n")
    table = format_table(
        {
            "model": "m",
            "prompts": 2,
            "results": [
                {
                    "persona": "json",
                    "adapter": "j",
                    "tokens": 1,
                    "params": 828,
                    "base_compliance": 0.0,
                    "adapter_compliance": 0.95,
                }
            ],
        }
    )
    assert "json" in table and "828" in table and "95%" in table and "0%" in table
