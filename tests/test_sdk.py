"""The Python SDK and CLI (`clients/python`, package `aligner_client`).

Unit tests drive the shared core through `httpx.MockTransport` (error map, retries with Retry-After, SSE,
pagination, request building, tensor encoding); contract tests run the SDK and the CLI against the real
server process: one open-mode server and one multi-tenant server with an admin key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

try:
    import aligner_client  # noqa: F401
except ImportError:  # not installed into the venv: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from aligner_client import (
    AdapterNotFoundError,
    AdapterSpec,
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    InvalidAdapterError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)
from aligner_client import _core as core
from aligner_client.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
CLIENT_SRC = REPO / "clients" / "python"

NO_JITTER = RetryPolicy(max_retries=2, jitter=0.0)


def err_body(message: str, code: str | None, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def adapter_json(name: str, version: int = 1, public: bool = False) -> dict:
    return {
        "id": f"{name}@{version}",
        "object": "adapter",
        "name": name,
        "version": version,
        "tokens": 1,
        "params": 828,
        "bytes": 3512,
        "sha256": "ab" * 32,
        "base_model": "base:0123",
        "public": public,
        "created_at": "2025-01-01T00:00:00Z",
    }


class Recorder:
    """A MockTransport handler answering from a list of responses (or exceptions), recording requests."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def mock_client(handler, sleeps: list[float] | None = None, **kw) -> Client:
    sleeps = [] if sleeps is None else sleeps
    kw.setdefault("retry_policy", NO_JITTER)
    return Client("http://srv", "k", transport=httpx.MockTransport(handler), sleep=sleeps.append, **kw)


# --------------------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, None, BadRequestError),
        (401, "invalid_api_key", AuthenticationError),
        (403, "permission_denied", PermissionDeniedError),
        (404, "model_not_found", NotFoundError),
        (404, "not_found", NotFoundError),
        (404, "adapter_not_found", AdapterNotFoundError),
        (409, "conflict", ConflictError),
        (413, "file_too_large", PayloadTooLargeError),
        (422, "invalid_adapter", InvalidAdapterError),
        (422, "base_model_mismatch", InvalidAdapterError),
        (429, "rate_limit_exceeded", RateLimitError),
        (500, "internal_error", InternalServerError),
        (503, "engine_busy", ServiceUnavailableError),
    ],
)
def test_status_and_code_map_to_exceptions(status, code, cls) -> None:
    body = err_body(f"boom {status}", code, param="adapter")
    c = mock_client(Recorder(httpx.Response(status, json=body)), max_retries=0, retry_policy=None)
    with pytest.raises(APIError) as e:
        c.adapters.get("x")
    assert type(e.value) is cls
    assert (e.value.status, e.value.code, e.value.type, e.value.param, e.value.message) == (
        status,
        code,
        "invalid_request_error",
        "adapter",
        f"boom {status}",
    )
    assert str(status) in str(e.value) and e.value.body == body
    if code == "model_not_found":
        assert not isinstance(e.value, AdapterNotFoundError)


def test_unexpected_success_body_is_an_api_error() -> None:
    c = mock_client(Recorder(httpx.Response(200, json={"surprise": True})))
    with pytest.raises(APIError, match="unexpected"):
        c.adapters.get("x")
    with pytest.raises(APIError, match="not JSON"):
        mock_client(Recorder(httpx.Response(200, text="<html>"))).adapters.get("x")


def test_error_without_openai_body_keeps_the_text() -> None:
    c = mock_client(Recorder(httpx.Response(502, text="Bad Gateway from proxy")), max_retries=0, retry_policy=None)
    with pytest.raises(InternalServerError) as e:
        c.models.list()
    assert e.value.status == 502 and e.value.message == "Bad Gateway from proxy" and e.value.code is None


# --------------------------------------------------------------------------------------- retries


def test_retry_after_is_honoured_then_success() -> None:
    rec = Recorder(
        httpx.Response(429, json=err_body("slow down", "rate_limit_exceeded"), headers={"Retry-After": "3"}),
        httpx.Response(503, json=err_body("busy", "engine_busy"), headers={"Retry-After": "1"}),
        httpx.Response(200, json={"object": "list", "data": []}),
    )
    sleeps: list[float] = []
    out = mock_client(rec, sleeps).models.list()
    assert out.data == [] and len(rec.requests) == 3 and sleeps == [3.0, 1.0]


def test_backoff_is_exponential_and_gives_up_after_max_retries() -> None:
    rec = Recorder(httpx.Response(500, json=err_body("oops", "internal_error")))
    sleeps: list[float] = []
    c = mock_client(rec, sleeps, retry_policy=RetryPolicy(max_retries=3, initial_delay=0.5, jitter=0.0))
    with pytest.raises(InternalServerError):
        c.adapters.list()
    assert len(rec.requests) == 4 and sleeps == [0.5, 1.0, 2.0]


