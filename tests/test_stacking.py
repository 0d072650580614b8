"""Adapter strength and stacking (issue 18): the engine's routing lanes and scaled entries against the
reference sum, the HF reference's stack, and the whole thing through a real server with the openai client.

The stacked term of a token is the sum over its request's adapters of scale_i * gate_i * softmax(q K_i^T /
sqrt(D)) V_i, each adapter with its own softmax and start layer. Here the reference computes each adapter's
plain term (`reference_term`, independent of the table) and scales it afterwards, so neither the gate scaling
of the table's entries nor the lanes can agree with it by construction."""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import openai
import pytest
import torch
from support import linear_layers, parity, real_model, serve, tiny_llama, tiny_spec

from aligner_core.adapter_format import Adapter, encode
from aligner_core.reference import attached_adapter, attached_stack
from server.engine import op
from server.engine.config import scaled_key, stack_key
from server.engine.op import WorkerState
from server.engine.routing import Routing
from server.engine.table import AdapterTable, TableShape, reference_term

SPEC = tiny_spec()  # hidden 64, 4 layers, 4 heads, 2 kv heads, head_dim 16
H, D = SPEC.num_heads, SPEC.head_dim
ADAPTERS = {
    "a": Adapter.random(SPEC, tokens=1, start_layer=1, seed=1, gate_scale=0.5),
    "b": Adapter.random(SPEC, tokens=3, start_layer=0, gate_activation="tanh", seed=2, gate_scale=0.9),
    "c": Adapter.random(SPEC, tokens=1, start_layer=0, gate_activation="tanh", seed=3, gate_scale=0.7),
    "d": Adapter.random(SPEC, tokens=4, start_layer=2, seed=4, gate_scale=0.5),
}
Stack = list[tuple[str, float]]
# one batch: a plain adapter, a scaled one, stacks of 2, 3 and 4 (a repeat, a negative scale), none
ROWS: list[Stack] = [
    [("a", 1.0)],
    [("b", 0.5), ("c", 1.0)],
    [],
    [("d", -1.0), ("a", 2.0), ("b", 1.0)],
    [("a", 0.25)],
    [("c", 1.0), ("c", 1.0), ("d", 3.5), ("b", -0.3)],
]
TOKENS = [3, 2, 4, 1, 5, 2]  # per row: prefill chunks and decodes in one forward


def make_state(layers, kernel: str, *, lanes: int = 4, cold: bool = False) -> WorkerState:
    shape = TableShape.unsharded(
        SPEC, max_slots=2 if cold else 16, max_tokens=4, cold_slots=16 if cold else 0, scratch=32 if cold else 0
    )
    table = AdapterTable(shape, layers, device=torch.device("cpu"), dtype=torch.float32)
    return WorkerState(table=table, routing=Routing(8, lanes=lanes), scale=1 / math.sqrt(D), kernel=kernel)


def load_rows(st: WorkerState, rows: list[Stack]) -> None:
    """Each stack entry resident under its engine key, as the facade loads them; each row assigned its stack."""
    for stack in rows:
        for name, scale in stack:
            st.load(scaled_key(name, scale), ADAPTERS[name], scale)
    for row, stack in enumerate(rows):
        st.assign(row, stack_key([scaled_key(n, s) for n, s in stack]) if stack else None)


def stacked_reference(layers, layer: int, q: torch.Tensor, token_stacks: list[Stack]) -> torch.Tensor:
    """[T, H*D]: per token, the sum of its stack's plain terms, each times its scale."""
    out = torch.zeros(q.shape[0], H * D)
    for lane in range(max(len(s) for s in token_stacks)):
        entries = [s[lane] if lane < len(s) else None for s in token_stacks]
        plain = reference_term(layers[layer], q, [ADAPTERS[e[0]] if e else None for e in entries], D)
        out += plain * torch.tensor([e[1] if e else 0.0 for e in entries])[:, None]
    return out


def forward(st: WorkerState, q: torch.Tensor) -> list[torch.Tensor]:
    """The op at every layer of one forward (V2-style routing: set_batch before it); each layer's added term."""
    outs = [torch.zeros(q.shape[0], H * D) for _ in range(SPEC.num_layers)]
    op.set_worker_state(st)
    try:
        for layer, out in enumerate(outs):
            op.apply_term(out, q, layer)
    finally:
        op.set_worker_state(None)
    return outs


