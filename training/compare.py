"""Aligner against LoRA on the same data: persona compliance, knowledge retained, size and training time.

    python -m training.compare                          # the full grid -> bench/results/aligner-vs-lora.json
    python -m training.compare --quick                  # a smoke run: 2-step LoRAs, 4 prompts, short replies
    python -m training.compare --personas json --methods base,aligner,lora-qv
    python -m training.compare --extra safety=examples/adapters/safety.safetensors   # knowledge only

Methods: `base` (the model alone), `aligner` (the shipped examples/adapters/<persona>.safetensors, not
retrained), `lora-qv` and `lora-all` (training/lora.py: rank 8 on q_proj,v_proj or on every linear layer,
trained on the same data with the same loss and budget; trained here first when .cache/lora/ lacks them).

Every method runs through one generation path: Hugging Face `generate` on the float32 model, greedy,
left-padded batches; the Aligner term comes from the repository's reference forward
(`aligner_core.reference.attached_adapter`), LoRA from PEFT. Each reply to the 40 held-out prompts
(`training.data.eval_prompts`, topics unseen in training) is judged by the persona's checker
(`training.personas.PERSONAS`) with at most 200 new tokens, as `aligner eval` does; knowledge retention asks
the questions of examples/data/knowledge.jsonl (`training.knowledge`). Results are kept per cell, so a
second run only computes the cells it lacks (`--fresh` recomputes them all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data import HF_BATCH, generator
from training.knowledge import Generate, knowledge_retention, load_knowledge
from training.personas import PERSONAS

METHODS = ("base", "aligner", "lora-qv", "lora-all")
MAX_TOKENS = 200  # as `aligner eval`
RESULTS = Path("bench/results/aligner-vs-lora.json")
QUICK_RESULTS = Path("bench/results/aligner-vs-lora-quick.json")
ALIGNER_DIR = Path("examples/adapters")


# ------------------------------------------------------------------------------------------ generation


def load_base(model: str = "smollm2-135m-instruct"):
    """The base model (float32, eager attention, as the trainers load it) and its tokenizer."""
    from transformers import AutoTokenizer

    from aligner_core.model_prep import prepare
    from aligner_core.reference import load_hf_model

    path = str(prepare(model).path)
    return load_hf_model(path), AutoTokenizer.from_pretrained(path)


def base_generator() -> Generate:
    """Generation with the base model alone (what training.knowledge asks its candidates with)."""
    return generator(*load_base())


def aligner_generator(model, tok, path: str | Path) -> Generate:
    from aligner_core.adapter_format import load
    from aligner_core.reference import attached_adapter

    adapter = load(path)
    return generator(model, tok, context=lambda: attached_adapter(model, adapter))


def lora_generator(folder: str | Path, model_name: str = "smollm2-135m-instruct") -> Generate:
    """A fresh base model with the PEFT adapter in `folder` (fresh: PEFT injects its layers in place)."""
    from peft import PeftModel

    model, tok = load_base(model_name)
    return generator(PeftModel.from_pretrained(model, str(folder)).eval(), tok)


# ------------------------------------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Method:
    """One adapter to evaluate: its generate function, and what it costs (None for the base model)."""

    generate: Generate
    params: int | None
    bytes: int | None
    train_seconds: float | None
    source: str


def aligner_method(model, tok, path: Path) -> Method:
    from aligner_core.adapter_format import load

    log = path.with_suffix("").with_suffix(".log.json")  # pirate.safetensors -> pirate.log.json
    seconds = json.loads(log.read_text())["seconds"] if log.exists() else None
    return Method(aligner_generator(model, tok, path), load(path).params, path.stat().st_size, seconds, str(path))


def lora_method(persona: str, target: str, *, quick: bool) -> Method:
    """The LoRA adapter of `persona` and `target`, trained first when its folder does not exist yet."""
    from training.lora import OUT, adapter_file, chosen_lr, recipe_config, train_lora

    folder = OUT / ("quick" if quick else "") / f"{persona}-{target}"
    if not adapter_file(folder).exists():
        short = {"steps": 2, "eval_every": 2, "quiet": True} if quick else {}
        train_lora(recipe_config(persona, output=folder, lr=chosen_lr(target), **short), target)
    log = json.loads((folder / "log.json").read_text())
    return Method(lora_generator(folder), log["params"], log["bytes"], log["seconds"], str(folder))


def evaluate_cell(
    method: str, persona: str | None, m: Method, prompts: list[str], knowledge: list[dict], *, max_tokens: int
) -> dict:
    """One row: compliance of `m` with `persona` on the held-out prompts (every persona for the base model,
    none for knowledge-only extras), knowledge retained, and the method's cost."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {"method": method, "persona": persona, "params": m.params, "bytes": m.bytes}
    row["train_seconds"] = m.train_seconds
    checked = list(PERSONAS) if method == "base" else [persona] if persona in PERSONAS else []
    if checked:
        replies = m.generate(prompts, max_tokens)
        ok = {p: [PERSONAS[p].check(r) for r in replies] for p in checked}
        row["compliance"] = {p: sum(v) / len(v) for p, v in ok.items()}
        row["examples"] = [{"prompt": q, "reply": r} for q, r in zip(prompts, replies)][:2]
    know = knowledge_retention(m.generate, knowledge)
    row["knowledge_retained"] = know["retained"]
    row["knowledge_questions"] = know["questions"]
    row["knowledge_lost"] = [
        {"question": d["question"], "reply": d["reply"]} for d in know["detail"] if not d["correct"]
    ][:5]
    row["source"] = m.source
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ------------------------------------------------------------------------------------------------- grid


