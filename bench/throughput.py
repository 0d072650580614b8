"""Throughput, time to first token and inter-token latency: Aligner adapters vs the base model.

One engine (the bench dtype, eager, a hot slot for every adapter of the grid) serves every run. The grid runs one
base/adapter pair per (N, K); the K = `--target-k` configurations run `--reps` rounds of base, N=1, base,
N=4, base, N=16, base, ..., each adapter run compared with the mean of the base runs just before and after
it (slow drift of the machine cancels). The summary reports the median ratio over pairs. K = 0 is base. With R requests and K adapters, request i uses
adapter i mod K; K > R uses R = K requests (against a base run of the same size).

    python bench/throughput.py --quick
    python bench/throughput.py            # K in {1, 8, 64, 256}, N in {1, 4, 16}, 9 pairs at K = 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import const, engine_options, engine_runner, percentile, pyplot, run_workload, write_result


def grid(args) -> dict:
    from transformers import AutoTokenizer

    from aligner_core.adapter_format import Adapter, encode

    # Every adapter of the grid gets a hot slot: this measures the op in steady state. Promotion from the
    # cold tier (a projection per adapter, ~15 ms) is a first-use cost, measured by lifecycle.py and memory.py.
    total = len(args.tokens) * sum(args.adapters)
    opts, pm = engine_options(max_slots=total, cold_slots=0, max_tokens=max(args.tokens))
    t0 = time.perf_counter()
    runner = engine_runner(opts)
    start_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(pm.path)
    eng = runner.engine
    rows: list[dict] = []
    load_ms: list[float] = []
    try:
        keys_by: dict[tuple[int, int], list[str]] = {}
        for n in args.tokens:
            for k in args.adapters:
                keys = []
                for j in range(k):
                    a = Adapter.random(pm.spec, tokens=n, seed=100_000 * n + 1000 * k + j, gate_scale=0.05)
                    t1 = time.perf_counter()
                    lease = runner.run(eng.lease(a.sha256(), const(encode(a))))  # store bytes -> resident
                    load_ms.append((time.perf_counter() - t1) * 1000)
                    runner.run(lease.release())  # unpinned: stays resident (hot or cold) like a served adapter
                    keys.append(a.sha256())
                keys_by[(n, k)] = keys
        runner.run(run_workload(eng, tok, keys=[None] * 8, max_tokens=8, label="warmup"))
        bases: dict[int, dict] = {}

        def workload(keys: list, n: int, label: str) -> dict:
            before = runner.run(eng.stats())["op_seconds"]
            run = runner.run(
                run_workload(eng, tok, keys=keys, max_tokens=args.max_tokens, label=label, tokens=n)
            ).as_dict()
            # The share of the run's wall time spent inside the Aligner op, timed in the engine worker: both
            # parts come from the same seconds of the machine, so most of its noise cancels (unlike a ratio of runs).
            run["op_share"] = (runner.run(eng.stats())["op_seconds"] - before) / run["seconds"]
            return run

        def pair(rnd: int, n: int, k: int, requests: int, b: dict, ours: dict) -> None:
            rows.append(
                {
                    "round": rnd,
                    "N": n,
                    "K": k,
                    "requests": requests,
                    "base": b,
                    "aligner": ours,
                    "ratio": ours["tok_per_s"] / b["tok_per_s"],
                    "ttft_ratio": ours["ttft_p50_ms"] / b["ttft_p50_ms"],
                    "itl_ratio": ours["itl_p50_ms"] / b["itl_p50_ms"],
                    "op_share": ours["op_share"],
                }
            )
            print(
                f"round {rnd} N={n:2d} K={k:3d} R={requests}: base {b['tok_per_s']:7.1f} tok/s, aligner "
                f"{ours['tok_per_s']:7.1f} tok/s, ratio {rows[-1]['ratio']:.3f}, TTFT p50 {b['ttft_p50_ms']:.0f} -> "
                f"{ours['ttft_p50_ms']:.0f} ms, op {100 * ours['op_share']:.1f}% of the run",
                flush=True,
            )

        # The grid: one pair per (N, K) against a base run of the same request count.
        for n in args.tokens:
            for k in args.adapters:
                if k == args.target_k:
                    continue
                requests = max(args.requests, k)
                if requests not in bases:
                    bases[requests] = workload([None] * requests, 0, "base")
                keys = keys_by[(n, k)]
                pair(
                    0,
                    n,
                    k,
                    requests,
                    bases[requests],
                    workload([keys[i % k] for i in range(requests)], n, f"K{k}-N{n}"),
                )
        # The target K: rounds of base, N1, base, N4, base, N16, base ...; each adapter run is compared with the
        # mean of the base runs just before and after it, so a slow drift of the machine cancels out.
        k = args.target_k
        requests = max(args.requests, k)
        before = workload([None] * requests, 0, "base")
        for rnd in range(args.reps):
            for n in args.tokens:
                keys = keys_by[(n, k)]
                ours = workload([keys[i % k] for i in range(requests)], n, f"K{k}-N{n}")
                after = workload([None] * requests, 0, "base")
                pair(rnd, n, k, requests, _mean(before, after), ours)
                before = after
        latency = [ttft_one_at_a_time(runner, tok, keys_by[(n, k)], n, args.latency_pairs) for n in args.tokens]
        stats = runner.run(eng.stats())
    finally:
        runner.close()
    stats.pop("keys", None)
    return {
        "rows": rows,
        "latency": latency,
        "engine_start_s": start_s,
        "load_ms_p50": statistics.median(load_ms),
        "load_ms_p99": percentile(load_ms, 0.99),
        "table": stats,
    }


def ttft_one_at_a_time(runner, tok, keys: list[str], n: int, pairs: int) -> dict:
    """Time to first token of single requests on an idle engine: pairs of the same prompt without and with
    an adapter (a different adapter each pair, order alternating), each prompt new to the prefix cache.

    Under the burst of the throughput runs, first tokens arrive in two or three clusters hundreds of ms
    apart (one per prefill step), and which cluster holds the median request depends on how many
    requests reached the engine before its first step: the burst's TTFT p50 jumps by a whole step from
    run to run. One request at a time has no such jump, and adjacent pairs cancel the machine's drift."""
    eng = runner.engine
    base_ms, ours_ms, ratios = [], [], []
    for i in range(pairs):
        prompt = 10_000 * n + i  # never asked before: no prefix-cache hit for either request
        order = [None, keys[i % len(keys)]] if i % 2 == 0 else [keys[i % len(keys)], None]
        got = {}
        for key in order:
            run = runner.run(
                run_workload(eng, tok, keys=[key], max_tokens=1, label="ttft", tokens=n, first_prompt=prompt)
            )
            got[key is not None] = run.ttft_p50_ms
        base_ms.append(got[False])
        ours_ms.append(got[True])
        ratios.append(got[True] / got[False])
    row = {
        "N": n,
        "K": len(keys),
        "pairs": pairs,
        "base_ttft_p50_ms": statistics.median(base_ms),
        "aligner_ttft_p50_ms": statistics.median(ours_ms),
        "ratio_median": statistics.median(ratios),
    }
    print(
        f"TTFT one request at a time, N={n:2d}: base {row['base_ttft_p50_ms']:.1f} ms, aligner "
        f"{row['aligner_ttft_p50_ms']:.1f} ms, median ratio {row['ratio_median']:.3f} over {pairs} pairs",
        flush=True,
    )
    return row


