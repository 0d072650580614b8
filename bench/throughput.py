"""Throughput, time to first token and inter-token latency: base vs Aligner adapters (and vLLM multi-LoRA).

Every ratio is measured side by side in one invocation on one engine: each adapter configuration runs
right after a base run of the same workload, and the reported ratio is the median over those pairs (this
machine is noisy). Writes bench/results/throughput.json and .png, and prints a table.

    python bench/throughput.py --quick            # a few minutes
    python bench/throughput.py                    # the full grid
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "river mountain engine violin harbor lantern orchard comet glacier meadow circuit falcon".split()


@dataclass
class RunStats:
    label: str
    adapters: int
    tokens: int
    requests: int
    output_tokens: int
    seconds: float
    tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def prompts(n: int) -> list[str]:
    return [f"Write a short paragraph about the {WORDS[i % len(WORDS)]} number {i}, in plain words." for i in range(n)]


async def run_workload(engine, tokenizer, *, keys: list[str | None], max_tokens: int, label: str,
                       lora: list | None = None) -> RunStats:  # fmt: skip
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from server.engine.facade import cache_salt

    texts = prompts(len(keys))
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]
    ttft, itl, counts = [], [], []
    run_id = f"{label}-{time.monotonic_ns()}"

    async def one(i: int) -> None:
        key = keys[i]
        prompt = TokensPrompt(prompt_token_ids=ids[i])
        if key:
            prompt["cache_salt"] = cache_salt(key)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                extra_args={"aligner": key} if key else None)  # fmt: skip
        t0 = time.perf_counter()
        first = last = None
        n = 0
        kw = {"lora_request": lora[i]} if lora else {}
        async for out in engine.client.generate(prompt, params, request_id=f"{run_id}-{i}", **kw):
            now = time.perf_counter()
            first = first or now
            last = now
            n = len(out.outputs[0].token_ids)
        ttft.append((first - t0) * 1000)
        if n > 1:
            itl.append((last - first) * 1000 / (n - 1))
        counts.append(n)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(keys))))
    seconds = time.perf_counter() - start
    distinct = len({k for k in keys if k} | {id(x) for x in (lora or [])})
    return RunStats(label, distinct, 0, len(keys), sum(counts), seconds, sum(counts) / seconds,
                    percentile(ttft, 0.5), percentile(ttft, 0.99), percentile(itl, 0.5), percentile(itl, 0.99))  # fmt: skip


def make_engine(*, compile: bool, max_slots: int, max_tokens: int, aligner: bool = True, extra: tuple = ()):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from aligner_core.model_prep import prepare
    from server.engine.config import AlignerEngineConfig
    from server.engine.facade import EngineOptions
    from support import EngineRunner

    pm = prepare()
    opts = EngineOptions(model_path=str(pm.path), served_name=pm.spec.identity, dtype="float32",
                         enforce_eager=not compile, max_model_len=1024, max_num_seqs=256, kv_cache_gib=4,
                         aligner=AlignerEngineConfig(max_slots=max_slots, max_tokens=max_tokens),
                         aligner_enabled=aligner, extra_args=extra)  # fmt: skip
    return EngineRunner(opts), pm


def aligner_grid(args) -> dict:
    from transformers import AutoTokenizer

    from aligner_core.adapter_format import Adapter, encode

    runner, pm = make_engine(compile=args.compile, max_slots=sum(args.adapters) * len(args.tokens), max_tokens=max(args.tokens))
    tok = AutoTokenizer.from_pretrained(pm.path)
    eng = runner.engine
    rows: list[dict] = []
    try:
        keys_by = {}
        load_ms = []
        for n in args.tokens:
            for k in args.adapters:
                keys = []
                for j in range(k):
                    a = Adapter.random(pm.spec, tokens=n, seed=1000 * n + j, gate_scale=0.05)
                    key = a.sha256()
                    t0 = time.perf_counter()
                    runner.run(eng.lease(key, _const(encode(a))))  # pin: resident for the whole run
                    load_ms.append((time.perf_counter() - t0) * 1000)
                    keys.append(key)
                keys_by[(n, k)] = keys
        runner.run(run_workload(eng, tok, keys=[None] * 8, max_tokens=8, label="warmup"))
        for rep in range(args.reps):
            for n in args.tokens:
                for k in args.adapters:
                    keys = keys_by[(n, k)]
                    req_keys = [keys[i % k] for i in range(args.requests)]
                    base = runner.run(run_workload(eng, tok, keys=[None] * args.requests, max_tokens=args.max_tokens, label="base"))
                    ours = runner.run(run_workload(eng, tok, keys=req_keys, max_tokens=args.max_tokens, label=f"K{k}-N{n}"))
                    ours.tokens = n
                    rows.append({"rep": rep, "N": n, "K": k, "base": asdict(base), "aligner": asdict(ours),
                                 "ratio": ours.tok_per_s / base.tok_per_s,
                                 "ttft_ratio": ours.ttft_p50_ms / base.ttft_p50_ms})  # fmt: skip
                    print(f"rep {rep} N={n:2d} K={k:3d}: base {base.tok_per_s:7.1f} tok/s, aligner {ours.tok_per_s:7.1f} "
                          f"tok/s, ratio {rows[-1]['ratio']:.3f}, TTFT p50 {base.ttft_p50_ms:.0f} -> {ours.ttft_p50_ms:.0f} ms", flush=True)
        stats = runner.run(eng.stats())
    finally:
        runner.close()
    return {"rows": rows, "load_ms_p50": statistics.median(load_ms), "load_ms_p99": percentile(load_ms, 0.99),
            "table_bytes": stats["bytes"], "max_slots": stats["max_slots"]}  # fmt: skip


def _const(data: bytes):
    async def load() -> bytes:
        return data

    return load


def summarise(result: dict) -> list[dict]:
    table = []
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["N"], r["K"]), []).append(r)
    for (n, k), rs in sorted(groups.items()):
        table.append({
            "N": n, "K": k, "pairs": len(rs),
            "base_tok_s": statistics.median(r["base"]["tok_per_s"] for r in rs),
            "aligner_tok_s": statistics.median(r["aligner"]["tok_per_s"] for r in rs),
            "ratio_median": statistics.median(r["ratio"] for r in rs),
            "ttft_ratio_median": statistics.median(r["ttft_ratio"] for r in rs),
            "itl_p50_ms": statistics.median(r["aligner"]["itl_p50_ms"] for r in rs),
        })  # fmt: skip
    return table


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in sorted({r["N"] for r in table}):
        rows = [r for r in table if r["N"] == n]
        ax.plot([r["K"] for r in rows], [r["ratio_median"] for r in rows], marker="o", label=f"N = {n}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the batch (K)")
    ax.set_ylabel("throughput / base (median of pairs)")
    ax.set_title("Aligner adapters vs base model, same engine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K in {32}, N in {1, 4}, one pair each, 64 tokens")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="use torch.compile (vLLM's default) instead of eager")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.tokens, args.requests, args.max_tokens, args.reps = [32], [1, 4], 32, 64, 1
    result = aligner_grid(args)
    table = summarise(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "throughput-quick" if args.quick else "throughput"
    hardware = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "python": platform.python_version()}  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps({"args": vars(args), "hardware": hardware, "summary": table,
                                                      **result}, indent=1))  # fmt: skip
    plot(table, RESULTS / f"{name}.png")
    print(f"\n{'N':>3} {'K':>4} {'base tok/s':>11} {'aligner tok/s':>14} {'ratio':>7} {'TTFT ratio':>11}")
    for r in table:
        print(f"{r['N']:>3} {r['K']:>4} {r['base_tok_s']:>11.1f} {r['aligner_tok_s']:>14.1f} {r['ratio_median']:>7.3f} {r['ttft_ratio_median']:>11.3f}")
    print(f"adapter load into the engine: p50 {result['load_ms_p50']:.1f} ms, p99 {result['load_ms_p99']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
