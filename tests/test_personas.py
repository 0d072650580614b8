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


def test_eval_sweep_and_stack_reports(monkeypatch):
    """`--scales` and `--stack` (no server: `collect` answers from a table): each scale and the stack become
    one `adapters` variant, and the reports count each checker, all checkers, and replies equal to the base's
    and the plain adapter's."""
    from training import evaluate as ev

    assert ev.parse_scales("0, 0.5,1,1.5") == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(SystemExit):
        ev.parse_scales("half")
    pirate = "Arr, matey, the sea be wide and the ship be fast."
    bullets = "- one point\n- another point\n- a third point"
    asked: dict = {}

    def collect(base_url, api_key, adapters, prompts, *, variants=None, **kw):
        asked.update(adapters=adapters, variants=variants)
        by_variant = {
            "pirate@0": ["plain.", "plain."],
            "pirate@0.5": [pirate, "plain."],
            "pirate@1": [pirate, pirate],
            "json+bullets": ['{"answer": "x"}', bullets],
        }
        return ev.Replies(
            "m",
            {p: {"tokens": 1, "params": 8} for p in adapters},
            ["plain.", "plain."],
            {"pirate": [pirate, pirate], "json": ['{"answer": "x"}'] * 2, "bullets": [bullets, "no"]},
            0.1,
            {label: by_variant[label] for label in variants},
        )

    monkeypatch.setattr(ev, "collect", collect)
    report = ev.evaluate("u", "k", {"pirate": "pirate"}, ["q1", "q2"], scales=[0, 0.5, 1], stack=["json", "bullets"])
    assert asked["adapters"] == {"pirate": "pirate", "json": "json", "bullets": "bullets"}  # each alone too
    assert asked["variants"] == {
        "pirate@0": [{"name": "pirate", "scale": 0}],
        "pirate@0.5": [{"name": "pirate", "scale": 0.5}],
        "pirate@1": [{"name": "pirate", "scale": 1}],
        "json+bullets": [{"name": "json"}, {"name": "bullets"}],
    }  # only the named persona is swept, not the stack's
    sweep = {r["scale"]: r for r in report["sweep"]}
    assert [sweep[s]["compliance"] for s in (0, 0.5, 1)] == [0.0, 0.5, 1.0]
    assert sweep[0]["same_as_base"] == 1.0 and sweep[1]["same_as_adapter"] == 1.0
    rows = {r["replies"]: r for r in report["stack"]["rows"]}
    assert rows["json + bullets"]["each"] == {"json": 0.5, "bullets": 0.5} and rows["json + bullets"]["all"] == 0.0
    assert rows["json alone"]["each"]["json"] == 1.0 and rows["bullets alone"]["each"]["bullets"] == 0.5
    text = ev.format_report(report)
    assert "| pirate | pirate | 0.5 | 50% | 50% | 50% |" in text
    assert "| json + bullets | 50% | 50% | 0% |" in text and "| base | 0% | 0% | 0% |" in text


def test_eval_without_the_new_flags_asks_what_it_asked(monkeypatch):
    from training import evaluate as ev

    seen: dict = {}

    def collect(base_url, api_key, adapters, prompts, **kw):
        seen.update(kw)
        return ev.Replies("m", {"json": {"tokens": 1, "params": 8}}, ["x"], {"json": ['{"answer": "y"}']}, 0.1)

    monkeypatch.setattr(ev, "collect", collect)
    report = ev.evaluate("u", "k", {"json": "json"}, ["q"], max_tokens=5)
    assert "variants" not in seen and "sweep" not in report and "stack" not in report
    assert ev.format_report(report) == ev.format_table(report)