def _mean(a: dict, b: dict) -> dict:
    """Two runs' figures averaged (numbers only)."""
    return {
        key: (a[key] + b[key]) / 2 if isinstance(a[key], (int, float)) and not isinstance(a[key], bool) else a[key]
        for key in a
    }


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["N"], r["K"]), []).append(r)
    med = statistics.median
    return [
        {
            "N": n,
            "K": k,
            "pairs": len(rs),
            "requests": rs[0]["requests"],
            "base_tok_s": med(r["base"]["tok_per_s"] for r in rs),
            "aligner_tok_s": med(r["aligner"]["tok_per_s"] for r in rs),
            "ratio_median": med(r["ratio"] for r in rs),
            "ratios": [round(r["ratio"], 4) for r in rs],
            "ttft_p50_ms": med(r["aligner"]["ttft_p50_ms"] for r in rs),
            "ttft_p99_ms": med(r["aligner"]["ttft_p99_ms"] for r in rs),
            "base_ttft_p50_ms": med(r["base"]["ttft_p50_ms"] for r in rs),
            "ttft_ratio_median": med(r["ttft_ratio"] for r in rs),
            "itl_p50_ms": med(r["aligner"]["itl_p50_ms"] for r in rs),
            "itl_p99_ms": med(r["aligner"]["itl_p99_ms"] for r in rs),
            "base_itl_p50_ms": med(r["base"]["itl_p50_ms"] for r in rs),
            "itl_ratio_median": med(r["itl_ratio"] for r in rs),
            "op_share_median": med(r["op_share"] for r in rs),
        }
        for (n, k), rs in sorted(groups.items())
    ]


def plot(table: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in sorted({r["N"] for r in table}):
        rows = [r for r in table if r["N"] == n]
        axes[0].plot([r["K"] for r in rows], [r["ratio_median"] for r in rows], marker="o", label=f"N = {n}")
        axes[1].plot([r["K"] for r in rows], [r["ttft_ratio_median"] for r in rows], marker="o", label=f"N = {n}")
    for ax, title in zip(axes, ("throughput / base", "TTFT p50 / base")):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distinct adapters in the batch (K)")
        ax.set_title(title + " (median of pairs)")
        ax.legend()
    fig.suptitle("Aligner adapters vs base model, same engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K = 32, N in {1, 4, 16}, one pair, 32 x 32 tokens")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=9, help="pairs per N at the target K")
    p.add_argument("--target-k", type=int, default=64)
    p.add_argument("--latency-pairs", type=int, default=40, help="single-request TTFT pairs per N at the target K")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.target_k, args.requests, args.max_tokens, args.reps, args.latency_pairs = (
            [32],
            32,
            32,
            32,
            1,
            8,
        )
    result = grid(args)
    table = summarise(result["rows"])
    name = "throughput-quick" if args.quick else "throughput"
    path = write_result(
        name, {"args": vars(args), "summary": table, **result}, **({"out": args.out} if args.out else {})
    )
    plot(table, path.with_suffix(".png"))
    print(
        f"\n{'N':>3} {'K':>4} {'base tok/s':>11} {'aligner tok/s':>14} {'ratio':>7} {'TTFT ratio':>11} {'ITL ratio':>10} {'op share':>9}"
    )
    for r in table:
        print(
            f"{r['N']:>3} {r['K']:>4} {r['base_tok_s']:>11.1f} {r['aligner_tok_s']:>14.1f} {r['ratio_median']:>7.3f} "
            f"{r['ttft_ratio_median']:>11.3f} {r['itl_ratio_median']:>10.3f} {100 * r['op_share_median']:>8.1f}%"
        )
    print(f"adapter load into the engine: p50 {result['load_ms_p50']:.1f} ms, p99 {result['load_ms_p99']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
