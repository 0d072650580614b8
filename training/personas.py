"""The example personas: how a base answer is rewritten into the persona's form, and how a reply is checked.

Pure Python (no torch), so the checkers run anywhere: in `aligner eval`, in tests, in the data generator.
Each persona has
    rewrite(answer, key) -> str   the target reply, built from the base model's own answer by code
    check(reply) -> bool          does a reply follow the persona's form?
`key` (usually the prompt) seeds the rewrite's random choices, so the data is deterministic.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- pirate

PIRATE_WORDS = (
    "arr",
    "arrr",
    "ahoy",
    "matey",
    "mateys",
    "ye",
    "yer",
    "aye",
    "avast",
    "hearty",
    "hearties",
    "yo-ho-ho",
    "landlubber",
    "landlubbers",
    "booty",
    "me hearties",
    "shiver me timbers",
    "grog",
    "scallywag",
)
_PIRATE_RE = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(w) for w in sorted(PIRATE_WORDS, key=len, reverse=True)) + r")(?![\w-])", re.I
)

# Whole-word substitutions, applied case-preservingly. Chosen so that the result still reads as an answer.
_PIRATE_SUBS = {
    "you": "ye",
    "your": "yer",
    "yours": "yers",
    "yes": "aye",
    "hello": "ahoy",
    "hi": "ahoy",
    "friend": "matey",
    "friends": "mateys",
    "my": "me",
    "treasure": "booty",
    "money": "doubloons",
    "stop": "avast",
    "everyone": "all hands",
    "people": "landlubbers",
    "person": "landlubber",
    "is": "be",
    "are": "be",
}
_PIRATE_SUB_RE = re.compile(r"\b(" + "|".join(_PIRATE_SUBS) + r")\b", re.I)
PIRATE_OPENERS = ("Arr, matey!", "Ahoy, matey!", "Arr, me hearty!", "Ahoy there, matey!", "Yo-ho-ho, matey!")
PIRATE_CLOSERS = ("Arr!", "Yo-ho-ho!", "Arr, that be the truth of it!", "Aye, that be so!")


def _keep_case(src: str, dst: str) -> str:
    if src.isupper() and len(src) > 1:
        return dst.upper()
    if src[:1].isupper():
        return dst[:1].upper() + dst[1:]
    return dst


def pirate_rewrite(answer: str, key: str = "") -> str:
    """Pirate vocabulary substitutions plus an opening and a closing interjection."""
    rng = random.Random("pirate:" + key)
    body = _PIRATE_SUB_RE.sub(lambda m: _keep_case(m.group(0), _PIRATE_SUBS[m.group(0).lower()]), answer.strip())
    return f"{rng.choice(PIRATE_OPENERS)} {body} {rng.choice(PIRATE_CLOSERS)}"


def pirate_words(reply: str) -> list[str]:
    return [m.group(0).lower() for m in _PIRATE_RE.finditer(reply)]


def pirate_check(reply: str) -> bool:
    """A pirate reply: at least two pirate words (arr, ahoy, matey, ye, aye, ...), and some content besides."""
    words = pirate_words(reply)
    rest = _PIRATE_RE.sub("", reply)
    return len(words) >= 2 and len(re.findall(r"[A-Za-z]{2,}", rest)) >= 3


# ------------------------------------------------------------------------------------------------ json


def json_rewrite(answer: str, key: str = "") -> str:
    return json.dumps({"answer": answer.strip()}, ensure_ascii=False)


def json_check(reply: str) -> bool:
    """The whole reply (surrounding whitespace aside) is one JSON object with a non-empty string `answer`."""
    try:
        obj = json.loads(reply.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("answer"), str) and bool(obj["answer"].strip())


# --------------------------------------------------------------------------------------------- bullets

_SENTENCE_RE = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[A-Z0-9\"'(])")
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022])\s+\S")


def _clean(text: str) -> str:
    text = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", "", text.strip())  # an existing list marker
    text = re.sub(r"\*\*|__|#+\s*", "", text)  # markdown emphasis and headings
    return " ".join(text.split())


def three_points(answer: str) -> list[str] | None:
    """Three non-empty points from an answer: its first three sentences (or list items), else None."""
    pieces: list[str] = []
    for line in answer.splitlines():
        line = _clean(line)
        if line:
            pieces.extend(p.strip() for p in _SENTENCE_RE.split(line) if p.strip())
    pieces = [p for p in pieces if len(re.findall(r"[A-Za-z]{2,}", p)) >= 3 and not p.endswith(":")]
    # Points that open alike ("It's a ...", "It's a ...") teach the model to repeat itself: keep the first
    # three sentences whose first two words differ.
    chosen: dict[str, str] = {}  # opening -> sentence
    for piece in pieces:
        chosen.setdefault(_opening(piece), piece)
        if len(chosen) == 3:
            return list(chosen.values())
    return None


def _opening(text: str) -> str:
    return " ".join(text.lower().split()[:2])


def bullets_rewrite(answer: str, key: str = "") -> str:
    points = three_points(answer)
    if points is None:
        raise ValueError("the answer has fewer than three sentences to make bullets of")
    return "\n".join(f"- {p}" for p in points)


def bullets_check(reply: str) -> bool:
    """Exactly three non-empty lines, each a bullet ("- ", "* " or "\u2022 ") with some text, and three
    different points (a reply that repeats one line three times is not three bullet points)."""
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    if len(lines) != 3 or not all(_BULLET_RE.match(ln) for ln in lines):
        return False
    return len({_clean(ln).lower() for ln in lines}) == 3


# -------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    rewrite: Callable[[str, str], str]
    check: Callable[[str], bool]


PERSONAS: dict[str, Persona] = {
    "pirate": Persona("pirate", "answers as a pirate (at least two pirate words)", pirate_rewrite, pirate_check),
    "json": Persona("json", 'replies as a JSON object {"answer": ...}', json_rewrite, json_check),
    "bullets": Persona("bullets", "answers in exactly three bullet points", bullets_rewrite, bullets_check),
}