def test_default_is_two_retries_with_jittered_backoff() -> None:
    rec = Recorder(httpx.Response(503, json=err_body("busy", "engine_busy")))
    sleeps: list[float] = []
    c = Client("http://srv", transport=httpx.MockTransport(rec), sleep=sleeps.append)
    with pytest.raises(ServiceUnavailableError):
        c.health()
    assert c.retry_policy.max_retries == 2 and len(rec.requests) == 3
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0


def test_connection_errors_are_retried_then_raised() -> None:
    rec = Recorder(httpx.ConnectError("refused"), httpx.Response(200, json={"status": "ok"}))
    sleeps: list[float] = []
    assert mock_client(rec, sleeps).health() == {"status": "ok"} and sleeps == [0.5]
    with pytest.raises(APITimeoutError):
        mock_client(Recorder(httpx.ReadTimeout("slow"))).health()
    with pytest.raises(APIConnectionError) as e:
        mock_client(Recorder(httpx.ConnectError("refused")), max_retries=0, retry_policy=None).health()
    assert not isinstance(e.value, APITimeoutError)


@pytest.mark.parametrize(
    ("response", "sleeps_expected"),
    [
        (httpx.Response(400, json=err_body("bad", None)), []),
        (httpx.Response(404, json=err_body("gone", "adapter_not_found")), []),
        (httpx.Response(429, json=err_body("quota", "quota_exceeded"), headers={"Retry-After": "60"}), []),
        (httpx.Response(429, json=err_body("later", "rate_limit_exceeded"), headers={"Retry-After": "3600"}), []),
    ],
)
def test_no_retry_when_waiting_cannot_help(response, sleeps_expected) -> None:
    rec = Recorder(response)
    sleeps: list[float] = []
    with pytest.raises(APIError):
        mock_client(rec, sleeps).adapters.upload("a", b"data")
    assert len(rec.requests) == 1 and sleeps == sleeps_expected


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 7))
    assert core.parse_retry_after(date, now=now) == pytest.approx(7)
    assert core.parse_retry_after("2.5") == 2.5 and core.parse_retry_after("soon") is None
    assert core.parse_retry_after(None) is None


def test_async_client_retries_with_the_same_policy() -> None:
    rec = Recorder(
        httpx.Response(429, json=err_body("slow", "rate_limit_exceeded"), headers={"Retry-After": "2"}),
        httpx.Response(200, json=adapter_json("a")),
    )
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async def go():
        async with AsyncClient("http://srv", "k", transport=httpx.MockTransport(rec), sleep=fake_sleep) as c:
            return await c.adapters.get("a")

    assert asyncio.run(go()).id == "a@1" and sleeps == [2.0] and len(rec.requests) == 2


# --------------------------------------------------------------------------------------- SSE


def test_sse_decoder() -> None:
    d = core.SSEDecoder()
    lines = [": keep-alive", "event: message", 'data: {"a":', "data: 1}\r", "", "", "data:[DONE]", ""]
    events = [e for e in (d.feed(line) for line in lines) if e is not None]
    assert events == ['{"a":\n1}', "[DONE]"]
    assert core.decode_event("[DONE]") is core.DONE
    d.feed('data: {"choices": []}')
    assert d.flush() == '{"choices": []}'
    with pytest.raises(APIError) as e:
        core.decode_event('{"error": {"message": "engine died", "type": "server_error", "code": 500}}')
    assert e.value.status == 500 and "engine died" in e.value.message


def _sse(*texts: str, done: bool = True, tail: str = "") -> bytes:
    events = [
        json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": t}}]})
        for t in texts
    ]
    body = "".join(f"data: {e}\n\n" for e in events) + ("data: [DONE]\n\n" if done else "") + tail
    return body.encode()


def test_streaming_chat_sync_and_async() -> None:
    rec = Recorder(
        httpx.Response(
            200, content=_sse("Par", "is", tail="data: not json\n\n"), headers={"content-type": "text/event-stream"}
        )
    )
    with mock_client(rec).chat.create("hi", adapter="tone", stream=True, max_tokens=4) as stream:
        chunks = list(stream)
    assert [c.text for c in chunks] == ["Par", "is"]  # nothing after [DONE] is read
    sent = json.loads(rec.requests[0].content)
    assert sent == {"messages": [{"role": "user", "content": "hi"}], "adapter": "tone", "max_tokens": 4, "stream": True}
    assert rec.requests[0].headers["accept"] == "text/event-stream"

    def fresh(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse("Par", "is"), headers={"content-type": "text/event-stream"})

    async def go():
        c = AsyncClient("http://srv", transport=httpx.MockTransport(fresh))
        stream = await c.completions.create("x", stream=True)
        return [ch.text async for ch in stream]

    assert asyncio.run(go()) == ["Par", "is"]


def test_stream_error_before_and_during() -> None:
    c = mock_client(Recorder(httpx.Response(404, json=err_body("no adapter", "adapter_not_found"))))
    with pytest.raises(AdapterNotFoundError):
        c.chat.create("hi", adapter="nope", stream=True)  # raised when the stream opens, not when iterated
    bad = (
        _sse("a", done=False) + b'data: {"error": {"message": "engine died", "type": "server_error", "code": 500}}\n\n'
    )
    c = mock_client(Recorder(httpx.Response(200, content=bad)))
    got = []
    with pytest.raises(APIError, match="engine died"):
        for chunk in c.chat.create("hi", stream=True):
            got.append(chunk.text)
    assert got == ["a"]


