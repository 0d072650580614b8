"""`aligner train`: train an Aligner adapter (prefix P and gates only) on a frozen Hugging Face model.

The forward is `aligner_core.reference.attached` (the same math the server runs); the base weights are
frozen and only P [N, hidden] and the gates [L - start_layer, heads] get gradients.

    aligner train --data examples/data/pirate.jsonl --tokens 1 --output pirate.safetensors
    aligner train --method dpo --data prefs.jsonl --ref-adapter sft.safetensors --output dpo.safetensors

SFT data: chat JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line; the loss covers
the assistant turns only, rendered with the model's own chat template (the end-of-turn token included, so
the adapter learns where to stop). DPO data: `{"prompt": str | "messages": [...], "chosen": str,
"rejected": str}` (chosen/rejected may also be an assistant message or a list of messages).

Defaults follow the paper: AdamW, SFT lr 9e-3 and weight decay 0.02, DPO lr 1e-4 and beta 0.1, start
layer 2, P ~ N(0, 1), gates 0. Output: an aligner/v1 file carrying the base model's identity, plus a JSON
log (train and validation loss) and a PNG plot of both beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SFT_DEFAULTS = {"lr": 9e-3, "weight_decay": 0.02}
DPO_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.02}


@dataclass
class TrainConfig:
    data: str
    output: str
    model: str = "smollm2-135m-instruct"
    cache_dir: str | None = None  # where a preset's converted model lives (default: aligner-serve's cache)
    method: str = "sft"  # sft | dpo
    tokens: int = 1
    start_layer: int = 2
    gate_activation: str = "identity"
    lr: float | None = None  # None: the method's default (SFT 9e-3, DPO 1e-4)
    weight_decay: float | None = None  # None: 0.02
    epochs: float = 1.0
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of steps with a linear warm-up; then cosine decay to 10% of lr
    seed: int = 0
    val_split: float = 0.1
    val_data: str | None = None  # a validation file of the same format: then all of `data` trains
    eval_every: int | None = None  # steps between validation passes (default: about 8 per run)
    max_length: int = 512
    beta: float = 0.1  # DPO
    decision_weight: float = 1.0  # SFT: loss weight of the reply's layout tokens (`layout_positions`); 1 = plain SFT
    ref_adapter: str | None = None  # DPO reference policy (and the policy's starting point); default: base
    init_adapter: str | None = None  # start from this adapter (continue training) instead of the paper's init
    device: str | None = None  # default: cuda if available, else cpu
    log: str | None = None  # default: <output>.log.json
    plot: str | None = None  # default: <output>.loss.png; "" disables
    quiet: bool = False

    def resolved(self) -> TrainConfig:
        d = SFT_DEFAULTS if self.method == "sft" else DPO_DEFAULTS
        out = TrainConfig(**asdict(self))
        out.lr = d["lr"] if self.lr is None else self.lr
        out.weight_decay = d["weight_decay"] if self.weight_decay is None else self.weight_decay
        out.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        stem = str(Path(self.output).with_suffix(""))
        out.log = self.log or stem + ".log.json"
        out.plot = stem + ".loss.png" if self.plot is None else self.plot
        return out


@dataclass
class TrainResult:
    adapter: Any  # aligner_core.adapter_format.Adapter
    prefix: torch.Tensor  # the trained parameters, as they were in memory
    gate: torch.Tensor
    history: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- data


def _ids(tok, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def sft_example(tok, messages: list[dict], max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels -100 except on assistant tokens; None if it has no assistant turn."""
    ids = _ids(tok, messages, generation_prompt=False)
    labels = [-100] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:  # OpenAI's `weight: 0`: context, not trained
            continue
        start = len(_ids(tok, messages[:i], generation_prompt=True)) if i else 0
        end = len(_ids(tok, messages[: i + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(x != -100 for x in labels) else None


def layout_positions(tok, ids: list[int], labels: list[int]) -> list[int]:
    """Label positions where a reply's layout is decided: every token holding a line break, the first token of
    each line (the reply's first included) and the end of the turn. For a format persona these few tokens
    (continue with another line, or stop?) carry the form; plain SFT averages them among all the others."""
    ends = {tok.eos_token_id, *(tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"))}
    breaks = ["\n" in tok.decode([i]) for i in ids]  # each token decoded once
    out = []
    for j, lab in enumerate(labels):
        if lab == -100:
            continue
        starts_line = j == 0 or labels[j - 1] == -100 or breaks[j - 1]
        if starts_line or ids[j] in ends or breaks[j]:
            out.append(j)
    return out


def _as_messages(x: Any, role: str = "user") -> list[dict]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, dict):
        return [x]
    return list(x)


def dpo_example(tok, row: dict, max_length: int) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt_ids, chosen_ids, rejected_ids), each completion rendered as an assistant turn."""
    prompt = _as_messages(row["messages"] if "messages" in row else row["prompt"])
    p_ids = _ids(tok, prompt, generation_prompt=True)
    out = [p_ids]
    for key in ("chosen", "rejected"):
        full = _ids(tok, prompt + _as_messages(row[key], "assistant"), generation_prompt=False)
        if full[: len(p_ids)] != p_ids:
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        out.append(full[len(p_ids) :])
    budget = max_length - len(p_ids)
    if budget < 1:
        return None
    return p_ids, out[1][:budget], out[2][:budget]


def load_examples(cfg: TrainConfig, tok, path: str | None = None) -> list:
    """The usable examples of `path` (default: the training data) in the method's form."""
    path = path or cfg.data
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    exs: list[tuple | None]  # (ids, labels[, weights]) or (prompt, chosen, rejected); None where unusable
    if cfg.method == "sft":
        exs = sft = [sft_example(tok, r["messages"], cfg.max_length) for r in rows]
        if cfg.decision_weight != 1.0:
            exs = [e and (*e, _weights(tok, *e, cfg.decision_weight)) for e in sft]
    else:
        exs = [dpo_example(tok, r, cfg.max_length) for r in rows]
    exs = [e for e in exs if e is not None]
    if not exs:
        raise SystemExit(f"aligner train: no usable {cfg.method} examples in {path}")
    return exs


def _weights(tok, ids: list[int], labels: list[int], weight: float) -> list[float]:
    w = [1.0] * len(ids)
    for j in layout_positions(tok, ids, labels):
        w[j] = weight
    return w


def _pad(seqs: list[list[int]] | list[list[float]], value: float) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


# ---------------------------------------------------------------------------------------------- forward


def _hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    body = getattr(model, model.base_model_prefix)
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def token_logprobs(
    model, ids: list[list[int]], labels: list[list[int]], device, weights: list[list[float]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of label-token logprobs, label-token count); with `weights` (per position, like
    labels), the weighted sum and the sum of weights. The LM head runs on label positions only."""
    input_ids = _pad(ids, 0).to(device)
    mask = _pad([[1] * len(s) for s in ids], 0).to(device)
    lab = _pad(labels, -100).to(device)
    h = _hidden(model, input_ids, mask)[:, :-1]  # position t predicts token t + 1
    target = lab[:, 1:]
    sel = target != -100
    logits = model.lm_head(h[sel]).float()
    lp = torch.log_softmax(logits, dim=-1).gather(1, target[sel][:, None])[:, 0]
    row = sel.nonzero()[:, 0]
    if weights is not None:
        w = _pad(weights, 0.0).to(device=device, dtype=lp.dtype)[:, 1:][sel]  # weight of each predicted token
        lp = lp * w
        counts = torch.zeros(len(ids), device=device, dtype=lp.dtype).index_add(0, row, w)
    else:
        counts = sel.sum(1)
    sums = torch.zeros(len(ids), device=device, dtype=lp.dtype).index_add(0, row, lp)
    return sums, counts


def sft_loss(model, batch: list[tuple], device) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the label tokens; examples may carry per-position weights third."""
    weights = [b[2] for b in batch] if len(batch[0]) > 2 else None
    sums, counts = token_logprobs(model, [b[0] for b in batch], [b[1] for b in batch], device, weights)
    total = counts.sum()
    return -sums.sum() / total, int(total)


def _dpo_seqs(batch) -> tuple[list[list[int]], list[list[int]]]:
    ids, labels = [], []
    for p, c, r in batch:
        for comp in (c, r):
            ids.append(p + comp)
            labels.append([-100] * len(p) + comp)
    return ids, labels


def dpo_logps(model, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = _dpo_seqs(batch)
    sums, _ = token_logprobs(model, ids, labels, device)
    return sums[0::2], sums[1::2]  # chosen, rejected


def dpo_loss(policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], beta: float):
    margin = (policy[0] - ref[0]) - (policy[1] - ref[1])
    return -F.logsigmoid(beta * margin).mean(), (margin > 0).float().mean()


# ---------------------------------------------------------------------------------------------- training


def _lr_at(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class RunPlan:
    """How one run walks its examples: the validation and training splits, the step count, how often it
    validates and how many steps warm up."""

    val: list
    trn: list
    steps: int
    eval_every: int
    warmup: int


def plan_run(cfg: TrainConfig, examples: list, rng: random.Random, val: list | None = None) -> RunPlan:
    """Shuffle `examples` in place with `rng` (which goes on to order the batches) and split off the
    validation share, unless `val` (a validation file's examples) is given; the steps follow --steps, else
    --epochs over the training split."""
    rng.shuffle(examples)
    if val is not None:
        trn = examples
    else:
        n_val = int(round(len(examples) * cfg.val_split)) if len(examples) > 1 else 0
        val, trn = examples[:n_val], examples[n_val:]
    per_step = cfg.batch_size * cfg.grad_accum
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(trn) / per_step))
    eval_every = cfg.eval_every or max(1, steps // 8)
    return RunPlan(val, trn, steps, eval_every, int(cfg.warmup * steps))


class Batches:
    """Training batches without end: each pass over the split in a fresh order drawn from `rng`, the
    remainder of one pass carried into the next."""

    def __init__(self, examples: list, size: int, rng: random.Random) -> None:
        self.examples, self.size, self.rng = examples, size, rng
        self.order: list = []

    def next(self) -> list:
        if len(self.order) < self.size:
            fresh = list(self.examples)
            self.rng.shuffle(fresh)
            self.order += fresh
        b, self.order = self.order[: self.size], self.order[self.size :]
        return b


BatchLoss = Callable[[list], tuple[torch.Tensor, dict]]  # batch -> (loss, extra figures for the log)
#: Called after every step with its record ({"step", "steps", "loss", "lr", ...}) and after every validation
#: pass with {"step", "steps", "val_loss"}; an exception it raises (a cancel) ends the run there.
OnStep = Callable[[dict], None]


def mean_loss(batch_loss: BatchLoss, examples: list, batch_size: int) -> float | None:
    """The example-weighted mean of `batch_loss` over `examples` in batches; None when there are none."""
    if not examples:
        return None
    total, weight = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        loss, _ = batch_loss(chunk)
        total += float(loss) * len(chunk)
        weight += len(chunk)
    return total / weight


def optimise(
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    plan: RunPlan,
    batches: Batches,
    batch_loss: BatchLoss,
    validate: Callable[[], float | None],
    context: Callable[[], contextlib.AbstractContextManager],
    on_step: OnStep | None = None,
) -> tuple[dict, float]:
    """The optimizer loop shared by every trainer: warm-up then cosine learning rate, `cfg.grad_accum`
    micro-batches per step under `context()` (the trained parameters attached), validation every
    `plan.eval_every` steps and at the end. Returns the history (train and val losses) and the seconds taken."""
    from tqdm.auto import tqdm

    assert cfg.lr is not None  # resolved
    history: dict = {"train": [], "val": []}
    t0 = time.perf_counter()
    v = validate()
    if v is not None:
        history["val"].append({"step": 0, "loss": v})
    bar = tqdm(range(plan.steps), desc=f"aligner {cfg.method}", disable=cfg.quiet, dynamic_ncols=True)
    for step in bar:
        scale = _lr_at(step, plan.steps, plan.warmup)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        extra: dict = {}
        with context():
            for _ in range(cfg.grad_accum):
                loss, extra = batch_loss(batches.next())
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
        opt.step()
        history["train"].append({"step": step + 1, "loss": step_loss, "lr": cfg.lr * scale, **extra})
        if on_step is not None:
            on_step({**history["train"][-1], "steps": plan.steps})
        post = {"loss": f"{step_loss:.4f}"}
        if (step + 1) % plan.eval_every == 0 or step + 1 == plan.steps:
            v = validate()
            if v is not None:
                history["val"].append({"step": step + 1, "loss": v})
                if on_step is not None:
                    on_step({"step": step + 1, "steps": plan.steps, "val_loss": v})
        if history["val"]:
            post["val"] = f"{history['val'][-1]['loss']:.4f}"
        bar.set_postfix(post)
    return history, time.perf_counter() - t0


def train(cfg: TrainConfig, on_step: OnStep | None = None) -> TrainResult:
    from transformers import AutoTokenizer

    from aligner_core.adapter_format import GATE_ACTIVATIONS, Adapter, load, save
    from aligner_core.model_prep import prepare
    from aligner_core.reference import attached, load_hf_model

    cfg = cfg.resolved()
    assert (
        cfg.lr is not None and cfg.weight_decay is not None and cfg.device is not None and cfg.log is not None
    )  # resolved
    if cfg.method not in ("sft", "dpo"):
        raise SystemExit(f"aligner train: --method must be sft or dpo, not {cfg.method!r}")
    if cfg.gate_activation not in GATE_ACTIVATIONS:
        raise SystemExit(f"aligner train: --gate-activation must be one of {', '.join(GATE_ACTIVATIONS)}")
    prepared = prepare(cfg.model, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None)
    spec = prepared.spec
    device = torch.device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tok = AutoTokenizer.from_pretrained(prepared.path)
    model = load_hf_model(str(prepared.path)).to(device)
    model.requires_grad_(False)

    def _load_for_model(path: str, flag: str):
        ad = load(path)
        if ad.base_model != spec.identity:
            raise SystemExit(f"aligner train: {flag} was made for {ad.base_model!r}, not {spec.identity!r}")
        return ad

    ref_adapter = _load_for_model(cfg.ref_adapter, "--ref-adapter") if cfg.ref_adapter and cfg.method == "dpo" else None
    init = _load_for_model(cfg.init_adapter, "--init-adapter") if cfg.init_adapter else ref_adapter
    if init is not None:
        cfg.tokens, cfg.start_layer, cfg.gate_activation = init.tokens, init.start_layer, init.gate_activation
    if not 0 <= cfg.start_layer < spec.num_layers:
        raise SystemExit(f"aligner train: --start-layer must be in [0, {spec.num_layers})")
    if cfg.tokens < 1:
        raise SystemExit("aligner train: --tokens must be at least 1")

    # Parameters: P ~ N(0, 1), gates 0 (the paper's initialisation); or --init-adapter; DPO with a reference
    # adapter (and no --init-adapter) starts from the reference.
    if init is not None:
        prefix0, gate0 = init.prefix.float().clone(), init.gate.float().clone()
    else:
        prefix0 = torch.randn(cfg.tokens, spec.hidden_size, generator=torch.Generator().manual_seed(cfg.seed))
        gate0 = torch.zeros(spec.num_layers - cfg.start_layer, spec.num_heads)
    prefix = torch.nn.Parameter(prefix0.to(device))
    gate = torch.nn.Parameter(gate0.to(device))
    opt = torch.optim.AdamW([prefix, gate], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def policy():
        return attached(
            model, prefix=prefix, gate=gate, start_layer=cfg.start_layer, gate_activation=cfg.gate_activation
        )

    examples = load_examples(cfg, tok)
    rng = random.Random(cfg.seed)
    plan = plan_run(cfg, examples, rng, load_examples(cfg, tok, cfg.val_data) if cfg.val_data else None)

    # DPO reference log-probabilities, computed once: the base model, or the base model with --ref-adapter.
    ref_logps: dict[int, tuple[float, float]] = {}
    if cfg.method == "dpo":
        from aligner_core.reference import attached_adapter

        model.eval()
        with torch.no_grad(), attached_adapter(model, ref_adapter and _to(ref_adapter, device)):
            for i in range(0, len(examples), cfg.batch_size):
                chunk = examples[i : i + cfg.batch_size]
                c, r = dpo_logps(model, chunk, device)
                for j, ex in enumerate(chunk):
                    ref_logps[id(ex)] = (float(c[j]), float(r[j]))

    def batch_loss(batch) -> tuple[torch.Tensor, dict]:
        if cfg.method == "sft":
            loss, n = sft_loss(model, batch, device)
            return loss, {}
        pol = dpo_logps(model, batch, device)
        ref = (
            torch.tensor([ref_logps[id(b)][0] for b in batch], device=device),
            torch.tensor([ref_logps[id(b)][1] for b in batch], device=device),
        )
        loss, acc = dpo_loss(pol, ref, cfg.beta)
        return loss, {"reward_acc": float(acc)}

    @torch.no_grad()
    def validate() -> float | None:
        with policy():
            return mean_loss(batch_loss, plan.val, cfg.batch_size)

    model.train(False)  # no dropout; the base model stays in eval mode
    history, elapsed = optimise(
        cfg, opt, plan, Batches(plan.trn, cfg.batch_size, rng), batch_loss, validate, policy, on_step
    )

    adapter = Adapter(
        prefix=prefix.detach().float().cpu().clone(),
        gate=gate.detach().float().cpu().clone(),
        start_layer=cfg.start_layer,
        gate_activation=cfg.gate_activation,
        num_layers=spec.num_layers,
        base_model=spec.identity,
    )
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    save(adapter, cfg.output)
    history.update(
        config=asdict(cfg),
        base_model=spec.identity,
        tokens=adapter.tokens,
        params=adapter.params,
        train_examples=len(plan.trn),
        val_examples=len(plan.val),
        steps=plan.steps,
        seconds=round(elapsed, 1),
        device=str(device),
        sha256=adapter.sha256(),
    )
    Path(cfg.log).write_text(json.dumps(history, indent=1))
    if cfg.plot:
        plot_history(history, cfg.plot)
    if not cfg.quiet:
        last_val = history["val"][-1]["loss"] if history["val"] else float("nan")
        print(
            f"wrote {cfg.output}: tokens={adapter.tokens} params={adapter.params} base_model={spec.identity} "
            f"steps={plan.steps} train_loss={history['train'][-1]['loss']:.4f} val_loss={last_val:.4f} "
            f"time={elapsed:.0f}s log={cfg.log}" + (f" plot={cfg.plot}" if cfg.plot else "")
        )
    return TrainResult(adapter=adapter, prefix=prefix.detach().cpu(), gate=gate.detach().cpu(), history=history)


def _to(adapter, device):
    from dataclasses import replace

    return replace(adapter, prefix=adapter.prefix.float().to(device), gate=adapter.gate.float().to(device))


def plot_history(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tr = history["train"]
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train", alpha=0.6)
    if len(tr) >= 10:  # a moving average makes the trend readable
        k = max(2, len(tr) // 20)
        ys = [r["loss"] for r in tr]
        avg = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
        ax.plot([r["step"] for r in tr], avg, label=f"train (mean of {k})")
    if history["val"]:
        ax.plot([r["step"] for r in history["val"]], [r["loss"] for r in history["val"]], "o-", label="validation")
    cfg = history.get("config", {})
    ax.set_title(f"{Path(cfg.get('output', '')).name}: {cfg.get('method', '')}, N={history.get('tokens')}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="aligner train", description="Train an Aligner adapter (SFT or DPO) on a frozen model."
    )
    ap.add_argument("--data", required=True, help="JSONL: chat messages (sft) or prompt/chosen/rejected (dpo)")
    ap.add_argument("-o", "--output", required=True, help="where to write the aligner/v1 .safetensors file")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="preset name or Hugging Face folder")
    ap.add_argument("--method", choices=("sft", "dpo"), default="sft")
    ap.add_argument("--tokens", type=int, default=1, help="prefix tokens N (default 1)")
    ap.add_argument("--start-layer", type=int, default=2, help="first adapted layer (default 2)")
    ap.add_argument("--gate-activation", choices=("identity", "tanh"), default="identity")
    ap.add_argument("--lr", type=float, help="AdamW learning rate (default: sft 9e-3, dpo 1e-4)")
    ap.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.02)")
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (default 0.05)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (default 1)")
    group.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-split", type=float, default=0.1, help="fraction held out for validation loss")
    ap.add_argument("--val-data", help="validation JSONL of the same format (then --val-split is unused)")
    ap.add_argument("--eval-every", type=int, help="steps between validation passes (default: steps/8)")
    ap.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    ap.add_argument(
        "--decision-weight",
        type=float,
        default=1.0,
        help="SFT: loss weight of the reply's layout tokens (line breaks, line starts, end of turn); "
        "above 1 stresses where a format is decided, e.g. how many lines (default 1)",
    )
    ap.add_argument(
        "--ref-adapter", help="DPO: reference policy adapter (also the policy's start); default: base model"
    )
    ap.add_argument("--init-adapter", help="start from this adapter's P and gates (continue training)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--log", help="JSON log path (default: <output>.log.json)")
    ap.add_argument("--plot", help="PNG loss plot path (default: <output>.loss.png; '' for none)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    from aligner_core.errors import AlignerError

    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        train(cfg)
    except (FileNotFoundError, ValueError, AlignerError) as e:
        print(f"aligner train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
