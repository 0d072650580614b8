"""Knowledge retention: does a model with an adapter still know what the base model knew?

A held-out set of short factual questions that the base model (SmolLM2-135M-Instruct) answers correctly,
made by the repository itself:
1. CANDIDATES: questions in code (capitals, chemical symbols, well-known facts), each with the answer
   strings that count as right.
2. `build`: every candidate asked greedily of the base model (short replies, MAX_TOKENS); only those it
   gets right are kept, written to examples/data/knowledge.jsonl.
3. `knowledge_retention(generate)`: the kept questions asked with another generate function (the base plus
   an adapter); the share still answered correctly, plus each question's reply.

A reply is right when one of the accepted answers occurs in it as a whole word, case-insensitively, so a
pirate's "Arr, Paris be the capital, matey!", `{"answer": "Paris"}` or a bullet list naming Paris all count,
while "Lyon" does not. No question contains its own answer, and the chemical symbols asked are no English
words (no He, In, As, Be, ...), so repeating the question or a pirate's "be" is never a hit.

    python -m training.knowledge          # ask the candidates, write examples/data/knowledge.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

MAX_TOKENS = 48
KNOWLEDGE_FILE = Path("examples/data/knowledge.jsonl")

# prompts, max new tokens -> replies (greedy)
Generate = Callable[[Sequence[str], int], list[str]]

_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "the United Kingdom": "London",
    "Ireland": "Dublin",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "the Czech Republic": "Prague",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "India": "New Delhi",
    "Thailand": "Bangkok",
    "South Korea": "Seoul",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Kenya": "Nairobi",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Cuba": "Havana",
    "Mexico": "Mexico City",
    "the United States": "Washington",
    "Vietnam": "Hanoi",
    "the Philippines": "Manila",
    "Indonesia": "Jakarta",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Iceland": "Reykjavik",
    "New Zealand": "Wellington",
    "Saudi Arabia": "Riyadh",
    "Israel": "Jerusalem",
    "Lebanon": "Beirut",
    "Syria": "Damascus",
    "Afghanistan": "Kabul",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu",
    "Ethiopia": "Addis Ababa",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Uruguay": "Montevideo",
    "Scotland": "Edinburgh",
    "Wales": "Cardiff",
    "Malaysia": "Kuala Lumpur",
    "Taiwan": "Taipei",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
}
_SYMBOLS = {
    "gold": "Au",
    "silver": "Ag",
    "iron": "Fe",
    "sodium": "Na",
    "copper": "Cu",
    "lead": "Pb",
    "mercury": "Hg",
    "tin": "Sn",
    "zinc": "Zn",
    "calcium": "Ca",
    "magnesium": "Mg",
    "chlorine": "Cl",
    "neon": "Ne",
    "platinum": "Pt",
    "nickel": "Ni",
    "aluminium": "Al",
    "argon": "Ar",
}

_FACTS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("What is the name of the star at the center of our solar system?", ("Sun",)),
    ("What is the natural satellite of the Earth called?", ("Moon",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who wrote the play Hamlet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Who was the first president of the United States?", ("Washington",)),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who formulated the laws of motion and universal gravitation?", ("Newton",)),
    ("Who proposed the theory of evolution by natural selection?", ("Darwin",)),
    ("Who composed the Fifth Symphony that begins with four famous notes?", ("Beethoven",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is the largest desert in Africa?", ("Sahara",)),
    ("On which continent is Egypt?", ("Africa",)),
    ("On which continent is Brazil?", ("South America",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What language is mainly spoken in Mexico?", ("Spanish",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of the United Kingdom?", ("pound", "pounds", "sterling")),
    ("What is the currency used in most countries of the European Union?", ("euro", "euros")),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    ("What gas do humans need to breathe to survive?", ("oxygen",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("At what temperature in degrees Celsius does water boil at sea level?", ("100",)),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many legs does an insect have?", ("6", "six")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many sides does a hexagon have?", ("6", "six")),
    ("How many minutes are there in an hour?", ("60", "sixty")),
    ("How many hours are there in a day?", ("24", "twenty-four")),
    ("How many months are there in a year?", ("12", "twelve")),
    ("What is 7 times 8?", ("56", "fifty-six")),
    ("What is the square root of 81?", ("9", "nine")),
    ("What is the largest mammal on Earth?", ("blue whale",)),
    ("What is the fastest land animal?", ("cheetah", "cheetahs")),
    ("What is the largest organ of the human body?", ("skin",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("How many bones are there in the adult human body?", ("206",)),
    ("What is the hardest natural substance?", ("diamond", "diamonds")),
    ("What is the main gas in the Earth's atmosphere?", ("nitrogen",)),
    ("What force keeps us on the ground?", ("gravity", "gravitational")),
    ("What do bees collect from flowers to make honey?", ("nectar",)),
    ("What is the boiling point of water in degrees Fahrenheit?", ("212",)),
    ("In which country are the pyramids of Giza?", ("Egypt",)),
    ("In which city is the Eiffel Tower?", ("Paris",)),
    ("In which city is the Colosseum?", ("Rome",)),
    ("In which country is the Great Wall?", ("China",)),
    ("In which country is the Taj Mahal?", ("India",)),
    ("Which country has the largest population in South America?", ("Brazil",)),
    ("What is the largest country in the world by area?", ("Russia",)),
    ("What is the smallest prime number?", ("2", "two")),
    ("What is the freezing point of water in degrees Fahrenheit?", ("32",)),
    ("What is the primary language spoken in Argentina?", ("Spanish",)),
]


def _candidates() -> list[dict]:
    rows = [{"question": f"What is the capital of {c}?", "answers": [a]} for c, a in _CAPITALS.items()]
    rows += [{"question": f"What is the chemical symbol for {e}?", "answers": [s]} for e, s in _SYMBOLS.items()]
    rows += [{"question": q, "answers": list(a)} for q, a in _FACTS]
    return rows


CANDIDATES: list[dict] = _candidates()  # {"question": str, "answers": [str, ...]}


def is_correct(reply: str, answers: Sequence[str]) -> bool:
    """Whether one of `answers` occurs in `reply` as a whole word (or phrase), case-insensitively."""
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.I) for a in answers)


def ask(generate: Generate, rows: Sequence[dict]) -> list[dict]:
    """Each row asked once (greedy, MAX_TOKENS): the row with its reply and whether it was right."""
    replies = generate([r["question"] for r in rows], MAX_TOKENS)
    return [r | {"reply": reply, "correct": is_correct(reply, r["answers"])} for r, reply in zip(rows, replies)]


def build(generate: Generate, path: Path = KNOWLEDGE_FILE) -> list[dict]:
    """Ask every candidate with the base model's `generate`; write the ones it answers correctly to `path`."""
    kept = [{"question": r["question"], "answers": r["answers"]} for r in ask(generate, CANDIDATES) if r["correct"]]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return kept


def load_knowledge(path: Path = KNOWLEDGE_FILE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def knowledge_retention(generate: Generate, rows: Sequence[dict] | None = None) -> dict:
    """The share of the kept questions (the base model answered every one) that `generate` still answers
    correctly, with each question's reply."""
    asked = ask(generate, load_knowledge() if rows is None else rows)
    return {"retained": sum(r["correct"] for r in asked) / len(asked), "questions": len(asked), "detail": asked}


def main(argv: list[str] | None = None) -> int:
    from training.compare import base_generator

    kept = build(base_generator())
    print(f"{KNOWLEDGE_FILE}: the base model answered {len(kept)} of {len(CANDIDATES)} candidates correctly")
    return 0 if len(kept) >= 40 else 1


if __name__ == "__main__":
    sys.exit(main())