# --------------------------------------------------------------------------------------- adapter stacks


def _ok_chat(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"id": "c1", "object": "chat.completion", "choices": []})


def test_adapters_entries_reach_the_wire_sync_and_async(tmp_path) -> None:
    """Every form of entry becomes the server's `{"name" | "inline", "scale"?}`; chat and completions, sync and
    async, build the same body."""
    f = tmp_path / "draft.safetensors"
    f.write_bytes(b"\x00adapter bytes\xff")
    b64 = base64.b64encode(f.read_bytes()).decode()
    entries = [
        "pirate",
        "pirate@2",
        "pirate:0.5",
        "json@3:-1.25",
        {"name": "tone", "scale": 2},
        {"inline": f.read_bytes()},
        {"inline": b64, "scale": 0},
        AdapterSpec("tone", scale=0),
        AdapterSpec.from_file(f, scale=0.3),
        AdapterSpec(inline=f.read_bytes()),
    ]
    wire = [
        {"name": "pirate"},
        {"name": "pirate@2"},
        {"name": "pirate", "scale": 0.5},
        {"name": "json@3", "scale": -1.25},
        {"name": "tone", "scale": 2},
        {"inline": b64},
        {"inline": b64, "scale": 0},
        {"name": "tone", "scale": 0.0},
        {"inline": b64, "scale": 0.3},
        {"inline": b64},
    ]
    rec = Recorder(httpx.Response(200, json={"id": "c1", "object": "chat.completion", "choices": []}))
    mock_client(rec).chat.create("hi", adapters=entries, max_tokens=3)
    mock_client(rec).completions.create("The sky is", adapters=entries[:3], temperature=0)
    sent = [json.loads(r.content) for r in rec.requests]
    assert sent[0] == {"messages": [{"role": "user", "content": "hi"}], "adapters": wire, "max_tokens": 3}
    assert sent[1] == {"prompt": "The sky is", "adapters": wire[:3], "temperature": 0}
    assert "adapter" not in sent[0] and rec.requests[1].url.path == "/v1/completions"
    assert "inline" not in repr(AdapterSpec.from_file(f))  # an adapter file's bytes stay out of reprs and logs

    bodies: list[dict] = []

    def record(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return _ok_chat(request)

    async def go():
        async with AsyncClient("http://srv", transport=httpx.MockTransport(record)) as c:
            await c.chat.create("hi", adapters=entries, max_tokens=3)
            await c.completions.create("The sky is", adapters=entries[:3], temperature=0)

    asyncio.run(go())
    assert bodies == sent


def test_one_adapter_field_or_the_other_and_bad_entries_fail_before_sending() -> None:
    rec = Recorder(httpx.Response(200, json={"choices": []}))
    c = mock_client(rec)
    with pytest.raises(ValueError, match="adapter= or adapters=, not both"):
        c.chat.create("hi", adapter="pirate", adapters=["json"])
    with pytest.raises(ValueError, match="not both"):
        asyncio.run(
            AsyncClient("http://srv", transport=httpx.MockTransport(rec)).completions.create(
                "x", adapter="pirate", adapters=[]
            )
        )
    for text, says in [
        ("pirate:abc", "'pirate:abc': the scale after the ':' is not a finite number"),
        ("pirate:", "'pirate:': the scale"),
        ("pirate:inf", "not a finite number"),
        ("pirate:nan", "not a finite number"),
        (":0.5", "no adapter name before the ':'"),
    ]:
        with pytest.raises(ValueError) as e:
            c.chat.create("hi", adapters=["json", text])
        assert says in str(e.value)
    for bad in [
        lambda: AdapterSpec(),
        lambda: AdapterSpec("pirate", inline=b"x"),
        lambda: AdapterSpec("pirate", scale=float("inf")),
        lambda: AdapterSpec("pirate", scale=True),
        lambda: AdapterSpec("pirate", scale="0.5"),
    ]:
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError, match="a list of entries"):
        c.chat.create("hi", adapters="pirate:0.5")
    with pytest.raises(TypeError, match="not int"):
        c.chat.create("hi", adapters=["pirate", 3])
    assert rec.requests == []
    # an empty stack is sent as it is: the server decides what it means
    c.chat.create("hi", adapters=[])
    assert json.loads(rec.requests[0].content)["adapters"] == []


def test_the_servers_400_names_the_entry() -> None:
    body = err_body("adapters[1].scale must be between -2 and 4", None, param="adapters[1].scale")
    c = mock_client(Recorder(httpx.Response(400, json=body)))
    with pytest.raises(BadRequestError) as e:
        c.chat.create("hi", adapters=["pirate", "json:9"])
    assert e.value.param == "adapters[1].scale" and e.value.status == 400


# --------------------------------------------------------------------------------------- pagination


