"""Adapter stacks vs the base model: throughput, TTFT and inter-token latency, in the engine and over HTTP.

64 concurrent requests (prompts of ~40 tokens, greedy, `ignore_eos`) per run, for: base; stacks of 1, 2 and 4
one-token adapters at scale 1; and the same stacks at fractional scales (entry j at `FRACTIONS[j]`: 0.5,
0.75, -0.5, 1.5). A pool of 8 random adapters; request i stacks adapters i, i+1, ... (mod 8), so a run holds
8 distinct stacks, and each (adapter, scale) is its own hot table entry (at most 8 x 5 = 40).

Each configuration runs against the mean of the base runs just before and after it: rounds of base, 1x1,
base, 2x1, base, 4x1, base, 1xf, base, ...; the summary is the median ratio over the rounds' pairs.

- engine: one AlignerEngine (`bench/common.py`'s engine, the server's dtype float32 unless
  ALIGNER_BENCH_DTYPE says otherwise), each stack leased as the server leases it (`lease_stack`), the
  burst queued before the engine's first step (`run_workload`).
- http: a real `aligner serve` process (SQLite, open mode, eager, float32, 256 batch rows, tenant limits
  lifted so 64 requests run at once), the adapters uploaded, 64 streaming chat requests at once with
  httpx, `"adapters": [{"name", "scale"}, ...]` in the body. The burst is not synchronised with the
  engine's steps, and client and server share the CPU, so these ratios are noisier.

    python bench/stacking.py --quick        # 64 x 16 tokens, one round each: a few minutes
    python bench/stacking.py                # 64 x 64 tokens, 3 rounds in the engine, 2 over HTTP
"""

from __future__ import annotations

import os

os.environ.setdefault("ALIGNER_BENCH_DTYPE", "float32")  # the server's default dtype (read by common)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from common import (  # noqa: E402
    DTYPE,
    REPO,
    RunStats,
    const,
    engine_options,
    engine_runner,
    prompts,
    pyplot,
    run_workload,
    write_result,
)

POOL = 8  # distinct one-token adapters; request i's stack starts at adapter i mod POOL
FRACTIONS = (0.5, 0.75, -0.5, 1.5)  # entry j of a fractional stack runs at FRACTIONS[j]


@dataclass(frozen=True)
class Config:
    """One row of the benchmark: a stack size and each entry's scale (size 0: the base model)."""

    label: str
    scales: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.scales)

    def stack(self, i: int) -> list[tuple[int, float]]:
        """Request i's stack: (pool index, scale) per entry, in lane order."""
        return [((i + j) % POOL, s) for j, s in enumerate(self.scales)]


CONFIGS = [
    Config("1 x 1.0", (1.0,)),
    Config("2 x 1.0", (1.0, 1.0)),
    Config("4 x 1.0", (1.0, 1.0, 1.0, 1.0)),
    Config("1 x frac", FRACTIONS[:1]),
    Config("2 x frac", FRACTIONS[:2]),
    Config("4 x frac", FRACTIONS[:4]),
]


def pool_adapters(spec) -> list:
    from aligner_core.adapter_format import Adapter

    return [Adapter.random(spec, tokens=1, seed=7_000 + j, gate_scale=0.05) for j in range(POOL)]


def _mean(a: dict, b: dict) -> dict:
    """Two runs' figures averaged (numbers only)."""
    return {k: (a[k] + b[k]) / 2 if isinstance(a[k], (int, float)) and not isinstance(a[k], bool) else a[k] for k in a}