@pytest.mark.parametrize("cold", [False, True], ids=["hot", "cold-tier"])
@pytest.mark.parametrize("kernel", ["torch", "cpu"])
def test_a_mixed_batch_of_plain_scaled_and_stacked_rows_matches_the_reference(kernel: str, cold: bool) -> None:
    torch.manual_seed(0)
    layers = linear_layers(SPEC)
    st = make_state(layers, kernel, cold=cold)
    load_rows(st, ROWS)
    qsl = np.concatenate([[0], np.cumsum(TOKENS)])
    st.set_batch(np.arange(len(ROWS)), qsl)
    torch.manual_seed(1)
    q = torch.randn(int(qsl[-1]), H * D)
    got = forward(st, q)
    token_stacks = [stack for stack, n in zip(ROWS, TOKENS) for _ in range(n)]
    for layer in range(SPEC.num_layers):
        want = stacked_reference(layers, layer, q, token_stacks)
        torch.testing.assert_close(got[layer], want, atol=3e-5, rtol=1e-4, msg=f"{kernel}, layer {layer}")
    base_tokens = [t for t, s in enumerate(token_stacks) if not s]
    assert all(torch.equal(g[base_tokens], torch.zeros(len(base_tokens), H * D)) for g in got)  # exactly nothing
    assert len(st.plan(len(q))) == 4  # one plan per lane in use
    if cold:
        assert st.table.staged > 0  # the stacks' cold adapters were staged, all lanes together


@pytest.mark.parametrize("kernel", ["torch", "cpu"])
def test_scale_one_is_the_plain_adapter_and_scale_zero_adds_nothing(kernel: str) -> None:
    torch.manual_seed(0)
    layers = linear_layers(SPEC)
    st = make_state(layers, kernel)
    st.load("b", ADAPTERS["b"])
    st.load(scaled_key("b", 0.0), ADAPTERS["b"], 0.0)
    assert scaled_key("b", 1.0) == "b"  # a 1-stack at scale 1 is the plain adapter's own entry
    st.assign(0, "b")
    st.assign(1, stack_key(["b"]))
    st.assign(2, scaled_key("b", 0.0))
    st.set_batch(np.arange(3), np.array([0, 2, 4, 6]))
    torch.manual_seed(1)
    q = torch.randn(2, H * D).repeat(3, 1)  # the same two tokens in each row
    for out in forward(st, q):
        assert torch.equal(out[0:2], out[2:4])
        assert torch.equal(out[4:6], torch.zeros(2, H * D))


def test_a_stack_with_an_unknown_adapter_runs_none_of_it() -> None:
    """Never a part of a stack: one key the table lacks (or a stack deeper than the lanes) routes the whole
    row to the base model, and is counted as an unknown row (the metric that must stay 0)."""
    torch.manual_seed(0)
    st = make_state(linear_layers(SPEC), "torch", lanes=2)
    st.load("a", ADAPTERS["a"])
    st.load("b", ADAPTERS["b"])
    assert st.assign(0, stack_key(["a", "missing"])) == 0
    assert st.assign(1, stack_key(["a", "b", "a"])) == 0  # 3 adapters, 2 lanes
    assert st.routing.row_slots(0) == [] and st.routing.row_slots(1) == []
    assert st.counters()["unknown_key_events"] == 2
    assert st.assign(2, stack_key(["a", "b"])) > 0
    assert len(st.routing.row_slots(2)) == 2


def test_rows_move_and_swap_with_all_their_lanes() -> None:
    r = Routing(4, lanes=3)
    r.set_row(0, [1, 2, 3])
    r.set_row(1, 4)
    r.move(0, 1, swap=True)
    assert r.row_slots(1) == [1, 2, 3] and r.row_slots(0) == [4]
    r.move(1, 3, swap=False)
    assert r.row_slots(3) == [1, 2, 3] and r.row_slots(1) == []
    r.set_row(6, [5, 6])  # past the rows it was made with: grows
    assert r.slots_in_use() == {1, 2, 3, 4, 5, 6}
    with pytest.raises(ValueError, match="lanes"):
        r.set_row(0, [1, 2, 3, 4])