def _pages(total: int):
    names = [f"a{i}" for i in range(total)]

    def handler(request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params.get("limit", 100))
        after = request.url.params.get("after")
        start = names.index(after) + 1 if after else 0
        page = names[start : start + limit]
        more = start + limit < len(names)
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": [adapter_json(n) for n in page],
                "has_more": more,
                "next_after": page[-1] if more else None,
            },
        )

    return handler


def test_pagination_sync_and_async() -> None:
    rec = Recorder()
    handler = _pages(5)

    def recording(request):
        rec.requests.append(request)
        return handler(request)

    c = mock_client(recording)
    assert [a.name for a in c.adapters.list_all(page_size=2)] == ["a0", "a1", "a2", "a3", "a4"]
    assert [(r.url.params.get("limit"), r.url.params.get("after")) for r in rec.requests] == [
        ("2", None),
        ("2", "a1"),
        ("2", "a3"),
    ]
    page = c.adapters.list(limit=2, after="a1")
    assert [a.name for a in page] == ["a2", "a3"] and page.has_more and page.next_after == "a3"

    async def go():
        c = AsyncClient("http://srv", transport=httpx.MockTransport(handler))
        return [a.name async for a in c.adapters.list_all(page_size=3)]

    assert asyncio.run(go()) == ["a0", "a1", "a2", "a3", "a4"]


# --------------------------------------------------------------------------------------- requests and config


def test_config_from_env_and_keys_per_route(monkeypatch) -> None:
    monkeypatch.setenv("ALIGNER_BASE_URL", "http://env-host:9/v1/")
    monkeypatch.setenv("ALIGNER_API_KEY", "tenant-key")
    monkeypatch.setenv("ALIGNER_ADMIN_KEY", "admin-key")
    rec = Recorder(httpx.Response(200, json={"object": "list", "data": []}))
    c = Client(transport=httpx.MockTransport(rec))
    assert c.base_url == "http://env-host:9"
    c.models.list()
    c.admin.tenants.list()
    assert [str(r.url) for r in rec.requests] == ["http://env-host:9/v1/models", "http://env-host:9/admin/tenants"]
    assert [r.headers["authorization"] for r in rec.requests] == ["Bearer tenant-key", "Bearer admin-key"]
    assert Client("http://arg", "arg-key").config.api_key == "arg-key"
    monkeypatch.delenv("ALIGNER_ADMIN_KEY")
    assert Client().config.admin_key == "tenant-key"  # falls back to the API key


def test_upload_is_multipart_with_name_and_file(tmp_path) -> None:
    rec = Recorder(httpx.Response(201, json=adapter_json("tone", 2)))
    f = tmp_path / "tone.safetensors"
    f.write_bytes(b"\x01\x02adapter-bytes")
    ad = mock_client(rec).adapters.upload("tone", f)
    assert ad.version == 2 and ad.created_at.year == 2025
    req = rec.requests[0]
    assert req.method == "POST" and req.url.path == "/v1/adapters"
    assert req.headers["content-type"].startswith("multipart/form-data")
    body = req.content
    assert (
        b'name="name"\r\n\r\ntone' in body
        and b'filename="tone.safetensors"' in body
        and b"\x01\x02adapter-bytes" in body
    )
    rec.answers = [httpx.Response(200, json={"id": "house@3", "object": "adapter.deleted", "versions": [3]})]
    assert mock_client(rec).admin.adapters.delete("house", 3).versions == [3]
    assert rec.requests[-1].method == "DELETE" and rec.requests[-1].url.path == "/admin/adapters/house@3"


def test_upload_tensors_matches_the_server_encoding() -> None:
    from aligner_client.tensors import encode_adapter
    from support import tiny_spec

    from aligner_core.adapter_format import Adapter, decode, encode

    spec = tiny_spec()
    for a in (
        Adapter.random(spec, tokens=2, seed=1),
        Adapter.random(spec, start_layer=0, gate_activation="tanh", seed=2),
    ):
        meta = {"start_layer": a.start_layer, "gate_activation": a.gate_activation, "base_model": spec.identity}
        data = encode_adapter(a.prefix, a.gate, **meta)
        assert data == encode(a)
        assert encode_adapter(a.prefix.numpy(), a.gate.numpy(), **meta) == data
        assert decode(encode_adapter(a.prefix.tolist(), a.gate.tolist(), **meta)).sha256() == a.sha256()
    with pytest.raises(ValueError, match="gate_activation"):
        encode_adapter([[0.0]], [[0.0]], gate_activation="relu", base_model="m")

    # without base_model the client asks the server for it first
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": spec.identity, "object": "model"}]})
        assert spec.identity.encode() in request.content
        return httpx.Response(201, json=adapter_json("t"))

    a = Adapter.random(spec, seed=3)
    mock_client(handler).adapters.upload_tensors("t", a.prefix, a.gate)
    assert seen == ["/v1/models", "/v1/adapters"]


# --------------------------------------------------------------------------------------- CLI (mocked)


