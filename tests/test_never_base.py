"""Never silently base: a request that names an adapter runs every token with exactly that adapter, or fails
clearly.

A unit test drives the V1 routing tracker into the one place where it could run a row as base (a key the
table does not hold) and checks that it is counted and logged. The race test starts a real multi-tenant
server with 2 hot and 4 cold adapter slots, and for RACE_S seconds races uploads, overwrites, deletes, LRU
eviction (more adapters than hot + cold capacity) and cold promotion against streaming completions that each
name an adapter (some pin an older version). Afterwards, with the server stopped, every streamed completion
is teacher-forced through the Hugging Face reference under each version of its name that existed while it
ran: greedy tokens must equal the streamed ones and logprobs agree to LOGPROB_TOLERANCE for exactly one of
them, and never for base. Batch composition does not move the engine's numbers here (repeats of one version
and prompt, in different batches, gave logprobs equal to 1e-5 or bitwise), and the adapters move every
token's logprob beyond the tolerance (figure `tokens_separated_from_base`), so a completion that ran any
stretch of tokens without its adapter, or with another one, cannot pass. A clean 404 (the name was deleted),
429 or 503 is allowed and counted; any other error fails, as does a traceback in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import openai
import pytest
import torch
from support import LOGPROB_TOLERANCE, Server, linear_layers, real_model, record, serve, tiny_spec

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server

ADMIN = "admin-never-base"
SEED = 20261
RACE_S = 40.0  # wall time of the race itself
ADAPTER_STREAMS = 7  # one more than hot + cold slots, so now and then every slot is pinned (a clean 503)
BASE_STREAMS = 1  # control requests without an adapter, in the same batches
MAX_TOKENS = 10
# Strong enough that each adapter's tokens and logprobs differ from base and from each other (checked below),
# not so strong that float32 stops agreeing with the reference. Measured: at 0.2 an N = 4 adapter's first
# logprob was 1.0e-3 from the reference (the float32 reference itself 2e-4 from float64: ill-conditioned);
# at 0.1 the reference stays within 8e-5 of float64 and each first token's logprob is >= 0.49 from base's.
GATE_SCALE = 0.1
NAMES = ("alpha", "beta", "gamma", "delta", "eps")  # per tenant: 10 names, more than the 6 resident slots
GRACE_S = 1.0  # the store's change feed reaches the name cache asynchronously, a moment after the answer
ENV = {
    "ALIGNER_ADMIN_KEY": ADMIN,
    "ALIGNER_MAX_RESIDENT_ADAPTERS": "2",
    "ALIGNER_COLD_RESIDENT_ADAPTERS": "4",
    "ALIGNER_TENANT_MAX_ACTIVE_ADAPTERS": "64",
    "ALIGNER_TENANT_MAX_CONCURRENT_REQUESTS": "64",
    "ALIGNER_TENANT_REQUESTS_PER_MINUTE": "100000",
    "ALIGNER_TENANT_MANAGEMENT_PER_MINUTE": "100000",
}
PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "Three uses of a paperclip:"]  # short, cheap
QUOTAS = {"requests_per_minute": 100000, "max_concurrent_requests": 64, "max_active_adapters": 64}


# ---- the tracker itself: an unknown key is counted and logged ----


def test_a_row_with_an_unknown_key_is_counted_and_logged(caplog) -> None:
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from server.engine import op
    from server.engine.routing import Routing
    from server.engine.routing_v1 import AlignerRoutingLP
    from server.engine.table import AdapterTable, TableShape

    spec = tiny_spec()
    shape = TableShape.unsharded(spec, max_slots=2, max_tokens=4)
    table = AdapterTable(shape, linear_layers(spec), device=torch.device("cpu"), dtype=torch.float32)
    routing = Routing(4)
    adapter = Adapter.random(spec, tokens=1, seed=1)
    known, unknown = adapter.sha256(), hashlib.sha256(b"never loaded").hexdigest()
    slot = table.put(known, adapter)

    def row(index: int, key: str | None) -> tuple:
        return index, SamplingParams(extra_args={"aligner": key} if key else None), [], []

    op.set_worker_state(op.WorkerState(table=table, routing=routing, scale=1 / math.sqrt(spec.head_dim)))
    try:
        lp = AlignerRoutingLP(None, torch.device("cpu"), False)
        with caplog.at_level(logging.ERROR, logger="server.engine.routing_v1"):
            lp.update_state(
                BatchUpdate(batch_size=3, removed=[], moved=[], added=[row(0, known), row(1, unknown), row(2, None)])
            )
            assert routing.unknown_key_events == 1
            assert routing.row_slot[:3].tolist() == [slot, 0, 0]  # the unknown row can only run as base
            lp.update_state(BatchUpdate(batch_size=3, removed=[1], moved=[], added=[row(1, unknown)]))
    finally:
        op.set_worker_state(None)
    assert routing.unknown_key_events == 2
    errors = [r for r in caplog.records if r.name == "server.engine.routing_v1" and r.levelno == logging.ERROR]
    assert len(errors) == 2, "one ERROR per unknown-key event"
    for r in errors:
        assert unknown[:12] in r.getMessage() and unknown[12:24] not in r.getMessage()  # the key's prefix only
        assert "unknown adapter key" in r.getMessage()


# ---- the race ----


@dataclass
class Version:
    """One stored version of a tenant's name, and when it could be served."""

    tenant: str
    name: str
    number: int
    seed: int  # random_adapter(spec, seed) rebuilds it
    adapter: Adapter
    sent: float  # its upload was sent: it may be visible from then on
    newest_until: float = math.inf  # a later upload or a delete of the name was answered
    gone_at: float = math.inf  # a delete of the name was answered


