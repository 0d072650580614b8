"""Load: a real server process, 100 uploaded adapters, 200 concurrent streaming clients.

Every stream must complete: the official `openai.AsyncOpenAI` client for most clients, raw SSE over httpx
(which must end with exactly one `data: [DONE]`) for every tenth. Token counts are checked exactly: each
request asks for `logprobs`, so every generated token appears once in some chunk's `logprobs.content`, and
that count must equal `usage.completion_tokens` (which, with `ignore_eos`, must equal `max_tokens`). Content
chunks may carry several tokens or none (vLLM holds back incomplete UTF-8), so they are bounded, not equated.

Afterwards no adapter lease may be left in flight, the server's token
and request counters must agree with what the clients saw, and the RSS of the server's whole process tree
(the API server plus its vLLM engine-core child) must not grow past a generous bound after a warm-up round.

Default: 200 clients x 2 requests of 12 tokens (a few minutes at most on 2 CPU cores, server start included).
Soak: `ALIGNER_LOAD_SECONDS=600 pytest tests/test_load.py -s` keeps every client looping for that long.
A one-line JSON summary is printed and written to `load-summary.json` in the test's tmp dir (and to
`$ALIGNER_LOAD_SUMMARY` when set).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from support import PROMPTS, Server, real_model, serve

from aligner_core.adapter_format import Adapter, encode

ADAPTERS = 100
CLIENTS = 200
ROUNDS = int(os.environ.get("ALIGNER_LOAD_ROUNDS", "2"))
SOAK_SECONDS = float(os.environ.get("ALIGNER_LOAD_SECONDS", "0"))  # > 0: loop for this long instead of ROUNDS
MAX_TOKENS = 12
WARMUP_TOKENS = 4
RAW_EVERY = 10  # every tenth client speaks raw SSE over httpx
REQUEST_TIMEOUT = 600.0
RSS_GROWTH_LIMIT_MB = 500.0
RSS_GROWTH_LIMIT_FRACTION = 0.25


class StreamError(AssertionError):
    pass


@dataclass
class Result:
    client: int
    adapter: str
    raw: bool
    completion_tokens: int = 0
    prompt_tokens: int = 0
    logprob_tokens: int = 0
    content_chunks: int = 0
    text: str = ""
    ttft: float = 0.0
    seconds: float = 0.0


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# --- stream checks (pure, so test_checks_catch_broken_streams can prove they fire) ----------------------


def check_chunks(chunks: list[dict], result: Result, max_tokens: int) -> Result:
    """`chunks`: the decoded JSON events of one chat stream, in order, without the [DONE] sentinel."""
    if not chunks:
        raise StreamError("empty stream")
    usage_chunks = [c for c in chunks if c.get("usage")]
    if len(usage_chunks) != 1 or chunks[-1] is not usage_chunks[0] or chunks[-1].get("choices"):
        raise StreamError(f"expected exactly one usage chunk, last and without choices; got {len(usage_chunks)}")
    finishes = []
    for c in chunks[:-1]:
        for choice in c.get("choices") or []:
            if choice.get("index", 0) != 0:
                raise StreamError(f"unexpected choice index {choice.get('index')}")
            if (choice.get("delta") or {}).get("content"):
                result.content_chunks += 1
                result.text += choice["delta"]["content"]
            result.logprob_tokens += len((choice.get("logprobs") or {}).get("content") or [])
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    usage = chunks[-1]["usage"]
    result.completion_tokens, result.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    if finishes != ["length"]:
        raise StreamError(f"finish reasons {finishes}, expected exactly one 'length'")
    if result.completion_tokens != max_tokens:
        raise StreamError(f"usage.completion_tokens {result.completion_tokens} != max_tokens {max_tokens} (ignore_eos)")
    if result.logprob_tokens != result.completion_tokens:
        raise StreamError(f"{result.logprob_tokens} tokens streamed, usage says {result.completion_tokens}")
    if not 1 <= result.content_chunks <= result.completion_tokens:
        raise StreamError(f"{result.content_chunks} content chunks for {result.completion_tokens} tokens")
    if result.prompt_tokens <= 0:
        raise StreamError(f"usage.prompt_tokens {result.prompt_tokens}")
    return result


def check_sse(lines: list[str], result: Result, max_tokens: int) -> Result:
    """Raw SSE lines of one response: `data: {...}` events, then exactly one `data: [DONE]`, last."""
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise StreamError(
            f"stream does not end with data: [DONE] (last event: {events[-1][:80] if events else None!r})"
        )
    if events.count("[DONE]") != 1:
        raise StreamError("more than one [DONE]")
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c for c in chunks if "error" in c]
    if errors:
        raise StreamError(f"error event in stream: {errors[0]}")
    return check_chunks(chunks, result, max_tokens)


# --- clients ------------------------------------------------------------------------------------------


def _body(model: str, adapter: str, prompt: str, max_tokens: int) -> dict:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": prompt},
    ]  # short: prefill is most of the work
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "adapter": adapter,
        "ignore_eos": True,
    }


async def one_openai(client: openai.AsyncOpenAI, body: dict, result: Result) -> Result:
    body = dict(body)
    kw = {
        k: body.pop(k)
        for k in ("model", "messages", "max_tokens", "temperature", "stream", "stream_options", "logprobs")
    }
    t0 = time.monotonic()
    chunks = []
    stream = await client.chat.completions.create(**kw, extra_body=body)
    async for chunk in stream:  # completes only if the response ends cleanly
        if not chunks:
            result.ttft = time.monotonic() - t0
        chunks.append(chunk.model_dump(exclude_unset=True))
    result.seconds = time.monotonic() - t0
    return check_chunks(chunks, result, kw["max_tokens"])


async def one_raw(client: httpx.AsyncClient, body: dict, result: Result) -> Result:
    t0 = time.monotonic()
    lines = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise StreamError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        if not r.headers["content-type"].startswith("text/event-stream"):
            raise StreamError(f"content-type {r.headers['content-type']}")
        async for line in r.aiter_lines():
            if not lines:
                result.ttft = time.monotonic() - t0
            lines.append(line)
    result.seconds = time.monotonic() - t0
    return check_sse(lines, result, body["max_tokens"])


async def drive(
    base: str, model: str, names: list[str], *, clients: int, rounds: int, seconds: float, max_tokens: int, tally: Tally
) -> float:
    """`clients` concurrent clients, each sending `rounds` streaming requests back to back (or looping until
    `seconds` have passed, when > 0). Returns the wall time."""
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=60)
    oa = openai.AsyncOpenAI(
        base_url=base + "/v1",
        api_key="open-mode",
        max_retries=0,
        timeout=timeout,
        http_client=httpx.AsyncClient(limits=limits, timeout=timeout),
    )
    raw = httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout)
    start = time.monotonic()
    deadline = start + seconds

    async def client(i: int) -> None:
        n = 0
        while (n < rounds) if seconds <= 0 else (time.monotonic() < deadline):
            adapter = names[(i + n * 37) % len(names)]  # spread over all adapters, a different one each round
            prompt = f"{PROMPTS[(i + n) % len(PROMPTS)]} #{i}"
            use_raw = i % RAW_EVERY == 0
            result = Result(i, adapter, use_raw)
            try:
                body = _body(model, adapter, prompt, max_tokens)
                tally.results.append(await (one_raw(raw, body, result) if use_raw else one_openai(oa, body, result)))
            except Exception as e:  # every failure is counted and reported, none is retried
                tally.failures.append(
                    f"client {i} request {n} ({'raw' if use_raw else 'openai'}, {adapter}): {type(e).__name__}: {e}"
                    + (f" (from {e.__cause__!r})" if e.__cause__ else "")
                )
            n += 1

    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        await oa.close()
        await raw.aclose()
    return time.monotonic() - start


# --- server-side observations -------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self.halt.wait(self.every)


def metrics(base: str) -> dict[str, float]:
    """name{labels} -> value, for every sample line of /metrics."""
    out = {}
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


# --- the test -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"ALIGNER_MAX_NUM_SEQS": "256", "ALIGNER_MAX_RESIDENT_ADAPTERS": "128", "ALIGNER_KV_CACHE_GIB": "2"}
    yield from serve(tmp_path_factory.mktemp("load"), env)


@pytest.mark.server
def test_200_streaming_clients_over_100_adapters(server, tmp_path) -> None:
    spec = real_model().spec
    names = [f"load-{i:03d}" for i in range(ADAPTERS)]
    t0 = time.monotonic()
    with httpx.Client(base_url=server.base, timeout=60) as http:
        for i, name in enumerate(names):
            adapter = Adapter.random(spec, tokens=1, seed=1000 + i, gate_scale=0.08)
            r = http.post("/v1/adapters", files={"file": ("a.safetensors", encode(adapter))}, data={"name": name})
            assert r.status_code == 201, r.text
    upload_seconds = time.monotonic() - t0

    # warm-up: one request per adapter, all at once; loads every adapter into the engine
    warm = Tally()
    t0 = time.monotonic()
    asyncio.run(
        drive(
            server.base,
            spec.identity,
            names,
            clients=ADAPTERS,
            rounds=1,
            seconds=0,
            max_tokens=WARMUP_TOKENS,
            tally=warm,
        )
    )
    warmup_seconds = time.monotonic() - t0
    assert not warm.failures, "\n".join(warm.failures[:20])
    assert len(warm.results) == ADAPTERS
    settled(server)
    before = metrics(server.base)
    assert before["aligner_adapters_resident"] == ADAPTERS

    rss_start = tree_rss_mb(server.proc.pid)
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    tally = Tally()
    try:
        duration = asyncio.run(
            drive(
                server.base,
                spec.identity,
                names,
                clients=CLIENTS,
                rounds=ROUNDS,
                seconds=SOAK_SECONDS,
                max_tokens=MAX_TOKENS,
                tally=tally,
            )
        )
    finally:
        sampler.halt.set()
        sampler.join()
    rss_end = tree_rss_mb(server.proc.pid)
    settled(server)
    after = metrics(server.base)

    results = tally.results
    tokens = sum(r.completion_tokens for r in results)
    ttfts = sorted(r.ttft for r in results) or [0.0]
    summary = {
        "requests": len(results) + len(tally.failures),
        "failures": len(tally.failures),
        "clients": CLIENTS,
        "adapters": ADAPTERS,
        "raw_sse_requests": sum(r.raw for r in results),
        "max_tokens": MAX_TOKENS,
        "duration_s": round(duration, 2),
        "completion_tokens": tokens,
        "tok_per_s": round(tokens / duration, 1),
        "req_per_s": round(len(results) / duration, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 3),
        "rss_start_mb": round(rss_start),
        "rss_end_mb": round(rss_end),
        "rss_peak_mb": round(max(sampler.peak, rss_end)),
        "prompt_tokens_mean": round(statistics.mean(r.prompt_tokens for r in results), 1) if results else 0,
        "upload_s": round(upload_seconds, 2),
        "warmup_s": round(warmup_seconds, 2),
        "soak_seconds": SOAK_SECONDS,
    }
    line = json.dumps(summary)
    print("\nLOAD SUMMARY " + line)
    (tmp_path / "load-summary.json").write_text(line + "\n")
    if os.environ.get("ALIGNER_LOAD_SUMMARY"):
        Path(os.environ["ALIGNER_LOAD_SUMMARY"]).write_text(line + "\n")

    assert not tally.failures, (
        f"{len(tally.failures)} failed requests:\n" + "\n".join(tally.failures[:20]) + "\n" + server.log_tail()
    )
    if SOAK_SECONDS <= 0:
        assert len(results) == CLIENTS * ROUNDS
    assert len({r.adapter for r in results}) == ADAPTERS  # the load really was spread over every adapter
    assert sum(r.raw for r in results) >= CLIENTS // RAW_EVERY

    # the server's own counters agree with what the clients saw, and nothing is left in flight
    n_req = len(results)
    assert (
        total(after, "aligner_requests_total", kind="adapter") - total(before, "aligner_requests_total", kind="adapter")
        == n_req
    )
    assert (
        total(after, "aligner_completion_tokens_total", kind="adapter")
        - total(before, "aligner_completion_tokens_total", kind="adapter")
        == tokens
    )
    assert total(after, "aligner_prompt_tokens_total", kind="adapter") - total(
        before, "aligner_prompt_tokens_total", kind="adapter"
    ) == sum(r.prompt_tokens for r in results)
    assert after["aligner_adapter_requests_in_flight"] == 0
    assert after["aligner_adapters_resident"] == ADAPTERS
    assert total(after, "aligner_adapter_evictions_total") == 0  # 100 adapters fit the 128 slots
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200

    growth = rss_end - rss_start
    assert growth < max(RSS_GROWTH_LIMIT_MB, RSS_GROWTH_LIMIT_FRACTION * rss_start), summary


def settled(server: Server, timeout: float = 30) -> None:
    """Leases are released in a background task just after each stream ends: wait for that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(server.base)
        if m["aligner_adapter_requests_in_flight"] == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"requests still in flight {timeout}s after the load ended")


