"""LoRA on the same persona data, loss and budget as the Aligner recipes: the paper's baseline, small.

    python -m training.lora --persona json --target qv --lr 1e-3      # one adapter -> .cache/lora/json-qv/
    python -m training.lora --sweep pirate --lrs 3e-4,1e-3,3e-3       # the learning-rate sweep (both targets)

Everything except the trained parameters is `aligner train`'s: the persona's recipe (training/recipes.py:
60 steps x batch 8, 5% validation split, seed 0, bullets' layout weight 10) read through the same argument
parser, the same examples (chat template, loss on the assistant tokens only), split, batches, warm-up and
cosine schedule, AdamW with weight decay 0.02, and the same optimizer loop (`training.train.optimise`).
Only the learning rate is LoRA's own, chosen by the sweep on validation loss.

LoRA (PEFT): rank 8, alpha 16, no dropout, on q_proj and v_proj (`qv`) or on every linear layer of the
blocks (`all`: q, k, v, o, gate, up, down). The adapter is saved with PEFT's `save_pretrained` (safetensors)
beside a `log.json` in a gitignored folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from training.train import Batches, TrainConfig, build_parser, load_examples, mean_loss, optimise, plan_run, sft_loss

TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
RANK = 8
OUT = Path(".cache/lora")
SWEEP_RESULTS = Path("bench/results/lora-sweep.json")
DEFAULT_LR = 1e-3  # used only when no sweep has been run


def recipe_config(persona: str, *, output: str | Path, lr: float, **overrides) -> TrainConfig:
    """The persona's Aligner recipe as a TrainConfig (its first `aligner train` command), with LoRA's
    learning rate and output; `overrides` are other TrainConfig fields (tests shrink the run)."""
    from training.recipes import RECIPES

    args = vars(build_parser().parse_args(RECIPES[persona][0]))
    return replace(TrainConfig(**args), output=str(output), lr=lr, plot="", **overrides)


def adapter_file(folder: str | Path) -> Path:
    return Path(folder) / "adapter_model.safetensors"


def train_lora(cfg: TrainConfig, target: str, *, rank: int = RANK) -> dict:
    """Train one LoRA adapter with `cfg`'s data and schedule into the folder `cfg.output`; returns its log
    (train and validation loss, trainable parameters, bytes of the safetensors file, seconds)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from aligner_core.model_prep import prepare
    from aligner_core.reference import load_hf_model

    cfg = cfg.resolved()
    assert cfg.lr is not None and cfg.weight_decay is not None and cfg.device is not None  # resolved
    prepared = prepare(cfg.model)
    device = torch.device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # LoRA's A init; B starts at zero, so the run starts at the base model
    tok = AutoTokenizer.from_pretrained(prepared.path)
    base = load_hf_model(str(prepared.path)).to(device)
    base.requires_grad_(False)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS[target])
    peft_model = get_peft_model(base, lora)
    model = peft_model.get_base_model()  # the same modules with LoRA layers inside: the loss code sees plain HF
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    examples = load_examples(cfg, tok)
    rng = random.Random(cfg.seed)
    plan = plan_run(cfg, examples, rng)

    def batch_loss(batch) -> tuple[torch.Tensor, dict]:
        return sft_loss(model, batch, device)[0], {}

    @torch.no_grad()
    def validate() -> float | None:
        return mean_loss(batch_loss, plan.val, cfg.batch_size)

    model.train(False)  # no dropout anywhere
    history, elapsed = optimise(
        cfg, opt, plan, Batches(plan.trn, cfg.batch_size, rng), batch_loss, validate, contextlib.nullcontext
    )
    out = Path(cfg.output)
    peft_model.save_pretrained(str(out))
    history.update(
        config=asdict(cfg),
        target=target,
        rank=rank,
        params=sum(p.numel() for p in params),
        bytes=adapter_file(out).stat().st_size,
        train_examples=len(plan.trn),
        val_examples=len(plan.val),
        steps=plan.steps,
        seconds=round(elapsed, 1),
        device=str(device),
    )
    (out / "log.json").write_text(json.dumps(history, indent=1))
    if not cfg.quiet:
        print(
            f"wrote {out}: lora-{target} r={rank} params={history['params']} lr={cfg.lr:g} "
            f"val_loss={final_val(history):.4f} time={elapsed:.0f}s",
            flush=True,
        )
    return history


def final_val(history: dict) -> float:
    return history["val"][-1]["loss"] if history["val"] else float("nan")


def sweep(persona: str, lrs: list[float], targets: list[str], *, steps: int | None = None, out: Path = OUT) -> dict:
    """Train each target at each learning rate on `persona` (the recipe's steps, or `steps` for a cheaper
    sweep); write the table to SWEEP_RESULTS. At the recipe's budget the best run by final validation loss
    also becomes that persona's adapter (`out/<persona>-<target>`)."""
    table: dict = {"persona": persona, "criterion": "final validation loss", "steps": steps or "recipe"}
    table |= {"runs": [], "best_lr": {}}
    for target in targets:
        runs = []
        for lr in lrs:
            folder = out / "sweep" / f"{persona}-{target}-lr{lr:g}"
            cfg = recipe_config(persona, output=folder, lr=lr)
            log = train_lora(replace(cfg, steps=steps or cfg.steps, eval_every=steps or cfg.eval_every), target)
            runs.append({"target": target, "lr": lr, "val_loss": final_val(log), "seconds": log["seconds"]})
        best = min(runs, key=lambda r: r["val_loss"])
        table["runs"] += runs
        table["best_lr"][target] = best["lr"]
        if steps is None:
            dest = out / f"{persona}-{target}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(out / "sweep" / f"{persona}-{target}-lr{best['lr']:g}", dest)
    SWEEP_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    SWEEP_RESULTS.write_text(json.dumps(table, indent=1) + "\n")
    return table


def chosen_lr(target: str) -> float:
    """The sweep's learning rate for `target`; a target the sweep left out takes the first swept target's
    (DEFAULT_LR when no sweep has been recorded)."""
    if not SWEEP_RESULTS.exists():
        return DEFAULT_LR
    best = json.loads(SWEEP_RESULTS.read_text())["best_lr"]
    return float(best.get(target, next(iter(best.values()), DEFAULT_LR)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--persona", default="pirate", help="persona whose data and recipe to use")
    ap.add_argument("--target", choices=TARGETS, action="append", help="qv or all (repeatable; default both)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the sweep's choice)")
    ap.add_argument("--sweep", metavar="PERSONA", help="run the learning-rate sweep on PERSONA instead")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="sweep learning rates, comma-separated")
    ap.add_argument("--sweep-steps", type=int, help="sweep with this many steps (default: the recipe's)")
    args = ap.parse_args(argv)
    targets = args.target or list(TARGETS)
    if args.sweep:
        table = sweep(args.sweep, [float(x) for x in args.lrs.split(",")], targets, steps=args.sweep_steps)
        print(json.dumps(table["best_lr"]))
        return 0
    for target in targets:
        lr = args.lr or chosen_lr(target)
        train_lora(recipe_config(args.persona, output=OUT / f"{args.persona}-{target}", lr=lr), target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
