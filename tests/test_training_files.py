"""Fine-tuning files and job plans, without a server: OpenAI's JSONL formats checked line by line, the
trainer's rows they become, and every "auto" hyperparameter fixed by `plan_job`."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from adapters_store import FileRecord
from server.errors import InvalidRequest
from server.fine_tuning import JobCreate, adapter_name, plan_job
from server.training_files import CHAT, PREFERENCE, parse


def line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy!"}]}
PREF_ROW = {
    "input": {"messages": [{"role": "user", "content": "hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello."}],
    "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
}


def test_a_chat_file_becomes_the_trainers_rows() -> None:
    parsed = parse(line(CHAT_ROW) + b"\n" + line(CHAT_ROW))
    assert parsed.format == CHAT and parsed.rows == [CHAT_ROW, CHAT_ROW]


def test_a_preference_file_becomes_prompt_chosen_rejected() -> None:
    parsed = parse(line(PREF_ROW))
    assert parsed.format == PREFERENCE
    assert parsed.rows == [
        {
            "messages": PREF_ROW["input"]["messages"],
            "chosen": PREF_ROW["preferred_output"],
            "rejected": PREF_ROW["non_preferred_output"],
        }
    ]


def test_weight_zero_turns_are_context_and_a_file_needs_a_trained_one() -> None:
    ok = {
        "messages": [
            *CHAT_ROW["messages"],
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "x", "weight": 0},
        ]
    }
    assert parse(line(ok)).rows == [ok]
    only_context = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]}
    with pytest.raises(InvalidRequest, match="line 1: no assistant message"):
        parse(line(only_context))


BAD = [
    (b"{not json}\n", "line 1: not valid JSON"),
    (b"[1, 2]\n", "line 1: each line must be a JSON object"),
    (line(CHAT_ROW) + line({"messages": []}), "line 2: messages must be a non-empty list"),
    (
        line({"messages": [{"role": "bot", "content": "x"}]}),
        'line 1: messages[0].role must be system, user, assistant, not "bot"',
    ),
    (line({"messages": [{"role": "user", "content": ["image"]}]}), "messages[0].content must be a string"),
    (
        line({"messages": [{"role": "assistant", "content": "", "tool_calls": []}]}),
        "tool calls are not supported",
    ),
    (line({**CHAT_ROW, "tools": []}), "a chat example has only 'messages'; found tools"),
    (line({"messages": [{"role": "user", "content": "x", "weight": 1}]}), "weight must be 0 or 1, on an assistant"),
    (line(CHAT_ROW) + line(PREF_ROW), "line 2: a preference example in a file of chat examples"),
    (line({k: v for k, v in PREF_ROW.items() if k != "non_preferred_output"}), "missing non_preferred_output"),
    (line({**PREF_ROW, "preferred_output": PREF_ROW["preferred_output"] * 2}), "exactly one assistant message"),
    (line({**PREF_ROW, "preferred_output": [{"role": "user", "content": "x"}]}), "role must be assistant"),
    (
        line({**PREF_ROW, "input": {"messages": CHAT_ROW["messages"]}}),
        "input.messages must end with a user (or system) message",
    ),
    (b"", "no examples"),
    (b"   \n\n", "no examples"),
    (b"\xc3\x28", "not UTF-8"),
]


@pytest.mark.parametrize(("data", "message"), BAD)
def test_a_bad_line_is_refused_by_number(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse(data)
    assert message in e.value.message and e.value.param == "file"


def _file(fmt: str = CHAT, lines: int = 40) -> FileRecord:
    return FileRecord("file-1", "ten_1", "f.jsonl", "fine-tune", fmt, lines, 100, datetime.now(UTC))  # type: ignore[arg-type]


def _plan(body: dict, training: FileRecord | None = None, **kw) -> dict:
    from support import real_model

    spec = real_model().spec
    args = {"spec": spec, "served": {spec.identity}, "validation": None, "max_tokens": 16, "max_steps": 2000} | kw
    return plan_job(
        JobCreate(**({"model": spec.identity, "training_file": "file-1"} | body)), training=training or _file(), **args
    )


def test_auto_hyperparameters_are_fixed_in_the_plan() -> None:
    plan = _plan({})
    assert plan | {"metadata": None} == {
        "method": "supervised",
        "n_epochs": 10,  # ceil(480 / 40) = 12, at most 10
        "batch_size": 8,
        "learning_rate_multiplier": 1.0,
        "lr": 3e-2,
        "beta": None,
        "steps": 50,
        "tokens": 1,
        "start_layer": 2,
        "gate_activation": "identity",
        "seed": 0,
        "suffix": None,
        "metadata": None,
    }
    dpo = _plan(
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}}, _file(PREFERENCE)
    )
    assert (dpo["beta"], dpo["lr"], dpo["steps"]) == (0.1, 5e-4, 20)
    legacy = _plan({"hyperparameters": {"n_epochs": 1, "learning_rate_multiplier": 2}})
    assert (legacy["n_epochs"], legacy["lr"]) == (1, 6e-2)


@pytest.mark.parametrize(
    ("body", "kw", "param"),
    [
        ({"model": "gpt-4o"}, {}, "model"),
        ({"method": {"type": "dpo"}}, {}, "training_file"),
        ({"suffix": "bad suffix!"}, {}, "suffix"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            {},
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
            {},
            "method.supervised.hyperparameters.beta",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
            {},
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        ({"hyperparameters": {"n_epochs": 50}}, {"max_steps": 100}, "hyperparameters.n_epochs"),
        ({"aligner": {"tokens": 17}}, {}, "aligner.tokens"),
        ({"aligner": {"start_layer": 30}}, {}, "aligner.start_layer"),
        ({"integrations": [{"type": "wandb"}]}, {}, "integrations"),
        ({"hyperparameters": {}, "method": {"type": "supervised"}}, {}, "hyperparameters"),
    ],
)
def test_a_bad_job_names_its_field(body: dict, kw: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        _plan(body, **kw)
    assert e.value.param == param, e.value.message


def test_the_adapter_name_is_a_valid_adapter_name() -> None:
    from server.schemas import check_name

    job = "ftjob-0123456789abcdef0123456789abcdef"
    assert adapter_name(job, "pirate") == "ft-pirate-0123456789ab" == check_name(adapter_name(job, "pirate"))
    assert adapter_name(job, None) == "ft-0123456789ab"
    assert check_name(adapter_name(job, "a" * 40))
