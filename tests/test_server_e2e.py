"""End to end: `aligner serve` as a real process, adapters over HTTP, chat through the official openai client."""

from __future__ import annotations

import math
import pickle

import httpx
import openai
import pytest
import torch
from safetensors.torch import save as st_save
from support import quick_train, real_model, serve

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def spec():
    return real_model().spec


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="open-mode-needs-no-key")


def upload(server, name: str, data: bytes, filename: str = "adapter.safetensors") -> httpx.Response:
    return httpx.post(server.base + "/v1/adapters", files={"file": (filename, data)}, data={"name": name}, timeout=30)


def chat(client, adapter: str | None = None, **kw) -> str:
    extra = kw.pop("extra_body", None) or {}
    if adapter:
        extra["adapter"] = adapter
    out = client.chat.completions.create(
        model=kw.pop("model", None) or base_id(client),
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        extra_body=extra or None,
        **kw,
    )
    return out.choices[0].message.content


def stream_chunks(client, model: str, adapter: str, **kw) -> list:
    """Every chunk of a streamed, greedy chat completion of QUESTION through `adapter`."""
    greedy = dict(model=model, messages=QUESTION, temperature=0, extra_body={"adapter": adapter})
    return list(client.chat.completions.create(**greedy, stream=True, **kw))


def base_id(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_base_identity(client, spec) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == spec.identity


def test_upload_then_chat_with_the_openai_client(server, client, spec) -> None:
    a = Adapter.random(spec, tokens=1, seed=3, gate_scale=0.08)
    r = upload(server, "persona", encode(a))
    assert r.status_code == 201, r.text
    body = r.json()
    assert {k: body[k] for k in ("name", "version", "tokens", "params", "sha256", "base_model")} == {
        "name": "persona",
        "version": 1,
        "tokens": 1,
        "params": 828,
        "sha256": a.sha256(),
        "base_model": spec.identity,
    }
    assert body["bytes"] == len(encode(a)) and body["id"] == "persona@1" and body["created_at"]
    base = chat(client)
    assert "Paris" in base
    with_adapter = chat(client, "persona")
    assert with_adapter != base
    chunks = stream_chunks(client, spec.identity, "persona", max_tokens=24)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == with_adapter
    assert all(c.usage is None for c in chunks)  # usage only when the client asks for it
    # tools that can only set `model` may name the adapter there
    assert chat(client, model="persona") == with_adapter
    listed = client.models.list().data
    card = next(m for m in listed if m.id == "persona")
    assert card.parent == spec.identity


def test_streaming_usage_when_asked(client, spec) -> None:
    last = stream_chunks(client, spec.identity, "persona", max_tokens=8, stream_options={"include_usage": True})[-1]
    assert last.usage is not None and last.usage.completion_tokens == 8


def test_completions_endpoint_with_adapter(client, spec) -> None:
    kw = dict(model=spec.identity, prompt="The three primary colours are", max_tokens=12, temperature=0)
    base = client.completions.create(**kw).choices[0].text
    adapted = client.completions.create(**kw, extra_body={"adapter": "persona"}).choices[0].text
    assert base and adapted and base != adapted


def test_versions_and_pinning(server, client, spec) -> None:
    v1 = chat(client, "persona@1")
    r = upload(server, "persona", encode(Adapter.random(spec, tokens=4, seed=9, gate_scale=0.08)))
    assert r.status_code == 201 and r.json()["version"] == 2
    assert chat(client, "persona@1") == v1
    newest = chat(client, "persona")
    assert newest == chat(client, "persona@2") and newest != v1
    versions = httpx.get(server.base + "/v1/adapters/persona/versions").json()["data"]
    assert [v["version"] for v in versions] == [1, 2]


def test_engine_routing_key_cannot_be_injected(server, client, spec) -> None:
    """A client-sent vllm_xargs["aligner"] (an adapter's engine key) is ignored: the request runs as base."""
    key = httpx.get(server.base + "/v1/adapters/persona").json()["sha256"]
    assert chat(client, extra_body={"vllm_xargs": {"aligner": key}}) == chat(client)


def test_unknown_adapter_and_model_are_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "nobody")
    assert e.value.body["code"] == "adapter_not_found" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model="no-such-model")
    assert e.value.body["code"] == "model_not_found"