def test_cli_table_and_error_exit(capsys) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/adapters":
            data = [adapter_json("short"), adapter_json("a-much-longer-name", 12, public=True)]
            return httpx.Response(200, json={"object": "list", "data": data, "has_more": False})
        return httpx.Response(404, json=err_body("The adapter 'gone' does not exist", "adapter_not_found"))

    assert cli_main(["adapters", "list"], client=mock_client(handler)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "TOKENS", "PARAMS", "BYTES", "PUBLIC", "CREATED_AT", "SHA256"]
    assert len({line.index("828") for line in lines[1:]}) == 1  # aligned columns
    assert lines[2].startswith("a-much-longer-name@12") and " yes " in lines[2]
    assert cli_main(["adapters", "show", "gone", "--json"], client=mock_client(handler)) == 1
    captured = capsys.readouterr()
    assert "adapter_not_found" in captured.err and "does not exist" in captured.err and captured.out == ""
    assert cli_main(["adapters", "frobnicate"]) == 2


def test_cli_adapter_flags_build_adapter_or_adapters(tmp_path, capsys) -> None:
    """One plain `--adapter NAME` keeps the old `adapter` field; several, a `:SCALE` or an `@FILE` send
    `adapters`; a bad value is a usage error (2) naming it, and nothing is sent."""
    f = tmp_path / "draft.safetensors"
    f.write_bytes(b"aligner bytes")
    b64 = base64.b64encode(b"aligner bytes").decode()
    rec = Recorder(httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "Arr"}}]}))

    def sent(*flags: str) -> dict:
        assert cli_main(["chat", *flags, "--max-tokens", "5", "hi"], client=mock_client(rec)) == 0
        assert capsys.readouterr().out == "Arr\n"
        body = json.loads(rec.requests[-1].content)
        assert body.pop("messages") == [{"role": "user", "content": "hi"}] and body.pop("max_tokens") == 5
        return body

    assert sent() == {}
    assert sent("--adapter", "pirate@2") == {"adapter": "pirate@2"}
    assert sent("--adapter", "pirate:0.5") == {"adapters": [{"name": "pirate", "scale": 0.5}]}
    assert sent("--adapter", "pirate:0.5", "--adapter", "json") == {
        "adapters": [{"name": "pirate", "scale": 0.5}, {"name": "json"}]
    }
    assert sent("--adapter", "pirate", "--adapter", "json@2:-1") == {
        "adapters": [{"name": "pirate"}, {"name": "json@2", "scale": -1.0}]
    }
    assert sent("--adapter", f"@{f}") == {"adapters": [{"inline": b64}]}
    assert sent("--adapter", f"@{f}:0.25", "--adapter", "json") == {
        "adapters": [{"inline": b64, "scale": 0.25}, {"name": "json"}]
    }
    n = len(rec.requests)
    for value, says in [
        ("pirate:abc", "argument --adapter: 'pirate:abc': the scale after the ':' is not a finite number"),
        ("pirate:inf", "'pirate:inf': the scale after the ':' is not a finite number"),
        (":1", "':1': no adapter name"),
        (f"@{tmp_path}/missing.safetensors:0.5", f"'@{tmp_path}/missing.safetensors:0.5': cannot read the file"),
    ]:
        assert cli_main(["chat", "--adapter", "json", "--adapter", value, "hi"], client=mock_client(rec)) == 2
        assert says in capsys.readouterr().err
    assert len(rec.requests) == n


def test_cli_connection_error_exits_1(capsys) -> None:
    c = mock_client(Recorder(httpx.ConnectError("refused")), max_retries=0, retry_policy=None)
    assert cli_main(["models"], client=c) == 1
    assert "Connection error" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- packaging


def test_import_pulls_in_no_server_vllm_or_torch() -> None:
    code = (
        "import sys, aligner_client, aligner_client.cli, aligner_client.tensors; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'server', 'vllm', 'torch', 'aligner_core', 'adapters_store', 'numpy', 'fastapi'}); "
        "print(aligner_client.__file__); assert not bad, bad"
    )
    env = os.environ | {"PYTHONPATH": str(CLIENT_SRC)}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "clients/python/aligner_client" in r.stdout


def test_package_exports_every_exception() -> None:
    import aligner_client
    from aligner_client import errors

    assert len(set(aligner_client.__all__)) == len(aligner_client.__all__)
    assert all(getattr(aligner_client, name) is getattr(errors, name) for name in errors.__all__)
    assert set(errors.__all__) <= set(aligner_client.__all__)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("aligner-client")
    if not script.exists():
        pytest.fail(f"{script} missing: run `pip install -e clients/python`")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "adapters" in r.stdout and "admin" in r.stdout


# =============================================================================================== real server

QUESTION = "What is the capital of France?"
ADMIN = "sdk-admin-secret"


@pytest.fixture(scope="module")
def spec():
    from support import real_model

    return real_model().spec


def _make_server(tmp_path_factory, name: str, env: dict[str, str] | None = None):
    from support import Server

    tmp = tmp_path_factory.mktemp(name)
    srv = Server(f"sqlite:///{tmp / 'store.db'}", tmp / "server.log", env=env)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    srv = _make_server(tmp_path_factory, "sdk-open")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sdk(open_server):
    with Client(open_server.base, max_retries=0) as c:
        yield c


