"""The server's JSON against OpenAI's own schemas (tests/fixtures/openai-openapi, spec 2.3.0): chat, chat
chunks, completions, models and errors, on the base model and on an adapter, as strict clients read them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from support import real_model, serve

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server


def json_schema(node: object) -> object:
    """OpenAPI 3.0's `nullable: true` (which the spec still mixes with 3.1's null types) as JSON Schema."""
    if isinstance(node, list):
        return [json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items() if k != "nullable"}
    if not node.get("nullable"):
        return out
    if "$ref" in out or "type" not in out:
        return {"anyOf": [out, {"type": "null"}]}
    out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


SPEC = json_schema(json.loads((Path(__file__).parent / "fixtures/openai-openapi/schemas-subset.json").read_text()))
# The spec gives completions' stream chunks no schema of their own (the response's); OpenAI's API streams
# `finish_reason: null` until the last chunk, as the chat chunks' schema says, so the chunks' copy allows it.
_chunk = json.loads(json.dumps(SPEC["components"]["schemas"]["CreateCompletionResponse"]))
_reason = _chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
_reason["type"], _reason["enum"] = ["string", "null"], [*_reason["enum"], None]
SPEC["components"]["schemas"]["CreateCompletionStreamResponse"] = _chunk
REGISTRY = Registry().with_resource("urn:openai", Resource.from_contents(SPEC, default_specification=DRAFT202012))


def violations(obj: object, schema: str) -> list[str]:
    """Every place `obj` breaks OpenAI's `schema` (its JSON path and the reason)."""
    validator = Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{schema}"}, registry=REGISTRY)
    return [f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(obj)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("schema"))


@pytest.fixture(scope="module")
def adapter(server) -> str:
    data = encode(Adapter.random(real_model().spec, tokens=1, seed=7, gate_scale=0.08))
    r = httpx.post(server.base + "/v1/adapters", files={"file": ("a.safetensors", data)}, data={"name": "sch"})
    assert r.status_code == 201, r.text
    return "sch"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base + path, json=body, timeout=120)


def stream(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base + path, json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"prompt": "The sky is", "max_tokens": 6, "temperature": 0}


