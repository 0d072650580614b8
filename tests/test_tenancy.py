"""Multi-tenant mode against a real server process, on SQLite and on PostgreSQL: keys, isolation, public
adapters, quotas, and hot swap / delete racing a streaming generation."""

from __future__ import annotations

import contextlib
import statistics
import time

import httpx
import openai
import pytest
from store_contract.support import postgres_url_or_skip, throwaway_database
from support import Server, real_model

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server

ADMIN = "admin-secret-for-tests"
METRICS_TOKEN = "metrics-token-for-tests"  # ALIGNER_METRICS_TOKEN: what Prometheus sends
QUESTION = [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"tenancy-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp / 'store.db'}"
        else:
            url = stack.enter_context(throwaway_database(postgres_url_or_skip()))
        srv = Server(url, tmp / "server.log", env={"ALIGNER_ADMIN_KEY": ADMIN, "ALIGNER_METRICS_TOKEN": METRICS_TOKEN})
        stack.callback(srv.stop)
        srv.start()
        yield srv


def call(server, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.base + path, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def tenants(server):
    """alice (unlimited), bob (2 adapter versions), carol (3 requests per minute): name -> (id, key)."""
    made = {}
    for name, quotas in (("alice", {}), ("bob", {"max_adapters": 2}), ("carol", {"requests_per_minute": 3})):
        r = call(server, "POST", "/admin/tenants", ADMIN, json={"name": name, "quotas": quotas})
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        k = call(server, "POST", f"/admin/tenants/{tid}/keys", ADMIN)
        assert k.status_code == 201 and k.json()["key"].startswith("ak-")
        made[name] = (tid, k.json()["key"])
    return made


@pytest.fixture(scope="module")
def spec():
    return real_model().spec


def upload(server, key: str, name: str, adapter: Adapter, path: str = "/v1/adapters") -> httpx.Response:
    return call(server, "POST", path, key, files={"file": ("a.safetensors", encode(adapter))}, data={"name": name})


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)


def chat(server, key: str, adapter: str | None, max_tokens: int = 24) -> str:
    out = client(server, key).chat.completions.create(
        model=real_model().spec.identity,
        messages=QUESTION,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"adapter": adapter} if adapter else None,
    )
    return out.choices[0].message.content


def test_keys_are_required_and_checked(server, tenants) -> None:
    for key in (None, "ak-wrong", ADMIN):
        r = call(server, "GET", "/v1/models", key)
        assert r.status_code == 401, key
        assert (
            set(r.json()["error"]) == {"message", "type", "param", "code"}
            and r.json()["error"]["code"] == "invalid_api_key"
        )
    _, alice = tenants["alice"]
    assert call(server, "GET", "/v1/models", alice).status_code == 200
    assert call(server, "GET", "/admin/tenants", alice).status_code == 401  # tenant keys are not admin keys
    listed = call(server, "GET", f"/admin/tenants/{tenants['alice'][0]}/keys", ADMIN).json()["data"]
    assert listed and all(k["key"] is None for k in listed)  # shown once, never again
    with pytest.raises(openai.AuthenticationError):
        client(server, "ak-nope").models.list()


def test_tenants_are_isolated(server, tenants, spec) -> None:
    (_, alice), (_, bob) = tenants["alice"], tenants["bob"]
    a = Adapter.random(spec, tokens=1, seed=31, gate_scale=0.08)
    assert upload(server, alice, "secret", a).status_code == 201
    for method, path in (
        ("GET", "/v1/adapters/secret"),
        ("GET", "/v1/adapters/secret/versions"),
        ("GET", "/v1/adapters/secret@1"),
        ("DELETE", "/v1/adapters/secret"),
        ("GET", "/v1/models/secret"),
        ("GET", "/v1/models/secret@1"),
        ("POST", "/tokenize"),
        ("POST", "/v1/responses"),
    ):
        field = "prompt" if path == "/tokenize" else "input"
        theirs, missing = (
            call(
                server,
                method,
                path.replace("secret", name),
                bob,
                **({"json": {"model": name, field: "Hi"}} if method == "POST" else {}),
            )
            for name in ("secret", "nothing")
        )
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json() == {
            "error": {
                **missing.json()["error"],
                "message": missing.json()["error"]["message"].replace("nothing", "secret"),
            }
        }
    with pytest.raises(openai.NotFoundError) as used:
        chat(server, bob, "secret")
    with pytest.raises(openai.NotFoundError) as absent:
        chat(server, bob, "nothing")
    assert used.value.body["code"] == absent.value.body["code"] == "adapter_not_found"
    assert "secret" not in [m["name"] for m in call(server, "GET", "/v1/adapters", bob).json()["data"]]
    # bob's upload of the same name is his own version 1; alice's adapter is untouched
    b = Adapter.random(spec, tokens=1, seed=32, gate_scale=0.08)
    assert upload(server, bob, "secret", b).json()["version"] == 1
    mine = call(server, "GET", "/v1/adapters/secret", alice).json()
    assert mine["version"] == 1 and mine["sha256"] == a.sha256()
    assert chat(server, alice, "secret") != chat(server, bob, "secret")
    assert call(server, "DELETE", "/v1/adapters/secret", bob).status_code == 200
    assert call(server, "GET", "/v1/adapters/secret", alice).status_code == 200


def test_not_found_timing_is_comparable(server, tenants, spec) -> None:
    (_, alice), (_, bob) = tenants["alice"], tenants["bob"]
    upload(server, alice, "timing", Adapter.random(spec, tokens=1, seed=33))

    def timed(path: str) -> float:
        t0 = time.perf_counter()
        assert call(server, "GET", path, bob).status_code == 404
        return (time.perf_counter() - t0) * 1000

    other, missing = [], []
    for _ in range(20):  # interleaved, so load on the machine hits both alike
        other.append(timed("/v1/adapters/timing"))
        missing.append(timed("/v1/adapters/never-existed"))
    a, b = statistics.median(other), statistics.median(missing)
    assert abs(a - b) < 25 or max(a, b) / min(a, b) < 1.5, (a, b)