@dataclass
class Run:
    tenant: str
    ref: str | None  # "name", "name@n", or None for a base control
    prompt: int
    sent: float
    answered: float = math.nan  # response headers came: the adapter was resolved and leased by then
    finished: float = math.nan
    outcome: str = "ok"
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class Ledger:
    """What the race did, with client-side times, so each run can be matched to the versions it may have used."""

    def __init__(self) -> None:
        self.versions: list[Version] = []
        self.runs: list[Run] = []
        self.ops: Counter[str] = Counter()
        self.failures: list[str] = []

    def live(self, tenant: str, name: str) -> list[Version]:
        return [v for v in self.versions if (v.tenant, v.name) == (tenant, name) and v.gone_at == math.inf]

    def candidates(self, run: Run) -> list[Version]:
        name, _, pin = run.ref.partition("@")
        mine = [v for v in self.versions if (v.tenant, v.name) == (run.tenant, name) and v.sent <= run.answered]
        if pin:
            return [v for v in mine if v.number == int(pin) and v.gone_at + GRACE_S >= run.sent]
        return [v for v in mine if v.newest_until + GRACE_S >= run.sent]

    def dump(self, path) -> None:
        """The whole race as JSON (adapters by seed), for looking into a failure offline."""
        versions = [{k: v for k, v in vars(x).items() if k != "adapter"} for x in self.versions]
        path.write_text(json.dumps({"versions": versions, "runs": [vars(r) for r in self.runs], "ops": self.ops}))


def random_adapter(spec, seed: int) -> Adapter:
    return Adapter.random(
        spec,
        tokens=(1, 2, 4)[seed % 3],
        start_layer=(2, 0)[seed % 2],
        gate_activation=("identity", "tanh")[seed % 2],
        seed=seed,
        gate_scale=GATE_SCALE,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("never-base"), ENV)