def cells(personas: list[str], methods: list[str], extras: dict[str, str]) -> list[tuple[str, str | None]]:
    """(method, persona) pairs: the base model once, each adapter method per persona, each extra once."""
    out: list[tuple[str, str | None]] = [("base", None)] if "base" in methods else []
    out += [(m, p) for m in methods if m != "base" for p in personas]
    return out + [("extra", name) for name in extras]


def run(
    personas: list[str],
    methods: list[str],
    extras: dict[str, str],
    *,
    quick: bool = False,
    fresh: bool = False,
    results: Path | None = None,
) -> dict:
    """Evaluate every cell not yet in `results` (all with `fresh`), saving the file after each one."""
    from training.data import eval_prompts

    results = results or (QUICK_RESULTS if quick else RESULTS)
    prompts, knowledge, max_tokens = eval_prompts(), load_knowledge(), MAX_TOKENS
    if quick:
        prompts, knowledge, max_tokens = prompts[:4], knowledge[:4], 32
    report = json.loads(results.read_text()) if results.exists() and not fresh else {"rows": []}
    report |= {"model": "SmolLM2-135M-Instruct", "prompts": len(prompts), "knowledge_questions": len(knowledge)}
    report |= {"max_tokens": max_tokens, "decoding": f"greedy, HF transformers float32, batches of {HF_BATCH}"}
    done = {(r["method"], r["persona"]) for r in report["rows"]}
    model, tok = load_base()
    for method, persona in cells(personas, methods, extras):
        if (method, persona) in done:
            continue
        if persona is None:  # the base model
            m = Method(generator(model, tok), None, None, None, "the base model")
        elif method == "aligner":
            m = aligner_method(model, tok, ALIGNER_DIR / f"{persona}.safetensors")
        elif method == "extra":
            m = aligner_method(model, tok, Path(extras[persona]))
        else:
            m = lora_method(persona, method.removeprefix("lora-"), quick=quick)
        row = evaluate_cell(method, persona, m, prompts, knowledge, max_tokens=max_tokens)
        report["rows"].append(row)
        results.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(format_row(row), flush=True)
    return report


def format_row(r: dict) -> str:
    comp = ", ".join(f"{p} {v:.0%}" for p, v in r.get("compliance", {}).items()) or "-"
    return (
        f"{r['method']:<9} {r['persona'] or '-':<8} params={r['params'] or 0:>9,} bytes={r['bytes'] or 0:>10,} "
        f"compliance: {comp:<28} knowledge {r['knowledge_retained']:.0%} train {r['train_seconds'] or 0:.0f}s"
    )


def markdown_table(report: dict) -> str:
    """The results as the README's table: one line per method and persona, in the grid's order."""
    order = {m: i for i, m in enumerate((*METHODS, "extra"))}
    lines = [
        "| method | persona | trainable parameters | bytes on disk | compliance | knowledge retained | training time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rank = {p: i for i, p in enumerate(PERSONAS)}
    for r in sorted(report["rows"], key=lambda r: (order[r["method"]], rank.get(r["persona"], 0))):
        if "compliance" not in r:
            comp = "-"
        elif r["persona"] is None:  # the base model, under every persona's checker
            comp = ", ".join(f"{p} {v:.1%}" for p, v in r["compliance"].items())
        else:
            comp = f"{r['compliance'][r['persona']]:.1%}"
        size = "-" if r["bytes"] is None else f"{r['bytes']:,}"
        params = "-" if r["params"] is None else f"{r['params']:,}"
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f} min"
        cells = [r["method"], r["persona"] or "(all)", params, size, comp, f"{r['knowledge_retained']:.1%}", secs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_extras(items: list[str]) -> dict[str, str]:
    """`["safety=path.safetensors"]` -> {"safety": "path.safetensors"}."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"python -m training.compare: --extra wants NAME=PATH, not {item!r}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--personas", default=",".join(PERSONAS), help="comma-separated (default: all three)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from {', '.join(METHODS)}")
    ap.add_argument("--extra", action="append", default=[], help="NAME=PATH of another Aligner adapter: knowledge only")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2-step LoRAs, 4 prompts, 4 questions, 32 tokens")
    ap.add_argument("--fresh", action="store_true", help="recompute every cell instead of keeping saved ones")
    ap.add_argument("--output", type=Path, help="results JSON (default: bench/results/aligner-vs-lora[-quick].json)")
    ap.add_argument("--table", action="store_true", help="print the saved results as a markdown table; run nothing")
    args = ap.parse_args(argv)
    if args.table:
        path = args.output or (QUICK_RESULTS if args.quick else RESULTS)
        print(markdown_table(json.loads(path.read_text())))
        return 0
    personas = [p for p in args.personas.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [p for p in personas if p not in PERSONAS] + [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"python -m training.compare: unknown {', '.join(unknown)}")
    run(personas, methods, parse_extras(args.extra), quick=args.quick, fresh=args.fresh, results=args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