def test_the_table_refuses_a_scale_that_is_not_finite() -> None:
    torch.manual_seed(0)
    st = make_state(linear_layers(SPEC), "torch")
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            st.load(scaled_key("a", bad), ADAPTERS["a"], bad)


# ---- the HF reference ----


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _logits(model, ids, ctx):
    with torch.no_grad(), ctx:
        return model(input_ids=ids).logits


def test_the_reference_stack_of_one_at_scale_one_is_the_adapter_and_scale_zero_the_base(tiny) -> None:
    model, spec = tiny
    ids = torch.randint(0, 128, (2, 9))
    a = Adapter.random(spec, tokens=3, start_layer=1, gate_activation="tanh", seed=5, gate_scale=0.8)
    plain = _logits(model, ids, attached_adapter(model, a))
    assert torch.equal(_logits(model, ids, attached_stack(model, [(a, 1.0)])), plain)
    base = _logits(model, ids, attached_adapter(model, None))
    assert torch.equal(_logits(model, ids, attached_stack(model, [(a, 0.0)])), base)
    assert torch.equal(_logits(model, ids, attached_stack(model, [])), base)
    assert not torch.allclose(plain, base)


def test_the_reference_stack_sums_separate_softmaxes(tiny) -> None:
    """Two adapters stacked are not one adapter with both prefixes (one softmax over all their tokens): the
    difference is visible in one layer's term; and the second adapter of a stack changes the forward."""
    from aligner_core.reference import layer_term

    model, spec = tiny
    a = Adapter.random(spec, tokens=2, start_layer=0, seed=6, gate_scale=0.9)
    b = Adapter.random(spec, tokens=3, start_layer=0, seed=7, gate_scale=0.9)
    attn = model.model.layers[0].self_attn
    torch.manual_seed(2)
    q = torch.randn(1, spec.num_heads, 5, spec.head_dim)
    ga, gb = a.gate_values()[0], b.gate_values()[0]
    stacked = 0.5 * layer_term(q, a.prefix, ga, attn) + 2.0 * layer_term(q, b.prefix, gb, attn)
    joint = layer_term(q, torch.cat([a.prefix, b.prefix]), 0.5 * ga + 2.0 * gb, attn)
    assert not torch.allclose(stacked, joint, atol=1e-4)
    ids = torch.randint(0, 128, (1, 7))
    two = _logits(model, ids, attached_stack(model, [(a, 0.5), (b, 2.0)]))
    assert not torch.allclose(two, _logits(model, ids, attached_stack(model, [(a, 0.5)])))
    assert torch.isfinite(two).all()


# ---- through a real server, with the openai client ----


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("stacking"), {"ALIGNER_MAX_RESIDENT_ADAPTERS": "16"})


@pytest.fixture(scope="module")
def hf():
    from aligner_core.reference import load_hf_model

    return load_hf_model(str(real_model().path))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model().path)


@pytest.fixture(scope="module")
def served(server) -> dict[str, Adapter]:
    """Three one-token adapters (start layers 0, 4, 10; both activations), strong enough to change tokens."""
    spec = real_model().spec
    made = {
        "p": Adapter.random(spec, tokens=1, start_layer=0, seed=601, gate_scale=0.5),
        "q": Adapter.random(spec, tokens=2, start_layer=4, gate_activation="tanh", seed=602, gate_scale=0.6),
        "r": Adapter.random(spec, tokens=1, start_layer=10, seed=603, gate_scale=0.7),
    }
    for name, a in made.items():
        r = httpx.post(
            server.base + "/v1/adapters", files={"file": ("a.safetensors", encode(a))}, data={"name": name}, timeout=60
        )
        assert r.status_code == 201, r.text
    return made


def _complete(server, prompt: list[int], **extra):
    """Greedy completion with token ids and logprobs (what `parity` needs), through the openai client."""
    from support import Generation

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(
        model=real_model().spec.identity,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True} | extra,
    )
    lp = r.choices[0].logprobs
    return Generation(prompt, [int(t.removeprefix("token_id:")) for t in lp.tokens], lp.token_logprobs)