def scrape(text: str) -> dict[str, float]:
    """Prometheus text -> metric name (label sets summed) -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0].split()[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


async def run_race(server: Server, spec, prompts: list[list[int]]) -> Ledger:
    ledger = Ledger()
    seeds = itertools.count(SEED * 100)
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=server.base, timeout=60) as http:
        keys = {}
        for tenant in ("t0", "t1"):
            r = await http.post("/admin/tenants", headers=admin, json={"name": tenant, "quotas": QUOTAS})
            assert r.status_code == 201, r.text
            k = await http.post(f"/admin/tenants/{r.json()['id']}/keys", headers=admin)
            keys[tenant] = k.json()["key"]

        async def upload(tenant: str, name: str, kind: str) -> None:
            seed = next(seeds)
            adapter, sent = random_adapter(spec, seed), time.monotonic()
            r = await http.post(
                "/v1/adapters",
                headers={"authorization": f"Bearer {keys[tenant]}"},
                files={"file": ("a.safetensors", encode(adapter))},
                data={"name": name},
            )
            if r.status_code != 201:
                ledger.failures.append(f"upload {tenant}/{name}: {r.status_code} {r.text}")
                return
            done = time.monotonic()
            for v in ledger.live(tenant, name):
                v.newest_until = min(v.newest_until, done)
            ledger.versions.append(Version(tenant, name, r.json()["version"], seed, adapter, sent))
            ledger.ops[kind] += 1

        async def delete(tenant: str, name: str) -> None:
            r = await http.delete(f"/v1/adapters/{name}", headers={"authorization": f"Bearer {keys[tenant]}"})
            if r.status_code != 200:
                ledger.failures.append(f"delete {tenant}/{name}: {r.status_code} {r.text}")
                return
            done = time.monotonic()
            for v in ledger.live(tenant, name):
                v.newest_until, v.gone_at = min(v.newest_until, done), done
            ledger.ops["delete"] += 1

        for tenant in keys:
            for name in NAMES:
                await upload(tenant, name, "upload")

        async def chaos(tenant: str, rng: random.Random) -> None:
            """Overwrite, delete and re-create this tenant's names (one operation at a time per tenant)."""
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.8, 2.0))
                name = rng.choice(NAMES)
                if not ledger.live(tenant, name):
                    await upload(tenant, name, "upload")
                elif rng.random() < 0.7:
                    await upload(tenant, name, "overwrite")
                else:
                    await delete(tenant, name)

        clients = {
            t: openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=k, max_retries=0) for t, k in keys.items()
        }

        async def generate(run: Run) -> None:
            extra = {"return_token_ids": True, "ignore_eos": True} | ({"adapter": run.ref} if run.ref else {})
            try:
                stream = await clients[run.tenant].completions.create(
                    model=spec.identity,
                    prompt=prompts[run.prompt],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    logprobs=0,
                    stream=True,
                    extra_body=extra,
                )
                run.answered = time.monotonic()
                async for chunk in stream:
                    for choice in chunk.choices:
                        run.tokens += choice.token_ids or []
                        run.logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
                run.finished = time.monotonic()
            except openai.APIStatusError as e:
                run.outcome = str(e.status_code)
                if e.status_code not in (404, 429, 503):
                    ledger.failures.append(f"{run.tenant} {run.ref}: {e.status_code} {e.body}")
            except openai.APIError as e:  # an error event inside the stream, or the connection broke
                run.outcome = "error"
                ledger.failures.append(f"{run.tenant} {run.ref}: {type(e).__name__} {e}")
            ledger.runs.append(run)

        async def streamer(rng: random.Random, *, base: bool) -> None:
            while time.monotonic() < deadline:
                tenant = rng.choice(list(keys))
                ref = None
                if not base:
                    ref = rng.choice(NAMES)
                    older = ledger.live(tenant, ref)[:-1]
                    if older and rng.random() < 0.3:  # pin an older version: more distinct adapters in play
                        ref = f"{ref}@{rng.choice(older).number}"
                await generate(Run(tenant, ref, rng.randrange(len(prompts)), time.monotonic()))

        async def scraper() -> None:
            """Scrape /metrics like Prometheus during the race: each scrape pulls the workers' counters."""
            while time.monotonic() < deadline:
                r = await http.get("/metrics", headers=admin)
                if r.status_code != 200:
                    ledger.failures.append(f"/metrics: {r.status_code} {r.text[:200]}")
                await asyncio.sleep(2.0)

        # Warm the engine first (its first forwards are slow), so the race window is all steady state.
        await asyncio.gather(*(generate(Run(t, ref, 0, time.monotonic())) for t in keys for ref in (None, NAMES[0])))
        deadline = time.monotonic() + RACE_S
        rng = random.Random(SEED)
        tasks = [chaos(t, random.Random(rng.random())) for t in keys]
        tasks += [streamer(random.Random(rng.random()), base=False) for _ in range(ADAPTER_STREAMS)]
        tasks += [streamer(random.Random(rng.random()), base=True) for _ in range(BASE_STREAMS)]
        await asyncio.gather(*tasks, scraper())
    return ledger


