"""The shipped example personas, each trained from scratch by one command.

    python -m training.recipes                 # all of them (pirate, json, bullets, safety), one after another
    python -m training.recipes pirate          # one of them
    python -m training.recipes --print         # just print the equivalent `aligner train` commands

Each recipe is exactly an `aligner train` command line (see RECIPES); examples/README.md lists them.
The data comes from `aligner make-data --out examples/data` (safety: `python -m training.safety`).

Deviation from the paper's defaults (documented): lr 3e-2 instead of 9e-3. With zero-initialised gates and
a budget of 60 optimizer steps on a 2-core CPU, 9e-3 moves the gates too little; the CLI default stays
the paper's 9e-3.
"""

from __future__ import annotations

import shlex
import sys

COMMON = [
    "--tokens",
    "1",
    "--lr",
    "3e-2",
    "--steps",
    "60",
    "--batch-size",
    "8",
    "--val-split",
    "0.05",
    "--eval-every",
    "20",
    "--seed",
    "0",
]


def _recipe(name: str, tokens: int, *extra: str, data: str = "", output: str = "", **common: str) -> list[str]:
    """One `aligner train` command line: examples/data/<data or name>.jsonl -> examples/adapters/<name>, with
    COMMON's settings (`tokens` and any `common` key, e.g. lr="1e-2", replacing COMMON's value) and `extra`."""
    args = list(COMMON)
    for key, value in {"tokens": str(tokens), **common}.items():
        args[args.index("--" + key) + 1] = value
    return [
        "--data",
        f"examples/data/{data or name}.jsonl",
        "--output",
        output or f"examples/adapters/{name}.safetensors",
        *args,
        *extra,
    ]


# Each recipe: one or more `aligner train` invocations, run in order. N = 1 everywhere except pirate:
# with N = 1 it reached 62-65% compliance (also after 40 more steps; 38% with --decision-weight 10, 52% with
# lr 1e-1), with N = 10 95%. bullets weighs its layout tokens (line breaks, line starts, end of turn) 10x:
# plain SFT gave 40% (two or four bullets); weight 30 made three lines more often but repeated lines more
# often too (examples/README.md).
# safety is the paper's Beaver recipe in miniature: SFT on the chosen replies (into build/, not shipped), then
# DPO on the preference pairs from it, with it as the reference policy (N = 1 comes from the reference).
SAFETY_SFT = "build/safety-sft.safetensors"
RECIPES: dict[str, list[list[str]]] = {
    "pirate": [_recipe("pirate", 10)],
    "json": [_recipe("json", 1)],
    "bullets": [_recipe("bullets", 1, "--decision-weight", "10")],
    "safety": [
        _recipe("safety", 1, data="safety_sft", output=SAFETY_SFT),
        _recipe("safety", 1, "--method", "dpo", "--ref-adapter", SAFETY_SFT, data="safety_dpo", lr="5e-4", steps="40"),
    ],
}


def command(name: str) -> str:
    return " && ".join("aligner train " + shlex.join(args) for args in RECIPES[name])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--print" in argv:
        for name in RECIPES:
            print(command(name))
        return 0
    names = [a for a in argv if not a.startswith("-")] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    from training.train import main as train_main

    for name in names:
        print(f"$ {command(name)}", flush=True)
        for args in RECIPES[name]:
            rc = train_main(args)
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
