"""Fine-tuning files: OpenAI's two JSONL formats, checked line by line, and turned into the trainer's rows.

    chat (method "supervised"):   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preference (method "dpo"):    {"input": {"messages": [...]},
                                   "preferred_output": [{"role": "assistant", "content": str}],
                                   "non_preferred_output": [{"role": "assistant", "content": str}]}

A file holds one kind; the first example decides which, and every later line must be of that kind. A bad
line is refused with its number (`line 3: ...`), before anything is stored. An assistant message may carry
OpenAI's `"weight": 0 | 1` (0: context only, not trained). Tool calls, tools and images are not trained on
here, so a file using them is refused rather than trained without them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters_store import FileFormat
from server.errors import InvalidRequest

CHAT: FileFormat = "chat"
PREFERENCE: FileFormat = "preference"
#: the job method each file format trains
METHOD_FORMAT = {"supervised": CHAT, "dpo": PREFERENCE}
ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = {"role", "content", "weight", "name"}


@dataclass(frozen=True)
class ParsedFile:
    format: FileFormat
    rows: list[
        dict
    ]  # the trainer's rows (training.train.load_examples): {"messages"} or {"messages", "chosen", "rejected"}


def _refuse(line: int, message: str) -> InvalidRequest:
    return InvalidRequest(f"line {line}: {message}", param="file", code="invalid_file")


def _messages(line: int, value: Any, where: str, *, assistant_only: bool = False) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _refuse(line, f"{where} must be a non-empty list of messages")
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise _refuse(line, f"{at} must be an object with role and content")
        extra = set(m) - _MESSAGE_KEYS
        if extra:
            unsupported = "tool calls are not supported" if {"tool_calls", "function_call"} & extra else "unknown"
            raise _refuse(line, f"{at} has {', '.join(sorted(extra))} ({unsupported})")
        role = m.get("role")
        if role not in ROLES or (assistant_only and role != "assistant"):
            allowed = "assistant" if assistant_only else ", ".join(ROLES)
            raise _refuse(line, f"{at}.role must be {allowed}, not {json.dumps(role)[:40]}")
        if not isinstance(m.get("content"), str):
            raise _refuse(line, f"{at}.content must be a string (text only)")
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            raise _refuse(line, f"{at}.weight must be 0 or 1, on an assistant message")
    return value


def _chat(line: int, row: dict) -> dict:
    if set(row) != {"messages"}:
        raise _refuse(line, f"a chat example has only 'messages'; found {', '.join(sorted(set(row) - {'messages'}))}")
    messages = _messages(line, row["messages"], "messages")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise _refuse(line, "no assistant message to train on (each example needs one, with weight 1)")
    return {"messages": messages}


def _preference(line: int, row: dict) -> dict:
    keys = {"input", "preferred_output", "non_preferred_output"}
    if set(row) != keys:
        missing, extra = keys - set(row), set(row) - keys
        raise _refuse(
            line,
            f"a preference example has exactly {', '.join(sorted(keys))}"
            + (f"; missing {', '.join(sorted(missing))}" if missing else f"; found {', '.join(sorted(extra))}"),
        )

    given = row["input"]
    if not isinstance(given, dict) or set(given) != {"messages"}:
        raise _refuse(line, "input must be an object with only 'messages' (tools are not supported)")
    prompt = _messages(line, given["messages"], "input.messages")
    if prompt[-1]["role"] == "assistant":
        raise _refuse(line, "input.messages must end with a user (or system) message: the outputs answer it")
    out = {"messages": prompt}
    for key, as_ in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        reply = _messages(line, row[key], key, assistant_only=True)
        if len(reply) != 1:
            raise _refuse(line, f"{key} must hold exactly one assistant message")
        out[as_] = reply
    return out


def parse(data: bytes) -> ParsedFile:
    """Check every line of an uploaded file; InvalidRequest (400, naming the line) at the first bad one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the file is not UTF-8 text (byte {e.start})", param="file", code="invalid_file") from e
    kind: FileFormat | None = None
    rows: list[dict] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _refuse(number, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise _refuse(number, "each line must be a JSON object")
        this: FileFormat = PREFERENCE if "input" in row or "preferred_output" in row else CHAT
        if kind is not None and this != kind:
            raise _refuse(number, f"a {this} example in a file of {kind} examples (line 1's kind); use one kind")
        kind = this
        rows.append(_chat(number, row) if kind == CHAT else _preference(number, row))
    if kind is None:
        raise InvalidRequest("the file has no examples (it is empty)", param="file", code="invalid_file")
    return ParsedFile(kind, rows)


def to_jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def count_tokens(tokenizer, parsed: ParsedFile) -> int:
    """Tokens of every example as the trainer renders it (the chat template; both outputs of a preference)."""

    def n(messages: list[dict]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    total = 0
    for r in parsed.rows:
        if parsed.format == CHAT:
            total += n(r["messages"])
        else:
            total += n(r["messages"] + r["chosen"]) + n(r["messages"] + r["rejected"])
    return total