@torch.no_grad()
def forced(hf, adapter: Adapter | None, seqs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[float]]]:
    """Batched `aligner_core.reference.teacher_forced`: right-padded, which causal attention never sees."""
    from aligner_core.reference import attached_adapter

    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
    with attached_adapter(hf, adapter):
        logits = hf(input_ids=ids).logits.float()  # [B, W, V]
    out = []
    for i, (p, c) in enumerate(seqs):
        steps = logits[i, len(p) - 1 : len(p) - 1 + len(c)]
        chosen = torch.log_softmax(steps, dim=-1).gather(1, torch.tensor(c)[:, None])[:, 0]
        out.append((steps.argmax(-1).tolist(), chosen.tolist()))
    return out


def reference_outputs(
    hf, wanted: set[tuple[str | None, int, tuple[int, ...]]], adapters: dict[str, Adapter], prompts: list[list[int]]
) -> dict:
    """(adapter sha or None, prompt, tokens) -> the reference's (greedy tokens, logprobs) over those tokens."""
    by_sha: dict[str | None, list[tuple[int, tuple[int, ...]]]] = {}
    for sha, prompt, tokens in wanted:
        by_sha.setdefault(sha, []).append((prompt, tokens))
    out = {}
    for sha, items in by_sha.items():
        got = forced(hf, adapters[sha] if sha else None, [(prompts[p], list(t)) for p, t in items])
        out.update({(sha, p, t): g for (p, t), g in zip(items, got)})
    return out