def test_public_adapters(server, tenants, spec) -> None:
    (_, alice), (_, bob) = tenants["alice"], tenants["bob"]
    pub = Adapter.random(spec, tokens=1, seed=34, gate_scale=0.08)
    assert upload(server, alice, "house-style", pub, path="/admin/adapters").status_code == 401
    r = upload(server, ADMIN, "house-style", pub, path="/admin/adapters")
    assert r.status_code == 201 and r.json()["public"] is True
    for key in (alice, bob):
        assert "house-style" in [m.id for m in client(server, key).models.list().data]
    assert chat(server, alice, "house-style") == chat(server, bob, "house-style") != chat(server, bob, None)
    assert call(server, "DELETE", "/v1/adapters/house-style", bob).status_code == 404  # not bob's to delete
    assert call(server, "GET", "/v1/adapters/house-style", alice).json()["sha256"] == pub.sha256()


def test_quotas(server, tenants, spec) -> None:
    (_, bob), (_, carol) = tenants["bob"], tenants["carol"]
    # bob may own 2 adapter versions (he has deleted his earlier one)
    codes = [upload(server, bob, f"q{i}", Adapter.random(spec, tokens=1, seed=40 + i)).status_code for i in range(3)]
    assert codes == [201, 201, 429]
    r = upload(server, bob, "q3", Adapter.random(spec, tokens=1, seed=44))
    assert r.json()["error"]["code"] == "quota_exceeded" and "Retry-After" in r.headers
    statuses = [
        call(server, "POST", "/v1/completions", carol, json={"prompt": "Hi", "max_tokens": 1}).status_code
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    with pytest.raises(openai.RateLimitError):
        chat(server, carol, None, max_tokens=1)


def test_revoked_key_is_refused(server, tenants) -> None:
    tid, _ = tenants["carol"]
    k = call(server, "POST", f"/admin/tenants/{tid}/keys", ADMIN).json()
    assert call(server, "GET", "/v1/adapters", k["key"]).status_code == 200
    assert call(server, "DELETE", f"/admin/keys/{k['id']}", ADMIN).json()["revoked"] is True
    assert call(server, "GET", "/v1/adapters", k["key"]).status_code == 401


def _stream_with(server, key: str, adapter: str, during) -> str:
    """Stream a generation; after the first chunks, run `during()`; return the full streamed text."""
    stream = client(server, key).chat.completions.create(
        model=real_model().spec.identity,
        messages=QUESTION,
        max_tokens=80,
        temperature=0,
        stream=True,
        extra_body={"adapter": adapter},
    )
    parts, done = [], False
    for i, chunk in enumerate(stream):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if i == 3 and not done:
            during()
            done = True
    assert done
    return "".join(parts)


def test_hot_swap_while_streaming(server, tenants, spec) -> None:
    _, alice = tenants["alice"]
    upload(server, alice, "swap", Adapter.random(spec, tokens=1, seed=51, gate_scale=0.08))
    v1_text = chat(server, alice, "swap@1", max_tokens=80)
    v2 = Adapter.random(spec, tokens=4, seed=52, gate_scale=0.08)
    streamed = _stream_with(server, alice, "swap", lambda: upload(server, alice, "swap", v2))
    assert streamed == v1_text  # the running request finished on the version it started with
    assert call(server, "GET", "/v1/adapters/swap", alice).json()["version"] == 2
    assert chat(server, alice, "swap", max_tokens=80) == chat(server, alice, "swap@2", max_tokens=80) != v1_text


def _resident(server) -> float:
    text = call(server, "GET", "/metrics", ADMIN).text
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith("aligner_adapters_resident ")))


def test_delete_while_streaming(server, tenants, spec) -> None:
    _, alice = tenants["alice"]
    upload(server, alice, "gone", Adapter.random(spec, tokens=2, seed=53, gate_scale=0.08))
    expected = chat(server, alice, "gone", max_tokens=80)
    resident_with = _resident(server)
    streamed = _stream_with(server, alice, "gone", lambda: call(server, "DELETE", "/v1/adapters/gone", alice))
    assert streamed == expected  # delete let the running request finish
    with pytest.raises(openai.NotFoundError):
        chat(server, alice, "gone")
    deadline = time.monotonic() + 5
    while _resident(server) >= resident_with and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _resident(server) < resident_with  # the engine slot was freed once the stream ended


def test_metrics_by_tenant(server, tenants) -> None:
    text = call(server, "GET", "/metrics", ADMIN).text
    assert 'tenant="alice"' in text and 'tenant="carol"' in text
    assert "secret" not in text and "house-style" not in text  # never labelled by adapter name


def test_metrics_need_a_credential(server, tenants) -> None:
    """Multi-tenant /metrics (every tenant's traffic): the admin key or the metrics token, never a tenant key."""
    _, alice = tenants["alice"]
    for key in (None, alice, "wrong-token"):
        r = call(server, "GET", "/metrics", key)
        assert r.status_code == 401, key
        assert (
            set(r.json()["error"]) == {"message", "type", "param", "code"}
            and r.json()["error"]["code"] == "invalid_api_key"
        )
    for key in (ADMIN, METRICS_TOKEN):
        r = call(server, "GET", "/metrics", key)
        assert r.status_code == 200 and "aligner_requests" in r.text, r.text[:300]
    assert call(server, "GET", "/health").status_code == 200  # probes stay open
