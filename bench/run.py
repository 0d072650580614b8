"""`make bench`: every benchmark in one invocation, then the targets, a summary plot and bench/README.md's table.

Each benchmark runs as its own process (engines free their memory between them), in this order:
throughput (Aligner vs base grid), lora (vLLM multi-LoRA), naive (HF one adapter at a time), lifecycle
(upload -> first token through the server), fair_share (a tenant's latency while another floods, priority
vs first-come-first-served scheduling), memory (resident adapters, 1,000,000 cold), store (1,000,000
adapters registered on SQLite and PostgreSQL). A failing one is reported and the rest still run.

    python bench/run.py --quick        # a few minutes
    python bench/run.py                # the full set (about 30 minutes on a 2-core CPU)
    python bench/run.py --only throughput lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, hardware, pyplot

BENCH = Path(__file__).resolve().parent
ORDER = ["throughput", "lora", "naive", "lifecycle", "fair_share", "memory", "store"]
SCRIPTS = {"store": "store_scale.py"}
MARKS = "<!-- bench-summary{}:start -->", "<!-- bench-summary{}:end -->"  # {} = "" or "-quick"


def run_one(name: str, quick: bool, out: Path) -> tuple[bool, float]:
    cmd = [sys.executable, str(BENCH / SCRIPTS.get(name, f"{name}.py")), "--out", str(out)] + (
        ["--quick"] if quick else []
    )
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=BENCH)
    seconds = time.perf_counter() - t0
    print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)
    return rc == 0, seconds


def load(out: Path, name: str, quick: bool) -> dict | None:
    path = out / f"{name}{'-quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def targets(out: Path, quick: bool) -> list[dict]:
    """Each issue target with the measured figure, from this invocation's JSON files."""
    rows: list[dict] = []
    tp = load(out, "throughput", quick)
    lora, naive = load(out, "lora", quick), load(out, "naive", quick)
    life, store = load(out, "lifecycle", quick), load(out, "store-scale", quick)
    memory = load(out, "memory", quick)
    summary = {(r["N"], r["K"]): r for r in (tp or {}).get("summary", [])}
    k = (tp or {}).get("args", {}).get("target_k", 64)

    def add(what: str, goal: str, value: float | None, ok: bool | None, note: str = "") -> None:
        rows.append({"target": what, "goal": goal, "measured": value, "met": ok, "note": note})

    for n, goal in ((1, 0.99), (4, 0.97), (16, 0.92)):
        r = summary.get((n, k))
        add(
            f"{k} distinct N={n} adapters: throughput / base",
            f">= {goal}",
            r and r["ratio_median"],
            r and r["ratio_median"] >= goal,
            r and f"median of {r['pairs']} pairs {r['ratios']}" + _op_share(r),
        )
    single = [r for r in (tp or {}).get("latency", []) if r["K"] == k]
    if single:
        worst = max(single, key=lambda r: r["ratio_median"])
        add(
            f"TTFT with {k} adapters / base, one request at a time (worst N)",
            "<= 1.05",
            worst["ratio_median"],
            worst["ratio_median"] <= 1.05,
            f"N={worst['N']}: {worst['aligner_ttft_p50_ms']:.1f} vs {worst['base_ttft_p50_ms']:.1f} ms, "
            f"median of {worst['pairs']} pairs; all N: " + ", ".join(f"{r['ratio_median']:.3f}" for r in single),
        )
    ttfts = [summary[(n, k)]["ttft_ratio_median"] for n in (1, 4, 16) if (n, k) in summary]
    add(
        f"TTFT p50 under a burst of {k} requests / base (worst N)",
        "<= 1.05",
        max(ttfts) if ttfts else None,
        ttfts and max(ttfts) <= 1.05,
        "every request queued before the engine's first step; median of the rounds' pairs",
    )
    ours = summary.get((1, k)) or next((summary[key] for key in sorted(summary) if key[0] == 1), None)
    for cfg in (lora or {}).get("configs", []):
        mine = next((r for r in cfg["rows"] if ours and r["K"] == ours["K"]), None)
        if mine and ours:
            ratio = ours["aligner_tok_s"] / mine["tok_per_s"]
            goal = ">= 4" if cfg["config"] == "all" else "(reported)"
            add(
                f"Aligner N=1 / vLLM LoRA rank 8 ({cfg['config']}), K={ours['K']}",
                goal,
                ratio,
                ratio >= 4 if cfg["config"] == "all" else None,
                f"{ours['aligner_tok_s']:.0f} vs {mine['tok_per_s']:.0f} tok/s; LoRA {mine['ratio_to_own_base']:.2f}x its own base",
            )
    naive_row = next((r for r in (naive or {}).get("rows", []) if r["label"].startswith("hf-aligner")), None)
    if naive_row and ours:
        ratio = ours["aligner_tok_s"] / naive_row["tok_per_s"]
        add(
            f"Aligner N=1 K={ours['K']} / HF one adapter at a time",
            ">= 10",
            ratio,
            ratio >= 10,
            f"{ours['aligner_tok_s']:.0f} vs {naive_row['tok_per_s']:.1f} tok/s",
        )
    if life:
        v = life["upload_to_usable_ms"]["p99"]
        add(
            "upload-to-usable p99 (ms)",
            "< 50",
            v,
            v < 50,
            f"upload p99 {life['upload_ms']['p99']:.1f}, engine load p99 {life['engine_load_ms']['p99']:.1f}",
        )
    for res in (store or {}).get("results", []):
        v = res["lookup"]["all"]["p99_ms"]
        add(f"store lookup p99 at {res['count']:,} adapters, {res['backend']} (ms)", "< 2", v, v < 2)
    if memory:
        add(
            f"engine resident adapters ({memory['cold_count']:,} cold): worker RSS (GiB)",
            "a few GB",
            (memory["worker_rss_after"] - memory["worker_rss_before"]) / 2**30,
            None,
            f"{memory['worker_rss_per_adapter']:.0f} B/adapter in RSS, {memory['raw_bytes_per_adapter']:.0f} B raw tensors; "
            f"cold generation same tokens as hot: {memory['cold_generation']['same_tokens']}",
        )
    return rows