@pytest.mark.parametrize("on", ["base", "adapter", "model=adapter"])
def test_chat_and_completions_match_the_schemas_and_echo_the_model(server, adapter, on) -> None:
    base = real_model().spec.identity
    named = {
        "base": {"model": base},
        "adapter": {"model": base, "adapter": adapter},
        "model=adapter": {"model": adapter},
    }[on]
    echoed = base if on == "base" else adapter
    cases = [
        ("/v1/chat/completions", CHAT, "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
        (
            "/v1/chat/completions",
            CHAT | {"logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 1, "seed": 1},
            "CreateChatCompletionResponse",
            "CreateChatCompletionStreamResponse",
        ),
        ("/v1/completions", COMPLETION, "CreateCompletionResponse", "CreateCompletionStreamResponse"),
        ("/v1/completions", COMPLETION | {"logprobs": 2}, "CreateCompletionResponse", "CreateCompletionStreamResponse"),
    ]
    found = {}
    for path, body, schema, chunk_schema in cases:
        r = post(server, path, body | named)
        assert r.status_code == 200, r.text
        found[f"{path} {sorted(body)}"] = violations(r.json(), schema)
        assert r.json()["model"] == echoed
        chunks = stream(server, path, body | named | {"stream_options": {"include_usage": True}})
        found[f"{path} {sorted(body)} stream"] = sorted({v for c in chunks for v in violations(c, chunk_schema)})
        assert {c["model"] for c in chunks} == {echoed}
    assert not any(found.values()), json.dumps(found, indent=1)


def test_models_and_errors_match_the_schemas(server, adapter) -> None:
    listed = httpx.get(server.base + "/v1/models").json()
    assert not violations(listed, "ListModelsResponse")
    for model in (real_model().spec.identity, adapter):
        r = httpx.get(server.base + f"/v1/models/{model}")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == model and not violations(r.json(), "Model")
    errors = [
        httpx.get(server.base + "/v1/models/nope"),
        post(server, "/v1/chat/completions", CHAT | {"model": "nope"}),
        post(server, "/v1/chat/completions", CHAT | {"model": real_model().spec.identity, "max_tokens": -1}),
        httpx.get(server.base + "/v1/nothing-here"),
    ]
    for r in errors:
        assert 400 <= r.status_code < 500 and not violations(r.json(), "ErrorResponse"), r.text


def test_tokenize_detokenize_and_version(server, adapter) -> None:
    """vLLM's routes, behind the same adapter check as generation: an adapter changes no token."""
    base = real_model().spec.identity
    tokens = post(server, "/tokenize", {"model": base, "prompt": "The sky is blue"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 1024, tokens
    assert post(server, "/tokenize", {"model": adapter, "prompt": "The sky is blue"}).json() == tokens
    assert post(server, "/tokenize", {"model": base, "adapter": adapter, "prompt": "The sky is blue"}).json() == tokens
    chat = post(server, "/tokenize", {"model": base, "messages": CHAT["messages"], "add_generation_prompt": True})
    assert chat.status_code == 200 and chat.json()["count"] > tokens["count"], chat.text
    text = post(server, "/detokenize", {"model": base, "tokens": tokens["tokens"]})
    assert text.status_code == 200 and text.json() == {"prompt": "The sky is blue"}, text.text
    missing = post(server, "/tokenize", {"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", missing.text
    missing = post(server, "/detokenize", {"model": base, "adapter": "nope", "tokens": [1]})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found", missing.text
    version = httpx.get(server.base + "/version").json()
    assert version["version"] == "0.32.0" and version["aligner_serve"], version


def test_responses_api_runs_the_adapter_exactly_as_chat(server) -> None:
    """/v1/responses (through the real openai client too) gives the tokens of the equivalent chat request, on
    the base model and on an adapter (by `adapter` and by `model`), streaming or not, and echoes the model."""
    import openai

    data = encode(Adapter.random(real_model().spec, tokens=2, seed=11, gate_scale=1.0))
    r = httpx.post(server.base + "/v1/adapters", files={"file": ("s.safetensors", data)}, data={"name": "strong"})
    assert r.status_code == 201, r.text
    base, question = real_model().spec.identity, "What is the capital of France?"
    chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0}
    asked = {"input": question, "max_output_tokens": 12, "temperature": 0}
    texts = {}
    for label, named in {"base": {"model": base}, "adapter": {"model": base, "adapter": "strong"}}.items():
        want = post(server, "/v1/chat/completions", chat | named).json()["choices"][0]["message"]["content"]
        got = post(server, "/v1/responses", asked | named)
        assert got.status_code == 200, got.text
        answer = got.json()
        assert answer["model"] == named.get("adapter", base) and answer["status"] in ("completed", "incomplete"), answer
        assert answer["output"][-1]["content"][0]["text"] == want, (label, answer, want)
        assert answer["usage"]["output_tokens"] > 0
        with httpx.stream(
            "POST", server.base + "/v1/responses", json=asked | named | {"stream": True}, timeout=120
        ) as s:
            assert s.status_code == 200
            events = [json.loads(line[len("data: ") :]) for line in s.iter_lines() if line.startswith("data: ")]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas == want and events[-1]["type"] in ("response.completed", "response.incomplete"), (
            label,
            events[-1],
        )
        assert events[-1]["response"]["model"] == named.get("adapter", base)
        texts[label] = want
    assert texts["adapter"] != texts["base"], texts  # the adapter changed the answer, on both routes alike
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="open-mode")
    out = client.responses.create(model="strong", input=question, max_output_tokens=12, temperature=0)
    assert out.output_text == texts["adapter"] and out.model == "strong"
    refused = post(server, "/v1/responses", asked | {"model": base, "previous_response_id": "resp_x"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "previous_response_id", refused.text
    missing = post(server, "/v1/responses", asked | {"model": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found", missing.text