@pytest.mark.server
def test_scale_zero_is_the_base_model_and_a_stack_of_one_the_plain_adapter(server, served, tokenizer) -> None:
    prompt = tokenizer("The three best things about autumn are")["input_ids"]
    base = _complete(server, prompt)
    plain = _complete(server, prompt, adapter="p")
    assert plain.tokens != base.tokens  # the adapter changes the answer, so the equalities below prove something
    assert _complete(server, prompt, adapters=[{"name": "p", "scale": 0}]).tokens == base.tokens
    assert _complete(server, prompt, adapters=[{"name": "p", "scale": 0.0}, {"name": "q", "scale": 0}]).tokens == (
        base.tokens
    )
    assert _complete(server, prompt, adapters=[{"name": "p"}]).tokens == plain.tokens
    assert _complete(server, prompt, adapters=[{"name": "p@1", "scale": 1.0}]).tokens == plain.tokens
    assert _complete(server, prompt, adapters=[{"name": "p", "scale": 1}, {"name": "q", "scale": 0}]).tokens == (
        plain.tokens
    )
    inline = base64.b64encode(encode(served["p"])).decode()
    assert _complete(server, prompt, adapters=[{"inline": inline}]).tokens == plain.tokens


@pytest.mark.server
def test_a_concurrent_mixed_batch_matches_the_reference(server, served, hf, tokenizer) -> None:
    """Plain, scaled, stacked (2 and 3, a negative scale, a repeat), inline and base requests at once, each
    against the HF reference's stack."""
    from concurrent.futures import ThreadPoolExecutor

    inline_q = base64.b64encode(encode(served["q"])).decode()
    cases: list[tuple[dict, list[tuple[str, float]]]] = [
        ({}, []),
        ({"adapter": "p"}, [("p", 1.0)]),
        ({"adapters": [{"name": "q", "scale": 0.5}]}, [("q", 0.5)]),
        ({"adapters": [{"name": "p"}, {"name": "r", "scale": 1.5}]}, [("p", 1.0), ("r", 1.5)]),
        (
            {"adapters": [{"name": "r", "scale": -1}, {"inline": inline_q}, {"name": "p", "scale": 0.3}]},
            [
                ("r", -1.0),
                ("q", 1.0),
                ("p", 0.3),
            ],
        ),
        ({"adapters": [{"name": "q", "scale": 2}, {"name": "q", "scale": 2}]}, [("q", 2.0), ("q", 2.0)]),
        ({"adapters": [{"inline": inline_q, "scale": 0.75}]}, [("q", 0.75)]),
    ]
    texts = ["Once upon a time", "The recipe for bread is", "My favourite planet is", "In the year 2050,"]
    jobs = [(tokenizer(texts[i % len(texts)])["input_ids"], body, stack) for i, (body, stack) in enumerate(cases)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        gens = list(pool.map(lambda j: _complete(server, j[0], **j[1]), jobs))
    for (_, body, stack), gen in zip(jobs, gens):
        p = parity(hf, [(served[n], s) for n, s in stack], gen)
        assert p.matched == p.total, f"{body}: diverged from the reference at token {p.matched}"
    assert len({tuple(g.tokens) for g in gens}) >= 5  # the compositions really differ


def _post(server, body: dict) -> httpx.Response:
    chat = {"model": real_model().spec.identity, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    return httpx.post(server.base + "/v1/chat/completions", json=chat | body, timeout=60)


@pytest.mark.server
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"adapters": [{"name": "p", "scale": 4.5}]}, 400, "adapters[0].scale"),
        ({"adapters": [{"name": "p"}, {"name": "q", "scale": -2.01}]}, 400, "adapters[1].scale"),
        ({"adapters": [{"name": "p", "scale": "NaN"}]}, 400, "adapters[0].scale"),
        ({"adapters": [{"name": "p", "scale": "0.5"}]}, None, None),  # pydantic's lax float: a numeric string
        ({"adapters": [{"name": "p"}] * 5}, 400, "adapters"),
        ({"adapters": [{"name": "p", "inline": "AAAA"}]}, 400, "adapters[0]"),
        ({"adapters": [{"scale": 1}]}, 400, "adapters[0]"),
        ({"adapters": [{"name": "p", "weight": 1}]}, 400, "adapters[0].weight"),
        ({"adapters": [{"name": "p"}, {"name": "nope"}]}, 404, "adapters[1].name"),
        ({"adapters": [{"name": "bad name"}]}, 400, "adapters[0].name"),
        ({"adapters": [{"inline": "not base64!"}]}, 400, "adapters[0].inline"),
        ({"adapters": [{"inline": base64.b64encode(b"x" * 40).decode()}]}, 422, "adapters[0].inline"),
        ({"adapters": [{"name": "p"}], "adapter": "q"}, 400, "adapters"),
        ({"adapters": [{"name": "p"}], "model": "q"}, 400, "model"),
        ({"adapters": "p"}, 400, "adapters"),
    ],
)
def test_bad_stacks_are_clear_errors_naming_the_entry(server, served, body, status, param) -> None:
    r = _post(server, body)
    if status is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


