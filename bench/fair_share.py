"""Fair share through the real server: tenant B's time to a first token while tenant A floods.

A real multi-tenant `aligner serve` (SQLite, eager, 64 engine batch rows) per scheduling policy: vLLM's
priority scheduler with each request's priority from its tenant's load (`ALIGNER_FAIR_PRIORITY=true`, the
default) and plain first-come-first-served. On each, A floods twice: once within default-like limits
(6 concurrent requests, n <= 4) and once unlimited (every quota null, as tenants were before the limits),
each time with `--streams` concurrent streams of n=`--n` and a large-n request. B's short chat
(max_tokens 1) is timed idle and under the flood; A's refused requests are counted.

    python bench/fair_share.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import REPO, pyplot, write_result

ADMIN = "bench-admin-key"
QUICK = [{"role": "user", "content": "Say hi."}]


def tenant(http: httpx.Client, name: str, quotas: dict) -> str:
    h = {"authorization": f"Bearer {ADMIN}"}
    t = http.post("/admin/tenants", json={"name": name, "quotas": quotas}, headers=h).json()
    return http.post(f"/admin/tenants/{t['id']}/keys", headers=h).json()["key"]


def b_latency(http: httpx.Client, key: str, model: str) -> float:
    t0 = time.perf_counter()
    r = http.post(
        "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        timeout=300,
        json={"model": model, "messages": QUICK, "max_tokens": 1},
    )
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def flood(base: str, key: str, model: str, n: int, max_tokens: int, outcomes: list, stop: threading.Event) -> None:
    body = {
        "model": model,
        "n": n,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }
    try:
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json=body, timeout=600, headers={"authorization": f"Bearer {key}"}
        ) as r:
            if r.status_code != 200:
                outcomes.append(r.status_code)
                return
            for _ in r.iter_lines():
                if stop.is_set():
                    break
            outcomes.append(200)
    except httpx.HTTPError as e:
        outcomes.append(type(e).__name__)


def scenario(http: httpx.Client, base: str, model: str, a_key: str, b_key: str, args) -> dict:
    idle = [b_latency(http, b_key, model) for _ in range(args.samples)]
    outcomes: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=flood, args=(base, a_key, model, args.big_n, args.max_tokens, outcomes, stop))]
    threads += [
        threading.Thread(target=flood, args=(base, a_key, model, args.n, args.max_tokens, outcomes, stop))
        for _ in range(args.streams)
    ]
    for t in threads:
        t.start()
    time.sleep(args.settle)
    under = [b_latency(http, b_key, model) for _ in range(args.samples)]
    stop.set()
    for t in threads:
        t.join(600)
    time.sleep(2)  # aborted streams leave the engine
    return {
        "b_idle_ms": idle,
        "b_under_flood_ms": under,
        "b_idle_p50_ms": statistics.median(idle),
        "b_under_flood_p50_ms": statistics.median(under),
        "b_under_flood_max_ms": max(under),
        "a_admitted": outcomes.count(200),
        "a_refused_429": outcomes.count(429),
        "a_other": [o for o in outcomes if o not in (200, 429)],
    }


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    labels = list(results)
    bars = (
        ("b_idle_p50_ms", "B idle, p50"),
        ("b_under_flood_p50_ms", "B under A's flood, p50"),
        ("b_under_flood_max_ms", "B under A's flood, max"),
    )
    for j, (field, name) in enumerate(bars):
        ax.bar([x + (j - 1) * 0.27 for x in range(len(labels))], [results[k][field] for k in labels], 0.27, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("B's latency to 1 token (ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer samples and a shorter flood")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--big-n", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--settle", type=float, default=5.0, help="seconds of flood before B is timed")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.streams, args.settle = 2, 8, 3.0
    sys.path.insert(0, str(REPO / "tests"))
    from support import Server

    limited = {"max_concurrent_requests": 6, "max_n": 4, "max_tokens_in_flight": 16384}
    unlimited = dict.fromkeys(("requests_per_minute", "max_concurrent_requests", "max_n", "max_tokens_in_flight"))
    results = {}
    for policy, fair in (("priority", "true"), ("fcfs", "false")):
        with tempfile.TemporaryDirectory(prefix="fair-") as tmp:
            env = {"ALIGNER_ADMIN_KEY": ADMIN, "ALIGNER_FAIR_PRIORITY": fair, "ALIGNER_MAX_NUM_SEQS": "64"}
            srv = Server(f"sqlite:///{tmp}/store.db", Path(tmp) / "server.log", env=env)
            srv.start()
            http = httpx.Client(base_url=srv.base, timeout=300)
            try:
                model = http.get("/health").json()["model"]
                b = tenant(http, "b", {})
                for label, quotas in (("limits", limited), ("no-limits", unlimited)):
                    a = tenant(http, f"a-{label}", quotas)
                    r = results[f"{policy}/{label}"] = scenario(http, srv.base, model, a, b, args)
                    print(
                        f"{policy:>9} {label:>9}: B idle p50 {r['b_idle_p50_ms']:7.0f} ms, under flood p50 "
                        f"{r['b_under_flood_p50_ms']:7.0f} max {r['b_under_flood_max_ms']:7.0f} ms; "
                        f"A admitted {r['a_admitted']}, 429 {r['a_refused_429']}",
                        flush=True,
                    )
            finally:
                http.close()
                srv.stop()
    name = "fair-share-quick" if args.quick else "fair-share"
    path = write_result(name, {"args": vars(args), "scenarios": results}, **({"out": args.out} if args.out else {}))
    plot(results, path.with_suffix(".png"))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