def markdown(rows: list[dict], ran: dict, quick: bool) -> str:
    hw = hardware()
    lines = [
        f"Measured by `python bench/run.py{' --quick' if quick else ''}` on {hw.get('cpu_model', '?')} "
        f"({hw['cpus']} CPUs, {hw.get('ram_gib', '?')} GiB), {time.strftime('%Y-%m-%d')}; "
        f"benchmark wall times: "
        + ", ".join(f"{k} {v['seconds']:.0f} s{'' if v['ok'] else ' (FAILED)'}" for k, v in ran.items())
        + ".",
        "",
        "| target | goal | measured | met | note |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["measured"]
        shown = "—" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['target']} | {r['goal']} | {shown} | {met} | {r['note'] or ''} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    ratio_rows = [r for r in rows if r["measured"] is not None and "/" in r["target"] and "(ms)" not in r["target"]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ratio_rows) + 1.5))
    ax.barh(
        [r["target"] for r in ratio_rows],
        [r["measured"] for r in ratio_rows],
        color=["tab:green" if r["met"] else ("tab:grey" if r["met"] is None else "tab:red") for r in ratio_rows],
    )
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("ratio (log scale; green = target met, red = missed)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=ORDER, default=ORDER)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md's summary")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    ran = {}
    for name in ORDER:
        if name in args.only:
            ok, seconds = run_one(name, args.quick, args.out)
            ran[name] = {"ok": ok, "seconds": seconds}
    rows = targets(args.out, args.quick)
    suffix = "-quick" if args.quick else ""
    (args.out / f"summary{suffix}.json").write_text(
        json.dumps({"hardware": hardware(), "ran": ran, "targets": rows}, indent=1)
    )
    plot(rows, args.out / f"summary{suffix}.png")
    table = markdown(rows, ran, args.quick)
    print("\n" + table)
    readme = BENCH / "README.md"
    text = readme.read_text()
    start, end = (m.format(suffix) for m in MARKS)
    if not args.no_readme and start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return 0 if all(v["ok"] for v in ran.values()) else 1


def _op_share(row: dict) -> str:
    """The op's share of the adapter runs' wall time, timed inside the engine (missing in older files)."""
    share = row.get("op_share_median")
    return "" if share is None else f"; the op took {100 * share:.1f}% of the runs' time (timed in the engine)"


if __name__ == "__main__":
    raise SystemExit(main())