@pytest.mark.server
def test_an_inline_adapter_for_another_model_is_refused_like_an_upload(server) -> None:
    other = Adapter.random(tiny_spec(), tokens=1, start_layer=0, seed=1)
    r = _post(server, {"adapters": [{"inline": base64.b64encode(encode(other)).decode()}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "adapters[0].inline"
    assert r.json()["error"]["code"] in ("base_model_mismatch", "invalid_adapter")


@pytest.mark.server
def test_the_metrics_count_requests_by_stack_depth_without_names(server, served) -> None:
    before = httpx.get(server.base + "/metrics").text
    assert _post(server, {"adapters": [{"name": "p"}, {"name": "q"}, {"name": "r", "scale": 0.5}]}).status_code == 200
    after = httpx.get(server.base + "/metrics").text

    def count(text: str) -> float:
        line = [ln for ln in text.splitlines() if ln.startswith('aligner_requests_by_adapters_total{adapters="3"}')]
        return float(line[0].rsplit(" ", 1)[1]) if line else 0.0

    assert count(after) == count(before) + 1
    assert not any('"p"' in ln or "name=" in ln for ln in after.splitlines() if "by_adapters" in ln)


def test_an_inline_adapter_is_keyed_by_its_content_and_the_tenant() -> None:
    from server.stacking import inline_key

    sha = "ab" * 32
    assert inline_key("t1", sha) == inline_key("t1", sha)
    assert inline_key("t1", sha) != inline_key("t2", sha)  # never another tenant's entry (nor its load time)
    assert inline_key("t1", sha) not in (sha, inline_key("t1", "cd" * 32))
    assert set(inline_key("t1", sha)) <= set("0123456789abcdef")  # no stack or scale separator


@pytest.mark.server
def test_the_prefix_cache_is_salted_by_the_whole_composition(server, served, hf, tokenizer) -> None:
    """One long prompt under compositions that share their first adapter: each fills the cache first, and each
    next one still equals its own reference (a salt of the first adapter alone would reuse its KV blocks)."""
    text = " ".join(f"Item {i} is the number {i} written as {i * 7}." for i in range(60))
    prompt = tokenizer(text)["input_ids"][:600]
    order: list[tuple[dict, list[tuple[str, float]]]] = [
        ({"adapter": "p"}, [("p", 1.0)]),
        ({"adapters": [{"name": "p"}, {"name": "q"}]}, [("p", 1.0), ("q", 1.0)]),
        ({"adapters": [{"name": "p", "scale": 0.5}]}, [("p", 0.5)]),
        ({"adapters": [{"name": "p"}, {"name": "q", "scale": 2}]}, [("p", 1.0), ("q", 2.0)]),
        ({"adapters": [{"name": "p"}, {"name": "q"}]}, [("p", 1.0), ("q", 1.0)]),  # its own blocks: a hit
    ]
    for body, stack in order:
        gen = _complete(server, prompt, **body)
        p = parity(hf, [(served[n], s) for n, s in stack], gen)
        assert p.matched == p.total, f"{body}: diverged at {p.matched} after another composition filled the cache"


@pytest.mark.server
def test_the_responses_api_takes_a_stack_too(server, served) -> None:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)

    def text(**extra) -> str:
        r = client.responses.create(
            model=real_model().spec.identity,
            input="Name a colour.",
            max_output_tokens=12,
            temperature=0,
            extra_body=extra,
        )
        return r.output_text

    base, plain = text(), text(adapter="p")
    assert plain != base
    assert text(adapters=[{"name": "p", "scale": 0}]) == base
    assert text(adapters=[{"name": "p"}]) == plain
