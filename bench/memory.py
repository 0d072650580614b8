"""Adapters resident in the engine: memory per adapter in each tier, the most that fit a budget, the cold
load from the store, and a generation through a cold adapter among a million.

One engine (the bench dtype, eager, 64 hot slots, N <= `--max-tokens`) with a cold tier of `--count` adapters:
  - hot tier: the preallocated K_p/V_p/gate/bias slot tensors, bytes per slot from the table's shapes;
  - cold tier: `--count` adapters bulk-loaded (raw P and gates, ~3.4 KB each for SmolLM2 N = 1); the
    worker's RSS before and after, so Python's own index overhead is counted too. The adapters are
    distinct entries under distinct keys; their contents cycle through 64 random adapters, which
    changes nothing in memory (the raw store never deduplicates);
  - cold load from the store: SQLite store -> `lease` (fetch, RPC, decode, projection), one at a time;
  - a request through a cold adapter while `--count` are resident, its tokens checked against the same
    adapter served hot.

    python bench/memory.py [--quick]          # 1,000,000 adapters (--quick: 100,000)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common import chat_ids, engine_options, engine_runner, percentile, write_result

GIB = 1 << 30


def worker_rss() -> int:
    """RSS of the engine's worker processes (children of this process running the model)."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    return sum(p.memory_info().rss for p in procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100,000 cold adapters")
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--max-tokens", type=int, default=16, help="the engine's Nmax (hot slot size)")
    p.add_argument("--store-loads", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.store_loads = 100_000, 50
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from adapters_store import NewAdapter, open_store
    from aligner_core.adapter_format import Adapter, encode

    hot_slots = 64
    opts, pm = engine_options(
        max_slots=hot_slots,
        cold_slots=args.count + args.store_loads + 8,
        max_tokens=args.max_tokens,
        max_num_seqs=64,
        kv_cache_gib=1,
    )
    runner = engine_runner(opts)
    eng = runner.engine
    tok = AutoTokenizer.from_pretrained(pm.path)
    result: dict = {"args": vars(args), "hot_slots": hot_slots}
    try:
        # ---- hot tier, from the table's own shapes ----
        s = pm.spec
        G = s.num_heads // s.num_kv_heads
        per_slot = (
            4
            * s.num_layers
            * (2 * s.num_kv_heads * args.max_tokens * s.head_dim + s.num_kv_heads * G + s.num_heads * s.head_dim)
            + 4 * args.max_tokens
        )
        result["hot_bytes_per_slot"] = per_slot
        stats0 = runner.run(eng.stats())
        result["hot_table_bytes"] = stats0["hot_bytes"]

        # ---- cold load from the store ----
        with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:

            async def store_loads() -> list[float]:
                async with open_store(f"sqlite:///{tmp}/store.db") as store:
                    tenant = await store.ensure_tenant("bench")
                    recs = []
                    for i in range(args.store_loads):
                        a = Adapter.random(s, tokens=1, seed=50_000 + i, gate_scale=0.05)
                        blob = encode(a)
                        recs.append(
                            await store.create_adapter(
                                tenant.id,
                                NewAdapter(
                                    name=f"a{i}",
                                    blob=blob,
                                    tokens=a.tokens,
                                    params=a.params,
                                    sha256=a.sha256(),
                                    base_model=a.base_model,
                                ),
                            )
                        )
                    times = []
                    for rec in recs:
                        t0 = time.perf_counter()

                        async def load(rec=rec) -> bytes:
                            return await store.get_blob(rec.id)

                        lease = await eng.lease(rec.sha256, load)
                        times.append((time.perf_counter() - t0) * 1000)
                        await lease.release()
                    return times

            times = runner.run(store_loads())
        result["store_to_engine_load_ms"] = {
            "p50": statistics.median(times),
            "p99": percentile(times, 0.99),
            "max": max(times),
        }
        print(
            f"cold load store -> engine: p50 {statistics.median(times):.1f} ms, p99 {percentile(times, 0.99):.1f} ms",
            flush=True,
        )

        # ---- the cold tier at scale ----
        pool = [encode(Adapter.random(s, tokens=1, seed=60_000 + j, gate_scale=0.05)) for j in range(64)]
        import gc

        gc.collect()
        rss0, main0 = worker_rss(), _self_rss()
        t0 = time.perf_counter()
        batch = 8192
        with tqdm(total=args.count, desc="bulk load into the cold tier", unit="adapter", mininterval=5) as bar:
            for i in range(0, args.count, batch):
                items = [(f"cold-{j:07d}", pool[j % 64]) for j in range(i, min(args.count, i + batch))]
                runner.run(eng.load_many(items, batch=batch))
                bar.update(len(items))
        load_s = time.perf_counter() - t0
        gc.collect()
        rss1, main1 = worker_rss(), _self_rss()
        stats = runner.run(eng.stats())
        stats.pop("keys", None)
        result.update(
            {
                "cold_count": args.count,
                "bulk_load_s": load_s,
                "bulk_load_per_s": args.count / load_s,
                "worker_rss_before": rss0,
                "worker_rss_after": rss1,
                "worker_rss_per_adapter": (rss1 - rss0) / args.count,
                "frontend_rss_per_adapter": (main1 - main0) / args.count,
                "raw_bytes_per_adapter": stats["raw_bytes"] / max(1, stats["resident"]),
                "table": stats,
            }
        )
        per = result["worker_rss_per_adapter"] + max(0.0, result["frontend_rss_per_adapter"])
        result["max_resident"] = {
            f"{b}GiB": {"hot_only": int(b * GIB // per_slot), "two_tier": int(b * GIB // per)} for b in (1, 4, 16)
        }
        print(
            f"{args.count:,} cold adapters in {load_s:.0f} s; worker RSS {rss0 / GIB:.2f} -> {rss1 / GIB:.2f} GiB "
            f"({result['worker_rss_per_adapter']:.0f} B/adapter; raw tensors {result['raw_bytes_per_adapter']:.0f} B); "
            f"frontend {result['frontend_rss_per_adapter']:.0f} B/adapter",
            flush=True,
        )

        # ---- a request through a cold adapter, among all of them, vs the same adapter hot ----
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompt = chat_ids(tok, ["Describe the sea in one sentence."])[0]

        async def gen(key: str) -> tuple[list[int], float]:
            params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, extra_args={"aligner": key})
            t0, first, out = time.perf_counter(), None, None
            async for out in eng.client.generate(  # noqa: B007  (the last output is read after the loop)
                TokensPrompt(prompt_token_ids=prompt), params, request_id=f"m-{key}-{time.monotonic_ns()}"
            ):
                first = first or time.perf_counter()
            return list(out.outputs[0].token_ids), (first - t0) * 1000

        async def both() -> dict:
            key = f"cold-{args.count // 2:07d}"
            # keep all hot slots busy so the adapter is served cold, with 64 other long requests
            busy = [asyncio.create_task(gen(f"cold-{j:07d}")) for j in range(hot_slots)]
            await asyncio.sleep(0.5)
            cold_tokens, cold_ttft = await gen(key)
            await asyncio.gather(*busy)
            hot_tokens, hot_ttft = await gen(key)  # idle engine: promoted into a hot slot first
            return {
                "cold_tokens": cold_tokens,
                "hot_tokens": hot_tokens,
                "same_tokens": cold_tokens == hot_tokens,
                "cold_ttft_ms": cold_ttft,
                "hot_ttft_ms": hot_ttft,
            }

        result["cold_generation"] = runner.run(both())
        after = runner.run(eng.stats())
        result["cold_generation"]["staged"] = after["staged"]
        result["cold_generation"]["promotions"] = after["promotions"]
        print(
            f"generation through a cold adapter among {args.count:,}: same tokens as hot: "
            f"{result['cold_generation']['same_tokens']} (staged {after['staged']})",
            flush=True,
        )
    finally:
        runner.close()
    name = "memory-quick" if args.quick else "memory"
    print(write_result(name, result, **({"out": args.out} if args.out else {})))
    return 0


def _self_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


if __name__ == "__main__":
    raise SystemExit(main())