def matches(ref: tuple[list[int], list[float]], run: Run) -> bool:
    greedy, lps = ref
    return greedy == run.tokens and max(abs(a - b) for a, b in zip(lps, run.logprobs)) < LOGPROB_TOLERANCE


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """On a shared 2-core machine, two OpenMP threads made the reference 10x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def explain(hf, run: Run, ledger: Ledger, prompts: list[list[int]]) -> str:
    """What a run that matched no candidate does match: every version of the race, and base."""
    seqs = [(prompts[run.prompt], run.tokens)]
    rows = []
    for v in [None, *ledger.versions]:
        greedy, lps = forced(hf, v.adapter if v else None, seqs)[0]
        agree = next((i for i, (g, t) in enumerate(zip(greedy, run.tokens)) if g != t), len(run.tokens))
        diff = max(abs(a - b) for a, b in zip(lps, run.logprobs))
        label = (
            "base"
            if v is None
            else f"{v.tenant}/{v.name}@{v.number} (sent {v.sent:.2f}, newest until "
            f"{v.newest_until:.2f}, gone {v.gone_at:.2f})"
        )
        rows.append((diff, f"  {label}: greedy agrees for {agree}/{len(run.tokens)}, max |dlogprob| {diff:.2e}"))
    cands = [v.number for v in ledger.candidates(run)]
    head = (
        f"{run.tenant} {run.ref} prompt {run.prompt}, sent {run.sent:.2f} answered {run.answered:.2f} "
        f"finished {run.finished:.2f}, candidates {cands}; closest:"
    )
    return "\n".join([head] + [line for _, line in sorted(rows)[:3]])


def most_in_flight(spans: list[tuple[float, float, str]]) -> int:
    """The most distinct adapters that requests held at one moment (from the client's side)."""
    return max((len({k for s, e, k in spans if s <= t < e}) for t, _, _ in spans), default=0)


def test_no_request_that_names_an_adapter_runs_a_token_without_it(server) -> None:
    from transformers import AutoTokenizer

    from aligner_core.reference import load_hf_model

    started = time.monotonic()
    pm = real_model()
    tokenizer = AutoTokenizer.from_pretrained(pm.path)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    ledger = asyncio.run(run_race(server, pm.spec, prompts))
    race_s = time.monotonic() - started
    ledger.dump(server.log.with_name("ledger.json"))
    admin = {"authorization": f"Bearer {ADMIN}"}
    deadline = time.monotonic() + 10
    while True:  # the last streams release their leases in the background, just after their last chunk
        m = scrape(httpx.get(server.base + "/metrics", headers=admin, timeout=30).text)
        if m.get("aligner_adapter_requests_in_flight") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    server.stop()  # frees the cores for the reference
    log = server.log.read_text(errors="replace")

    # Every completed run against the reference, under each version it may have used and under base.
    hf = load_hf_model(str(pm.path))
    adapters = {v.adapter.sha256(): v.adapter for v in ledger.versions}
    done = [r for r in ledger.runs if r.outcome == "ok"]
    assert all(len(r.tokens) == len(r.logprobs) == MAX_TOKENS for r in done)
    wanted = {(None, r.prompt, tuple(r.tokens)) for r in done}
    wanted |= {(v.adapter.sha256(), r.prompt, tuple(r.tokens)) for r in done if r.ref for v in ledger.candidates(r)}
    with one_torch_thread():
        ref = reference_outputs(hf, wanted, adapters, prompts)
    check_s = time.monotonic() - started - race_s
    base_runs, adapter_runs = [r for r in done if r.ref is None], [r for r in done if r.ref]
    base_tokens = {r.prompt: r.tokens for r in base_runs}
    spans, stale, swapped, separation, unmatched = [], 0, 0, [], []
    for r in adapter_runs:
        seq = (r.prompt, tuple(r.tokens))
        hits = [v for v in ledger.candidates(r) if matches(ref[(v.adapter.sha256(), *seq)], r)]
        # exactly one version, and one that base cannot pass for: other tokens, logprobs far apart
        sep = (
            [abs(a - b) for a, b in zip(ref[(hits[0].adapter.sha256(), *seq)][1], ref[(None, *seq)][1])]
            if hits
            else [0]
        )
        if len(hits) != 1 or r.tokens == base_tokens.get(r.prompt) or max(sep) < 10 * LOGPROB_TOLERANCE:
            unmatched.append(r)
            continue
        v = hits[0]
        spans.append((r.answered, r.finished, v.adapter.sha256()))
        stale += v.newest_until < r.sent and "@" not in r.ref  # served by a name the feed had not yet updated
        swapped += r.sent < v.newest_until < r.finished  # overwritten or deleted while it streamed
        separation += sep
    separated = float(np.mean(np.array(separation) > LOGPROB_TOLERANCE)) if separation else 0.0
    outcomes = Counter(r.outcome for r in ledger.runs)
    figures = dict(
        seconds=round(time.monotonic() - started, 1),
        race_seconds=round(race_s, 1),
        check_seconds=round(check_s, 1),
        requests=len(ledger.runs),
        by_outcome=dict(outcomes),
        adapter_requests_checked=len(adapter_runs),
        base_controls_checked=len(base_runs),
        tokens_checked=MAX_TOKENS * len(done),
        pinned_old_versions=sum("@" in r.ref for r in adapter_runs),
        versions=len(ledger.versions),
        ops=dict(ledger.ops),
        engine_loads=m.get("aligner_adapter_loads_total"),
        engine_evictions=m.get("aligner_adapter_evictions_total"),
        most_adapters_in_flight=most_in_flight(spans),
        swapped_while_streaming=swapped,
        served_within_feed_grace=stale,
        tokens_separated_from_base=round(separated, 4),
        median_separation=round(float(np.median(separation or [0])), 3),
        unknown_rows=m.get("aligner_adapter_rows_unknown_total"),
        in_flight_after=m.get("aligner_adapter_requests_in_flight"),
    )
    where = f"\nfigures: {figures}\nledger: {server.log.with_name('ledger.json')}"
    if unmatched:
        with one_torch_thread():
            why = "\n".join(explain(hf, r, ledger, prompts) for r in unmatched[:3])
        pytest.fail(
            f"{len(unmatched)} of {len(adapter_runs)} runs match no version they could have used:\n{why}{where}"
        )
    wrong = [r for r in base_runs if not matches(ref[(None, r.prompt, tuple(r.tokens))], r)]
    assert not wrong, f"base controls differ from the reference: {wrong[:3]}" + where
    assert not ledger.failures, "\n".join(ledger.failures[:20]) + where + "\n" + log[-4000:]
    assert "aligner_adapter_rows_unknown_total" in m, "the workers' unknown-key counter is not exported"
    assert m["aligner_adapter_rows_unknown_total"] == 0 and "unknown adapter key" not in log, log[-4000:]
    assert m["aligner_adapter_requests_in_flight"] == 0, where
    assert "Traceback" not in log, (
        "a traceback in the server log:\n" + log[log.index("Traceback") - 300 :][:6000] + where
    )
    assert ledger.ops["overwrite"] and ledger.ops["delete"] and swapped, "no version changed under a stream" + where
    assert m.get("aligner_adapter_evictions_total", 0) > 0, "the race never evicted an adapter" + where
    assert most_in_flight(spans) > 2, (
        "never more adapters in flight than hot slots: the cold tier was not raced" + where
    )
    record("never_base", **figures)