def rounds(run, configs: list[Config], reps: int, where: str) -> list[dict]:
    """base, c1, base, c2, base, ... for `reps` rounds; each config against the mean of its two base runs."""
    rows = []
    before = run(None)
    for rnd in range(reps):
        for cfg in configs:
            ours = run(cfg)
            after = run(None)
            b = _mean(before, after)
            rows.append(
                {
                    "where": where,
                    "round": rnd,
                    "config": cfg.label,
                    "size": cfg.size,
                    "scales": list(cfg.scales),
                    "base": b,
                    "stack": ours,
                    "ratio": ours["tok_per_s"] / b["tok_per_s"],
                    "ttft_ratio": ours["ttft_p50_ms"] / b["ttft_p50_ms"],
                    "itl_ratio": ours["itl_p50_ms"] / b["itl_p50_ms"],
                }
            )
            print(
                f"[{where}] round {rnd} {cfg.label:>8}: base {b['tok_per_s']:7.1f} tok/s, stack "
                f"{ours['tok_per_s']:7.1f} tok/s, ratio {rows[-1]['ratio']:.3f}, TTFT p50 {b['ttft_p50_ms']:.0f} -> "
                f"{ours['ttft_p50_ms']:.0f} ms, ITL p50 {b['itl_p50_ms']:.1f} -> {ours['itl_p50_ms']:.1f} ms"
                f" (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
            before = after
    return rows


def engine_part(args, configs: list[Config]) -> dict:
    from transformers import AutoTokenizer

    from aligner_core.adapter_format import encode
    from server.engine.facade import AdapterUse

    opts, pm = engine_options(max_slots=64, cold_slots=0, max_tokens=1, kv_cache_gib=2)
    t0 = time.perf_counter()
    runner = engine_runner(opts)
    start_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(pm.path)
    eng = runner.engine
    pool = pool_adapters(pm.spec)
    loads = [(a.sha256(), const(encode(a))) for a in pool]
    try:
        runner.run(run_workload(eng, tok, keys=[None] * 8, max_tokens=8, label="warmup"))

        def run(cfg: Config | None) -> dict:
            leases: dict[tuple, object] = {}
            keys: list[str | None] = []
            for i in range(args.requests):
                if cfg is None:
                    keys.append(None)
                    continue
                stack = tuple(cfg.stack(i))
                if stack not in leases:  # as the server leases a request's stack (scale 0 would be left out)
                    uses = [AdapterUse(loads[j][0], loads[j][1], s) for j, s in stack]
                    leases[stack] = runner.run(eng.lease_stack(uses))
                keys.append(leases[stack].key)  # type: ignore[attr-defined]
            try:
                before = runner.run(eng.stats())["op_seconds"]
                label = cfg.label.replace(" ", "") if cfg else "base"
                got = runner.run(
                    run_workload(
                        eng, tok, keys=keys, max_tokens=args.max_tokens, label=label, tokens=cfg.size if cfg else 0
                    )
                ).as_dict()
                got["op_share"] = (runner.run(eng.stats())["op_seconds"] - before) / got["seconds"]
                return got
            finally:
                for lease in leases.values():
                    runner.run(lease.release())  # type: ignore[attr-defined]

        rows = rounds(run, configs, args.reps, "engine")
        stats = runner.run(eng.stats())
    finally:
        runner.close()
    stats.pop("keys", None)
    return {"rows": rows, "engine_start_s": start_s, "table": stats}


async def http_workload(http, model: str, cfg: Config | None, *, requests: int, max_tokens: int) -> RunStats:
    """`requests` streaming chats sent at once; TTFT from the burst's start, ITL per request."""
    texts = prompts(requests)
    ttft: list[float] = []
    itl: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        body: dict = {
            "model": model,
            "messages": [{"role": "user", "content": texts[i]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if cfg is not None:
            body["adapters"] = [{"name": f"stack-{j}", "scale": s} for j, s in cfg.stack(i)]
        first = last = None
        n = 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:500]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
        if first is None or last is None:
            raise RuntimeError("stream ended without a token")
        ttft.append((first - start) * 1000)
        if n > 1:
            itl.append((last - first) * 1000 / (n - 1))
        counts.append(n)

    await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - start
    return RunStats.measured(
        cfg.label if cfg else "base", POOL if cfg else 0, 1 if cfg else 0, requests, counts, seconds, ttft, itl
    )


def http_part(args, configs: list[Config]) -> dict:
    import httpx

    sys.path.insert(0, str(REPO / "tests"))
    from support import Server

    from aligner_core.adapter_format import encode
    from aligner_core.model_prep import prepare

    spec = prepare().spec
    env = {
        "ALIGNER_DTYPE": "float32",  # the server's default, named so a caller's environment cannot move it
        "ALIGNER_MAX_NUM_SEQS": "256",
        "ALIGNER_KV_CACHE_GIB": "2",
        "ALIGNER_TENANT_MAX_CONCURRENT_REQUESTS": "1024",
        "ALIGNER_TENANT_REQUESTS_PER_MINUTE": "1000000",
        "ALIGNER_TENANT_MAX_TOKENS_IN_FLIGHT": "10000000",
        "ALIGNER_TENANT_MAX_ACTIVE_ADAPTERS": "1024",
    }
    with tempfile.TemporaryDirectory(prefix="stacking-") as tmp:
        srv = Server(f"sqlite:///{tmp}/store.db", Path(tmp) / "server.log", env=env)
        t0 = time.perf_counter()
        srv.start()
        start_s = time.perf_counter() - t0
        loop = asyncio.new_event_loop()
        limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=args.requests + 8)
        http = httpx.AsyncClient(base_url=srv.base, timeout=600, limits=limits)
        try:
            with httpx.Client(base_url=srv.base, timeout=60) as sync:
                for j, a in enumerate(pool_adapters(spec)):
                    r = sync.post(
                        "/v1/adapters",
                        files={"file": (f"stack-{j}.safetensors", encode(a))},
                        data={"name": f"stack-{j}"},
                    )
                    r.raise_for_status()
                model = sync.get("/v1/models").json()["data"][0]["id"]
            loop.run_until_complete(http_workload(http, model, None, requests=8, max_tokens=8))  # warm-up

            def run(cfg: Config | None) -> dict:
                got = loop.run_until_complete(
                    http_workload(http, model, cfg, requests=args.requests, max_tokens=args.max_tokens)
                )
                return got.as_dict()

            rows = rounds(run, configs, args.http_reps, "http")
        except Exception:
            print(srv.log_tail(), file=sys.stderr)
            raise
        finally:
            loop.run_until_complete(http.aclose())
            loop.close()
            srv.stop()
    return {"rows": rows, "server_start_s": start_s}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["where"], r["config"]), []).append(r)
    med = statistics.median
    return [
        {
            "where": where,
            "config": label,
            "size": rs[0]["size"],
            "scales": rs[0]["scales"],
            "pairs": len(rs),
            "base_tok_s": med(r["base"]["tok_per_s"] for r in rs),
            "stack_tok_s": med(r["stack"]["tok_per_s"] for r in rs),
            "ratio_median": med(r["ratio"] for r in rs),
            "ratios": [round(r["ratio"], 4) for r in rs],
            "base_ttft_p50_ms": med(r["base"]["ttft_p50_ms"] for r in rs),
            "ttft_p50_ms": med(r["stack"]["ttft_p50_ms"] for r in rs),
            "ttft_ratio_median": med(r["ttft_ratio"] for r in rs),
            "base_itl_p50_ms": med(r["base"]["itl_p50_ms"] for r in rs),
            "itl_p50_ms": med(r["stack"]["itl_p50_ms"] for r in rs),
            "itl_ratio_median": med(r["itl_ratio"] for r in rs),
            **({"op_share_median": med(r["stack"]["op_share"] for r in rs)} if "op_share" in rs[0]["stack"] else {}),
        }
        for (where, label), rs in groups.items()
    ]