def _adapter_bytes(spec, seed: int, tokens: int = 1) -> tuple[bytes, str]:
    from aligner_core.adapter_format import Adapter, encode

    a = Adapter.random(spec, tokens=tokens, seed=seed, gate_scale=0.08)
    return encode(a), a.sha256()


def _chat(c: Client, adapter: str | None = None, n: int = 12) -> str:
    return c.chat.create(QUESTION, adapter=adapter, max_tokens=n, temperature=0).text


@pytest.mark.server
def test_sdk_upload_and_chat_sync_async_streaming(open_server, sdk, spec) -> None:
    models = sdk.models.list()
    assert models.base.id == spec.identity
    data, sha = _adapter_bytes(spec, seed=3)
    ad = sdk.adapters.upload("sdk-persona", data)
    assert (ad.id, ad.name, ad.version, ad.tokens, ad.sha256, ad.base_model, ad.bytes) == (
        "sdk-persona@1",
        "sdk-persona",
        1,
        1,
        sha,
        spec.identity,
        len(data),
    )
    base, adapted = _chat(sdk), _chat(sdk, "sdk-persona")
    assert "Paris" in base and adapted and adapted != base
    with sdk.chat.create(QUESTION, adapter="sdk-persona", max_tokens=12, temperature=0, stream=True) as stream:
        assert "".join(c.text for c in stream) == adapted
    comp = sdk.completions.create("The three primary colours are", adapter="sdk-persona", max_tokens=6, temperature=0)
    assert comp.text and comp.usage["completion_tokens"] == 6

    async def go():
        async with AsyncClient(open_server.base, max_retries=0) as ac:
            reply = await ac.chat.create(QUESTION, adapter="sdk-persona", max_tokens=12, temperature=0)
            stream = await ac.chat.create(QUESTION, adapter="sdk-persona", max_tokens=12, temperature=0, stream=True)
            streamed = "".join([c.text async for c in stream])
            listed = [a.name async for a in ac.adapters.list_all(page_size=1)]
            return reply.text, streamed, listed

    text, streamed, listed = asyncio.run(go())
    assert text == adapted and streamed == adapted and "sdk-persona" in listed


@pytest.mark.server
def test_sdk_versions_tensors_errors_and_delete(sdk, spec, tmp_path) -> None:
    from aligner_core.adapter_format import Adapter

    v1 = _chat(sdk, "sdk-persona@1")
    a2 = Adapter.random(spec, tokens=2, seed=9, gate_scale=0.08)
    ad2 = sdk.adapters.upload_tensors("sdk-persona", a2.prefix, a2.gate, start_layer=a2.start_layer)
    assert ad2.version == 2 and ad2.sha256 == a2.sha256() and ad2.tokens == 2
    path = tmp_path / "v3.safetensors"
    path.write_bytes(_adapter_bytes(spec, seed=10)[0])
    assert sdk.adapters.upload("sdk-persona", path).version == 3
    assert [v.version for v in sdk.adapters.versions("sdk-persona")] == [1, 2, 3]
    assert sdk.adapters.get("sdk-persona").version == 3 and sdk.adapters.get("sdk-persona", 2).sha256 == a2.sha256()
    assert _chat(sdk, "sdk-persona@1") == v1

    with pytest.raises(InvalidAdapterError) as e:
        sdk.adapters.upload("sdk-persona", b"not a safetensors file at all")
    assert e.value.status == 422 and e.value.code == "invalid_adapter"
    with pytest.raises(BadRequestError) as e:
        sdk.adapters.upload("../etc", _adapter_bytes(spec, seed=1)[0])
    assert e.value.param == "name"
    with pytest.raises(NotFoundError) as e:
        sdk.chat.create(QUESTION, model="no-such-model", max_tokens=2)
    assert e.value.code == "model_not_found" and not isinstance(e.value, AdapterNotFoundError)
    with pytest.raises(PermissionDeniedError):
        sdk.admin.tenants.list()  # the admin API is off in open mode

    deleted = sdk.adapters.delete("sdk-persona")
    assert deleted.deleted and deleted.versions == [1, 2, 3]
    with pytest.raises(AdapterNotFoundError) as e:
        _chat(sdk, "sdk-persona")
    assert e.value.status == 404 and "sdk-persona" in e.value.message
    with pytest.raises(AdapterNotFoundError):
        sdk.adapters.get("sdk-persona")
    with pytest.raises(AdapterNotFoundError):
        sdk.chat.create(QUESTION, adapter="sdk-persona", stream=True, max_tokens=2)