def _bad_files(spec) -> dict[str, tuple[bytes, int, str]]:
    good = Adapter.random(spec, tokens=1, seed=5)
    meta = good.metadata()
    nan = good.prefix.clone()
    nan[0, 3] = math.nan
    other = Adapter(
        good.prefix, good.gate, good.start_layer, good.gate_activation, good.num_layers, "Llama-2-7b-hf:0123"
    )
    data = encode(good)
    return {
        "wrong_shape": (
            st_save({"prefix": good.prefix, "gate": torch.zeros(27, 9)}, metadata=meta),
            422,
            "invalid_adapter",
        ),
        "nan": (st_save({"prefix": nan, "gate": good.gate}, metadata=meta), 422, "invalid_adapter"),
        "wrong_base": (encode(other), 422, "base_model_mismatch"),
        "pickle": (pickle.dumps({"prefix": good.prefix.tolist()}), 422, "invalid_adapter"),
        "truncated": (data[: len(data) // 2], 422, "invalid_adapter"),
        "oversized": (data + b"\0" * (2 << 20), 413, "file_too_large"),
        "too_many_tokens": (encode(Adapter.random(spec, tokens=17, seed=6)), 422, "invalid_adapter"),
    }


def test_bad_uploads_are_refused_and_change_nothing(server, spec) -> None:
    before = httpx.get(server.base + "/v1/adapters").json()
    for name, (data, status, code) in _bad_files(spec).items():
        r = upload(server, "persona", data)
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}, name
    r = upload(server, "../etc/passwd", encode(Adapter.random(spec, tokens=1)))
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = httpx.post(server.base + "/v1/adapters", data={"name": "x"})
    assert r.status_code == 400 and "file" in r.json()["error"]["message"]
    r = httpx.post(
        server.base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.base + "/v1/adapters").json() == before
    assert httpx.get(server.base + "/health").status_code == 200


def test_delete_then_404(server, client) -> None:
    r = httpx.delete(server.base + "/v1/adapters/persona")
    assert r.status_code == 200 and r.json()["versions"] == [1, 2]
    with pytest.raises(openai.NotFoundError):
        chat(client, "persona")
    r = httpx.get(server.base + "/v1/adapters/persona")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert httpx.delete(server.base + "/v1/adapters/persona").status_code == 404


def test_metrics(server) -> None:
    text = httpx.get(server.base + "/metrics").text
    lines = text.splitlines()
    assert any(
        l.startswith("aligner_requests_total{") and 'kind="adapter"' in l and 'tenant="default"' in l for l in lines
    )
    assert any(l.startswith("aligner_completion_tokens_total{") and 'kind="base"' in l for l in lines)
    loads = next(float(l.split()[-1]) for l in text.splitlines() if l.startswith("aligner_adapter_loads_total"))
    assert loads >= 2
    assert "aligner_adapter_load_seconds_bucket" in text and "aligner_adapters_resident" in text


def test_adapters_survive_a_restart(server, client, spec) -> None:
    r = upload(server, "keeper", encode(Adapter.random(spec, tokens=2, seed=21, gate_scale=0.08)))
    assert r.status_code == 201
    before = chat(client, "keeper")
    server.stop()
    server.start()
    after_client = openai.OpenAI(base_url=server.base + "/v1", api_key="x")
    assert httpx.get(server.base + "/v1/adapters/keeper").json()["version"] == 1
    assert chat(after_client, "keeper") == before


def test_async_openai_client_streaming(server, spec) -> None:
    import asyncio

    async def main() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="x")
        kw = dict(model=spec.identity, messages=QUESTION, max_tokens=16, temperature=0)
        full = (await client.chat.completions.create(**kw)).choices[0].message.content
        parts = []
        async for chunk in await client.chat.completions.create(**kw, stream=True):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
        await client.close()
        return full, "".join(parts)

    full, streamed = asyncio.run(main())
    assert full == streamed and "Paris" in full


def test_plain_http_streaming_ends_with_done(server, spec) -> None:
    body = {"model": spec.identity, "messages": QUESTION, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3


def test_a_freshly_trained_adapter_serves_like_the_reference(server, client, spec, tmp_path) -> None:
    """`aligner train` on the served model (a few steps): the loss falls, and the saved file, uploaded to the
    server, generates what the Hugging Face reference generates with the same file."""
    import json

    from transformers import AutoTokenizer

    from aligner_core.adapter_format import load
    from aligner_core.reference import attached_adapter, load_hf_model

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Arr, matey! " + a + " Arr!"}]}
        for q, a in [
            ("What is the capital of France?", "Paris be the capital of France."),
            ("What colour is the sky?", "The sky be blue, matey."),
            ("Name a fruit.", "An apple be a fine fruit."),
            ("What do bees make?", "Bees be makin' honey."),
        ]
    ]
    data = tmp_path / "pirate.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    out = tmp_path / "fresh.safetensors"
    result = quick_train(data, out, tokens=1, lr=0.05, steps=6)
    losses = [r["loss"] for r in result.history["train"]]
    assert sum(losses[-2:]) / 2 < losses[0], losses

    assert upload(server, "fresh", out.read_bytes()).status_code == 201
    served = chat(client, "fresh")
    pm = real_model()
    tok = AutoTokenizer.from_pretrained(pm.path)
    model = load_hf_model(str(pm.path))
    ids = torch.tensor(
        [tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]
    )
    with torch.no_grad(), attached_adapter(model, load(out)):
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
    reference = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    assert served == reference, (served, reference)
    assert served != chat(client), "six steps should already move the greedy answer"


def test_the_api_process_and_engine_core_stay_off_the_worker_core(server) -> None:
    import os

    import psutil

    everything = os.sched_getaffinity(0)
    if len(everything) < 2:
        pytest.skip("one core: nothing to keep apart")
    tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    workers = [p for p in tree if "Worker" in p.name()]
    assert workers, [p.name() for p in tree]
    worker_cores = set().union(*(p.cpu_affinity() for p in workers))
    assert worker_cores < everything  # vLLM's CPU worker binds itself
    others = [p for p in tree if p not in workers]
    assert any("EngineCore" in p.name() for p in others), [p.name() for p in others]
    for p in others:
        for t in p.threads():
            assert not os.sched_getaffinity(t.id) & worker_cores, (p.name(), t.id)
