"""Adapter lifecycle through the real server: upload, load into the engine, first token.

A real `aligner serve` process (SQLite store, open mode, eager) on loopback. For each of `--count` fresh
adapters, one at a time: POST the file (upload latency), then a streaming chat naming it (time from the
start of the upload to the first token). The engine load of that adapter (store fetch + projection in
every worker) is read from the server's own `aligner_adapter_load_seconds` histogram, whose sum grows by
exactly that one load. Upload-to-usable = upload + engine load: from then on a request is scheduled like
a base request, so the rest of the first-token time is the model's prefill (compared with base requests
of the same prompt size).

    python bench/lifecycle.py [--quick]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import REPO, percentile, write_result

CHAT = [{"role": "user", "content": "Say hello to the new tenant."}]


def load_seconds_sum(http: httpx.Client) -> float:
    m = re.search(r"^aligner_adapter_load_seconds_sum (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def first_token_ms(http: httpx.Client, model: str, adapter: str | None, t0: float) -> float:
    body = {"model": model, "messages": CHAT, "max_tokens": 1, "stream": True, "temperature": 0}
    if adapter:
        body["adapter"] = adapter
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("stream ended without a token")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 adapters")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.count = 20
    sys.path.insert(0, str(REPO / "tests"))
    from support import Server

    from aligner_core.adapter_format import Adapter, encode
    from aligner_core.model_prep import prepare

    spec = prepare().spec
    with tempfile.TemporaryDirectory(prefix="lifecycle-") as tmp:
        srv = Server(
            f"sqlite:///{tmp}/store.db",
            Path(tmp) / "server.log",
            env={"ALIGNER_MAX_RESIDENT_ADAPTERS": "64", "ALIGNER_KV_CACHE_GIB": "1"},
        )
        srv.start()
        # One keep-alive client, as an SDK user has: a fresh httpx call per request would add its own client
        # set-up (an SSL context, a TCP connect) of tens of milliseconds to every figure.
        http = httpx.Client(base_url=srv.base, timeout=120)
        try:
            model = http.get("/v1/models").json()["data"][0]["id"]
            base_ttft = []
            for _ in range(5):
                t0 = time.perf_counter()
                base_ttft.append(first_token_ms(http, model, None, t0))
            upload, usable, first, load = [], [], [], []
            for i in range(args.count):
                data = encode(Adapter.random(spec, tokens=1, seed=90_000 + i, gate_scale=0.05))
                before = load_seconds_sum(http)
                t0 = time.perf_counter()
                r = http.post("/v1/adapters", files={"file": ("a.safetensors", data)}, data={"name": f"t{i}"})
                r.raise_for_status()
                up = (time.perf_counter() - t0) * 1000
                ft = first_token_ms(http, model, f"t{i}", t0)
                ld = (load_seconds_sum(http) - before) * 1000
                upload.append(up), first.append(ft), load.append(ld), usable.append(up + ld)
        finally:
            http.close()
            srv.stop()

    def pct(xs: list[float]) -> dict:
        return {"p50": statistics.median(xs), "p99": percentile(xs, 0.99), "max": max(xs)}

    result = {
        "upload_ms": pct(upload),
        "engine_load_ms": pct(load),
        "upload_to_usable_ms": pct(usable),
        "upload_to_first_token_ms": pct(first),
        "base_first_token_ms": pct(base_ttft),
        "samples": {"upload_ms": upload, "engine_load_ms": load, "upload_to_first_token_ms": first},
    }
    for k in ("upload_ms", "engine_load_ms", "upload_to_usable_ms", "upload_to_first_token_ms", "base_first_token_ms"):
        print(f"{k:>26}: p50 {result[k]['p50']:7.1f}  p99 {result[k]['p99']:7.1f}  max {result[k]['max']:7.1f}")
    name = "lifecycle-quick" if args.quick else "lifecycle"
    print(write_result(name, {"args": vars(args), **result}, **({"out": args.out} if args.out else {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