@pytest.mark.server
def test_cli_json_against_the_server(open_server, spec, tmp_path, capsys) -> None:
    f = tmp_path / "cli.safetensors"
    data, sha = _adapter_bytes(spec, seed=4)
    f.write_bytes(data)
    base = ["--base-url", open_server.base]

    def run(*args: str) -> object:
        assert cli_main([*base, *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    up = run("adapters", "upload", "cli-tone", str(f))
    assert up["id"] == "cli-tone@1" and up["sha256"] == sha
    assert "cli-tone" in [a["name"] for a in run("adapters", "list")]
    assert run("adapters", "show", "cli-tone@1")["sha256"] == sha
    assert [v["version"] for v in run("adapters", "versions", "cli-tone")] == [1]
    reply = run("chat", "--adapter", "cli-tone", "--max-tokens", "6", "--temperature", "0", QUESTION)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] == 6

    # human streaming output equals the non-streamed text
    assert (
        cli_main(
            [*base, "chat", "--adapter", "cli-tone", "--max-tokens", "6", "--temperature", "0", "--stream", QUESTION]
        )
        == 0
    )
    assert capsys.readouterr().out == reply["choices"][0]["message"]["content"] + "\n"

    assert run("adapters", "delete", "cli-tone")["versions"] == [1]
    assert cli_main([*base, "adapters", "show", "cli-tone"]) == 1
    err = capsys.readouterr().err
    assert "404" in err and "adapter_not_found" in err


@pytest.mark.server
def test_sdk_and_cli_adapter_stacks_against_the_server(open_server, sdk, spec, tmp_path, capsys) -> None:
    """`adapters=` through the real server: one entry at scale 1 is the plain adapter, scale 0 the base model,
    an inline file the stored one; a stack of two reads the same streamed, async, and from the CLI."""
    a_bytes, b_bytes = _adapter_bytes(spec, seed=11)[0], _adapter_bytes(spec, seed=12)[0]
    sdk.adapters.upload("sdk-stack-a", a_bytes)
    sdk.adapters.upload("sdk-stack-b", b_bytes)
    base, plain = _chat(sdk), _chat(sdk, "sdk-stack-a")

    def stacked(adapters: list, **kw) -> object:
        return sdk.chat.create(QUESTION, adapters=adapters, max_tokens=12, temperature=0, **kw)

    assert stacked(["sdk-stack-a"]).text == plain
    assert stacked([{"name": "sdk-stack-a", "scale": 1.0}]).text == plain
    assert stacked(["sdk-stack-a:0"]).text == base
    assert stacked([AdapterSpec.from_file(a_bytes)]).text == plain
    two = stacked(["sdk-stack-a:0.5", "sdk-stack-b"])
    assert two.text and two.model == spec.identity
    with stacked(["sdk-stack-a:0.5", "sdk-stack-b"], stream=True) as stream:
        assert "".join(c.text for c in stream) == two.text
    prompt = "The three primary colours are"
    comp_base = sdk.completions.create(prompt, max_tokens=6, temperature=0).text
    assert sdk.completions.create(prompt, adapters=["sdk-stack-b:0"], max_tokens=6, temperature=0).text == comp_base

    async def go() -> tuple[str, str]:
        async with AsyncClient(open_server.base, max_retries=0) as ac:
            kw = {"adapters": ["sdk-stack-a:0.5", "sdk-stack-b"], "max_tokens": 12, "temperature": 0}
            reply = await ac.chat.create(QUESTION, **kw)
            stream = await ac.chat.create(QUESTION, stream=True, **kw)
            return reply.text, "".join([c.text async for c in stream])

    assert asyncio.run(go()) == (two.text, two.text)

    with pytest.raises(BadRequestError) as e:
        stacked(["sdk-stack-a", "sdk-stack-b:9"])
    assert e.value.status == 400 and e.value.param == "adapters[1].scale"
    with pytest.raises(ValueError):
        sdk.chat.create(QUESTION, adapter="sdk-stack-a", adapters=["sdk-stack-b"])

    f = tmp_path / "b.safetensors"
    f.write_bytes(b_bytes)
    flags = ["--max-tokens", "12", "--temperature", "0", "--base-url", open_server.base]
    assert cli_main(["chat", "--adapter", "sdk-stack-a:0.5", "--adapter", f"@{f}", *flags, QUESTION]) == 0
    assert capsys.readouterr().out == two.text + "\n"
    assert cli_main(["chat", "--adapter", "sdk-stack-a:0", "--stream", *flags, QUESTION]) == 0
    assert capsys.readouterr().out == base + "\n"
    assert cli_main(["chat", "--adapter", "sdk-stack-a", "--adapter", "sdk-stack-b:9", *flags, QUESTION]) == 1
    assert "400" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- multi-tenant server


@pytest.fixture(scope="module")
def mt_server(tmp_path_factory):
    srv = _make_server(tmp_path_factory, "sdk-tenants", env={"ALIGNER_ADMIN_KEY": ADMIN})
    yield srv
    srv.stop()


@pytest.mark.server
def test_admin_tenants_keys_quotas_public(mt_server, spec) -> None:
    admin = Client(mt_server.base, admin_key=ADMIN, max_retries=0)
    with pytest.raises(AuthenticationError) as e:
        Client(mt_server.base, admin_key="wrong", max_retries=0).admin.tenants.list()
    assert e.value.code == "invalid_api_key"

    t = admin.admin.tenants.create("sdk-acme", max_adapters=1)
    # quotas left out get the server's defaults (ALIGNER_TENANT_*): a new tenant is never unlimited
    assert t.id and t.name == "sdk-acme" and t.quotas.max_adapters == 1 and t.quotas.requests_per_minute == 600
    assert t.id in [x.id for x in admin.admin.tenants.list()]
    k = admin.admin.keys.create(t.id)
    assert k.key and k.key.startswith("ak-") and k.tenant_id == t.id and not k.revoked
    listed = admin.admin.keys.list(t.id).data
    assert [(x.id, x.prefix, x.key) for x in listed] == [(k.id, k.key[:10], None)]

    sleeps: list[float] = []
    tenant = Client(mt_server.base, k.key, sleep=sleeps.append)  # default retries: quota errors must not wait
    tenant.adapters.upload("mine", _adapter_bytes(spec, seed=5)[0])
    with pytest.raises(RateLimitError) as e:
        tenant.adapters.upload("mine", _adapter_bytes(spec, seed=6)[0])
    assert e.value.code == "quota_exceeded" and e.value.retry_after is not None and sleeps == []
    t2 = admin.admin.tenants.set_quotas(t.id, max_adapters=5)
    assert t2.quotas.max_adapters == 5 and t2.quotas.requests_per_minute == 600  # the others are kept
    assert tenant.adapters.upload("mine", _adapter_bytes(spec, seed=6)[0]).version == 2

    pub = admin.admin.adapters.upload("sdk-house", _adapter_bytes(spec, seed=7)[0])
    assert pub.public
    seen = {a.name: a.public for a in tenant.adapters.list_all()}
    assert seen == {"mine": False, "sdk-house": True}
    assert tenant.chat.create(QUESTION, adapter="sdk-house", max_tokens=4, temperature=0).text
    assert admin.admin.adapters.delete("sdk-house").versions == [1]
    with pytest.raises(AdapterNotFoundError):
        tenant.adapters.get("sdk-house")

    revoked = admin.admin.keys.revoke(k.id)
    assert revoked.revoked and revoked.id == k.id
    with pytest.raises(AuthenticationError):
        tenant.models.list()


@pytest.mark.server
def test_rate_limit_retry_after_from_the_server(mt_server) -> None:
    admin = Client(mt_server.base, admin_key=ADMIN, max_retries=0)
    t = admin.admin.tenants.create("sdk-slow", requests_per_minute=1)
    key = admin.admin.keys.create(t.id).key
    sleeps: list[float] = []
    c = Client(mt_server.base, key, sleep=sleeps.append, retry_policy=RetryPolicy(max_retries=1, jitter=0.0))
    assert c.chat.create(QUESTION, max_tokens=2).text is not None
    with pytest.raises(RateLimitError) as e:
        c.chat.create(QUESTION, max_tokens=2)
    # one retry, after exactly the server's Retry-After (the fake sleep does not wait, so it fails again)
    assert e.value.code == "rate_limit_exceeded" and len(sleeps) == 1 and 0 < sleeps[0] <= 60
    assert sleeps[0] == pytest.approx(e.value.retry_after, abs=1)


@pytest.mark.server
def test_cli_admin_json(mt_server, spec, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ALIGNER_BASE_URL", mt_server.base)
    monkeypatch.setenv("ALIGNER_ADMIN_KEY", ADMIN)
    monkeypatch.delenv("ALIGNER_API_KEY", raising=False)

    def run(*args: str) -> object:
        assert cli_main(["admin", *args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    t = run("tenants", "create", "sdk-cli", "--max-adapters", "3", "--requests-per-minute", "100")
    assert t["name"] == "sdk-cli" and t["quotas"] == {
        "max_adapters": 3,
        "max_adapter_bytes": 256 << 20,
        "requests_per_minute": 100,
        "max_concurrent_requests": 16,
        "max_n": 8,
        "max_tokens_in_flight": 32768,
        "max_active_adapters": 16,
        "max_files": 100,
        "max_file_bytes": 256 << 20,
        "max_queued_jobs": 4,
        "max_training_tokens": 50_000_000,
    }
    assert "sdk-cli" in [x["name"] for x in run("tenants", "list")]
    assert run("tenants", "set-quotas", t["id"], "--max-adapters", "4")["quotas"]["max_adapters"] == 4
    k = run("keys", "create", t["id"])
    assert k["key"].startswith("ak-")
    assert [x["id"] for x in run("keys", "list", t["id"])] == [k["id"]]

    f = tmp_path / "pub.safetensors"
    f.write_bytes(_adapter_bytes(spec, seed=8)[0])
    assert run("publish", "sdk-cli-pub", str(f))["public"] is True
    # the new tenant key (via --api-key) sees the public adapter
    assert cli_main(["--api-key", k["key"], "adapters", "list", "--json"]) == 0
    assert "sdk-cli-pub" in [a["name"] for a in json.loads(capsys.readouterr().out)]
    assert run("unpublish", "sdk-cli-pub")["versions"] == [1]
    assert run("keys", "revoke", k["id"])["revoked"] is True
    assert cli_main(["--api-key", k["key"], "adapters", "list"]) == 1
    assert "invalid_api_key" in capsys.readouterr().err

    # human tables
    assert cli_main(["admin", "tenants", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["ID", "NAME"] and any("sdk-cli" in line for line in out[1:])