# --- the checks can fail ------------------------------------------------------------------------------


def _good_stream(tokens: int = 3) -> list[str]:
    lines = ['data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}']
    for t in range(tokens):
        finish = '"length"' if t == tokens - 1 else "null"
        lines.append(
            f'data: {{"choices": [{{"index": 0, "delta": {{"content": "t{t}"}}, '
            f'"logprobs": {{"content": [{{"token": "t{t}", "logprob": -1.0}}]}}, "finish_reason": {finish}}}]}}'
        )
    lines.append(
        f'data: {{"choices": [], "usage": {{"prompt_tokens": 5, "completion_tokens": {tokens}, "total_tokens": {5 + tokens}}}}}'
    )
    lines.append("data: [DONE]")
    return [x for line in lines for x in (line, "")]


def test_checks_catch_broken_streams() -> None:
    good = _good_stream()
    assert check_sse(good, Result(0, "a", True), 3).text == "t0t1t2"
    assert (
        check_chunks(
            [json.loads(line[6:]) for line in good if line.startswith("data: {")], Result(0, "a", False), 3
        ).logprob_tokens
        == 3
    )
    events = [line for line in good if line]
    broken = {
        "cut before [DONE]": events[:-1],
        "cut before usage": events[:-2] + events[-1:],
        "cut mid-generation": events[:2] + events[-1:],
        "token missing from the stream": events[:1] + events[2:],
        "two [DONE]": events + events[-1:],
        "empty": [],
        "error event": events[:2] + ['data: {"error": {"message": "boom", "code": 500}}'] + events[-1:],
    }
    for why, lines in broken.items():
        with pytest.raises(StreamError):
            check_sse(lines, Result(0, "a", True), 3)
            pytest.fail(why)
    with pytest.raises(StreamError):  # fewer tokens than asked for
        check_sse(_good_stream(2), Result(0, "a", True), 3)