def markdown(table: list[dict]) -> str:
    """The ratio table, one row per (where, config)."""
    lines = [
        "| where | stack | scales | pairs | base tok/s | stack tok/s | throughput / base | TTFT p50 / base "
        "| ITL p50 / base | op share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        op = f"{100 * r['op_share_median']:.1f}%" if "op_share_median" in r else "—"
        lines.append(
            f"| {r['where']} | {r['config']} | {', '.join(f'{s:g}' for s in r['scales'])} | {r['pairs']} "
            f"| {r['base_tok_s']:.0f} | {r['stack_tok_s']:.0f} | {r['ratio_median']:.3f} "
            f"| {r['ttft_ratio_median']:.3f} | {r['itl_ratio_median']:.3f} | {op} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for where, style in (("engine", "-"), ("http", "--")):
        for frac, color in ((False, "C0"), (True, "C1")):
            rows = sorted(
                (r for r in table if r["where"] == where and (r["config"].endswith("frac") == frac)),
                key=lambda r: r["size"],
            )
            if not rows:
                continue
            label = f"{where}, {'fractional scales' if frac else 'scale 1'}"
            for ax, key in zip(axes, ("ratio_median", "ttft_ratio_median", "itl_ratio_median")):
                ax.plot([r["size"] for r in rows], [r[key] for r in rows], style, marker="o", color=color, label=label)
    for ax, title in zip(axes, ("throughput / base", "TTFT p50 / base", "ITL p50 / base")):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([1, 2, 4])
        ax.set_xlabel("adapters in each request's stack")
        ax.set_title(title + " (median of pairs)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Adapter stacks vs base, 64 concurrent requests, {DTYPE}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 x 16 tokens, one round in the engine and over HTTP")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="rounds in the engine")
    p.add_argument("--http-reps", type=int, default=2, help="rounds over HTTP (0: skip)")
    p.add_argument("--only", choices=["engine", "http"], help="run one part only")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.max_tokens, args.reps, args.http_reps = 16, 1, 1
    name = "stacking-quick" if args.quick else "stacking"
    out = {"out": args.out} if args.out else {}
    rows: list[dict] = []
    extra: dict = {}
    load = {"start": os.getloadavg()}
    previous = (args.out or REPO / "bench" / "results") / f"{name}.json"
    if args.only and previous.exists():  # keep the other part's rows from the last run
        old = json.loads(previous.read_text())
        rows += [r for r in old.get("rows", []) if r["where"] != args.only]
        extra |= {k: old[k] for k in ("engine", "http") if k in old and k != args.only}
        load |= {k: v for k, v in old.get("load", {}).items() if k != "start" and args.only not in k}

    def save() -> Path:
        table = summarise(rows)
        path = write_result(name, {"args": vars(args), "summary": table, "load": load, **extra, "rows": rows}, **out)
        plot(table, path.with_suffix(".png"))
        return path

    if args.only in (None, "engine") and args.reps:
        got = engine_part(args, CONFIGS)
        rows += got.pop("rows")
        extra["engine"] = got
        load["after_engine"] = os.getloadavg()
        save()  # written before the HTTP part, which may fail on its own
    if args.only in (None, "http") and args.http_reps:
        got = http_part(args, CONFIGS)
        rows += got.pop("rows")
        extra["http"] = got
        load["after_http"] = os.getloadavg()
    path = save()
    print("\n" + markdown(summarise(rows)))
    print(f"\nwrote {path} (load average {os.getloadavg()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
