"""Security against one real multi-tenant server process (SQLite store): object-level authorisation between
tenants on every adapter route, keys hashed at rest and absent from logs, constant-time comparison, the
admin API closed to tenant keys, open mode kept on loopback, every configured limit a clear 4xx in OpenAI's
error shape, and adapter names that cannot escape their namespace."""

from __future__ import annotations

import ast
import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from support import OPERATIONS, REPO, Server, free_port, real_model

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server

ADMIN = "admin-key-for-security-tests-0123456789"
MAX_ADAPTER_BYTES = 16384  # a 4-token adapter (~10.6 KB) fits, a 16-token one (~38 KB) does not
MAX_ADAPTER_TOKENS = 4
MAX_REQUEST_BYTES = 65536  # the middleware allows max(this, MAX_ADAPTER_BYTES + 64 KiB) = 81920
MAX_MODEL_LEN = 256
ERROR_KEYS = {"message", "type", "param", "code"}
MESSAGES = [{"role": "user", "content": "Say hi."}]


@dataclass
class Tenant:
    id: str
    key: str
    key_id: str


@dataclass
class World:
    server: Server
    db: Path
    spec: object
    a: Tenant
    b: Tenant
    secret: Adapter  # A's adapter "secret", version 1


def call(server: Server, method: str, path: str, key: str | None = None, **kw) -> httpx.Response:
    headers = kw.pop("headers", {}) | ({"authorization": f"Bearer {key}"} if key else {})
    return httpx.request(method, server.base + path, headers=headers, timeout=120, **kw)


def upload(server: Server, key: str | None, name: str, data: bytes, path: str = "/v1/adapters") -> httpx.Response:
    return call(server, "POST", path, key, files={"file": ("a.safetensors", data)}, data={"name": name})


def assert_error_shape(r: httpx.Response, status: int | tuple[int, ...], code: str | None = "*") -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if code != "*":
        assert body["error"]["code"] == code, body
    return body["error"]


def new_tenant(server: Server, name: str, quotas: dict | None = None) -> Tenant:
    r = call(server, "POST", "/admin/tenants", ADMIN, json={"name": name, "quotas": quotas or {}})
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    k = call(server, "POST", f"/admin/tenants/{tid}/keys", ADMIN)
    assert k.status_code == 201, k.text
    return Tenant(tid, k.json()["key"], k.json()["id"])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("security")
    env = {
        "ALIGNER_ADMIN_KEY": ADMIN,
        "ALIGNER_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
        "ALIGNER_MAX_ADAPTER_BYTES": str(MAX_ADAPTER_BYTES),
        "ALIGNER_MAX_ADAPTER_TOKENS": str(MAX_ADAPTER_TOKENS),
        "ALIGNER_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
    }
    srv = Server(f"sqlite:///{tmp / 'store.db'}", tmp / "server.log", env=env)
    srv.start()
    try:
        spec = real_model().spec
        a, b = new_tenant(srv, "tenant-a"), new_tenant(srv, "tenant-b")
        secret = Adapter.random(spec, tokens=1, seed=101, gate_scale=0.08)
        assert upload(srv, a.key, "secret", encode(secret)).status_code == 201
        yield World(srv, tmp / "store.db", spec, a, b, secret)
    finally:
        srv.stop()


def assert_a_intact(w: World) -> None:
    """A's adapter is exactly as uploaded: one version, the same content hash."""
    got = call(w.server, "GET", "/v1/adapters/secret", w.a.key)
    assert got.status_code == 200 and got.json()["sha256"] == w.secret.sha256() and got.json()["version"] == 1, got.text
    versions = call(w.server, "GET", "/v1/adapters/secret/versions", w.a.key).json()["data"]
    assert [(v["version"], v["sha256"]) for v in versions] == [(1, w.secret.sha256())]


# --- object-level authorisation: B on A's adapter answers exactly like B on a name that does not exist ---

MISSING = "absent"  # same length as "secret", so even sizes match


def _generation(endpoint: str, ref: str) -> tuple[str, str, dict]:
    body = {"messages": MESSAGES} if endpoint == "chat/completions" else {"prompt": "Say hi."}
    return "POST", f"/v1/{endpoint}", {"json": body | {"adapter": ref, "max_tokens": 2}}


MATRIX = {  # case -> (method, path, request kwargs), with NAME standing for the adapter name
    "get": ("GET", "/v1/adapters/NAME", {}),
    "get@1": ("GET", "/v1/adapters/NAME@1", {}),
    "versions": ("GET", "/v1/adapters/NAME/versions", {}),
    "versions@1": ("GET", "/v1/adapters/NAME@1/versions", {}),
    "delete@1": ("DELETE", "/v1/adapters/NAME@1", {}),
    "delete": ("DELETE", "/v1/adapters/NAME", {}),
    "chat": _generation("chat/completions", "NAME"),
    "chat@1": _generation("chat/completions", "NAME@1"),
    "completions": _generation("completions", "NAME"),
    "completions@1": _generation("completions", "NAME@1"),
    "chat-model": ("POST", "/v1/chat/completions", {"json": {"model": "NAME", "messages": MESSAGES, "max_tokens": 2}}),
    "completions-model": ("POST", "/v1/completions", {"json": {"model": "NAME@1", "prompt": "Hi", "max_tokens": 2}}),
}


def _fill(value, name: str):
    if isinstance(value, str):
        return value.replace("NAME", name)
    if isinstance(value, dict):
        return {k: _fill(v, name) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, name) for v in value]
    return value


@pytest.mark.parametrize("case", list(MATRIX))
def test_other_tenants_adapter_is_indistinguishable_from_a_missing_one(world: World, case: str) -> None:
    method, path, kw = MATRIX[case]
    theirs = call(world.server, method, _fill(path, "secret"), world.b.key, **_fill(kw, "secret"))
    missing = call(world.server, method, _fill(path, MISSING), world.b.key, **_fill(kw, MISSING))
    assert theirs.status_code == missing.status_code == 404, (theirs.text, missing.text)
    assert_error_shape(theirs, 404)
    renamed = {k: v.replace(MISSING, "secret") if isinstance(v, str) else v for k, v in missing.json()["error"].items()}
    assert theirs.json() == {"error": renamed}
    assert theirs.headers.get("content-length") == missing.headers.get("content-length")
    # the same request by the owner succeeds (so the 404 above is authorisation, not a broken route) ...
    if method == "GET" or method == "POST":
        mine = call(world.server, method, _fill(path, "secret"), world.a.key, **_fill(kw, "secret"))
        assert mine.status_code == 200, mine.text
    assert_a_intact(world)  # ... and B's attempt changed nothing of A's


def test_other_tenants_adapter_is_not_listed(world: World) -> None:
    listed = call(world.server, "GET", "/v1/adapters", world.b.key)
    assert listed.status_code == 200 and "secret" not in [a["name"] for a in listed.json()["data"]]
    models = call(world.server, "GET", "/v1/models", world.b.key).json()["data"]
    assert "secret" not in [m["id"] for m in models]
    page = call(world.server, "GET", "/v1/adapters", world.b.key, params={"after": "secret", "limit": 1000})
    assert page.status_code in (200, 400) and "secret" not in page.text
    # positive control: A sees it in both
    assert "secret" in [a["name"] for a in call(world.server, "GET", "/v1/adapters", world.a.key).json()["data"]]
    assert "secret" in [m["id"] for m in call(world.server, "GET", "/v1/models", world.a.key).json()["data"]]


def test_uploading_the_same_name_makes_an_own_adapter(world: World) -> None:
    mine = Adapter.random(world.spec, tokens=1, seed=102, gate_scale=0.08)
    r = upload(world.server, world.b.key, "secret", encode(mine))
    fresh = upload(world.server, world.b.key, MISSING, encode(mine))
    try:
        assert r.status_code == fresh.status_code == 201, (r.text, fresh.text)
        strip = lambda d: {k: v for k, v in d.items() if k not in ("id", "name", "created_at")}  # noqa: E731
        assert strip(r.json()) == strip(fresh.json()) and r.json()["version"] == 1  # exactly as for a new name
        assert call(world.server, "GET", "/v1/adapters/secret", world.b.key).json()["sha256"] == mine.sha256()
        assert_a_intact(world)
    finally:
        for name in ("secret", MISSING):
            assert call(world.server, "DELETE", f"/v1/adapters/{name}", world.b.key).status_code == 200
    assert_a_intact(world)  # B deleting his own "secret" left A's alone


# --- API keys: hashed at rest, never logged, compared in constant time ---


def test_api_keys_are_stored_only_as_hashes(world: World) -> None:
    keys = [world.a.key, world.b.key]
    files = sorted(world.db.parent.glob(world.db.name + "*"))  # the database and its WAL / SHM files
    raw = b"".join(p.read_bytes() for p in files)
    for key in keys + [ADMIN]:
        assert key.encode() not in raw and key.encode("utf-16-le") not in raw
    values: list[str] = []
    with sqlite3.connect(f"file:{world.db}?mode=ro", uri=True) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in db.execute(f'SELECT * FROM "{table}"'):
                values += [str(v) for v in row]
    assert not [v for v in values for key in keys if key in v or key[10:] in v]  # not even the secret part
    for key in keys:  # positive control: this is the right database, holding the hashes
        assert hashlib.sha256(key.encode()).hexdigest() in values


def test_keys_never_reach_the_log(world: World) -> None:
    wrong = "ak-" + "Z" * 43
    for key in (world.a.key, wrong, ADMIN, ADMIN + "x"):
        for path in ("/v1/models", "/v1/adapters", "/admin/tenants", "/v1/adapters/nope"):
            r = call(world.server, "GET", path, key)
            assert r.status_code in (200, 401, 404)
            assert key not in r.text  # not echoed in an error either
    call(world.server, "POST", "/v1/chat/completions", wrong, json={"messages": MESSAGES, "max_tokens": 1})
    call(world.server, "POST", "/v1/chat/completions", world.a.key, json={"messages": MESSAGES, "max_tokens": 1})
    log = world.server.log.read_text(errors="replace")
    assert "GET /v1/models" in log or "/v1/models" in log  # positive control: requests are logged
    for secret in (world.a.key, world.b.key, wrong, ADMIN):
        assert secret not in log and secret[3:] not in log


def test_secrets_are_compared_in_constant_time() -> None:
    """Admin key: hmac.compare_digest; tenant keys: a lookup by SHA-256 in the store, never `==` on a secret."""
    from server import auth

    auth_tree = ast.parse((REPO / "server/auth.py").read_text())
    same = next(n for n in ast.walk(auth_tree) if isinstance(n, ast.FunctionDef) and n.name == "same_secret")
    calls = {ast.unparse(c.func) for c in ast.walk(same) if isinstance(c, ast.Call)}
    assert "hmac.compare_digest" in calls
    assert not [n for n in ast.walk(same) if isinstance(n, ast.Compare)]
    deps_tree = ast.parse((REPO / "server/deps.py").read_text())
    funcs = {n.name: n for n in ast.walk(deps_tree) if isinstance(n, ast.AsyncFunctionDef)}
    admin_calls = {ast.unparse(c.func) for c in ast.walk(funcs["require_admin"]) if isinstance(c, ast.Call)}
    assert "same_secret" in admin_calls
    tenant_calls = {ast.unparse(c) for c in ast.walk(funcs["current_tenant"]) if isinstance(c, ast.Call)}
    assert "svc.store.find_api_key(hash_key(token))" in tenant_calls
    for fn in (funcs["require_admin"], funcs["current_tenant"]):  # no comparison touches a secret
        for cmp in (n for n in ast.walk(fn) if isinstance(n, ast.Compare)):
            text = ast.unparse(cmp)
            assert (
                not any(word in text for word in ("token ==", "token !=", "admin_key", "secret")) or " is None" in text
            ), text
    assert auth.same_secret("k" * 40, "k" * 40) and not auth.same_secret("k" * 40, "k" * 39 + "j")
    assert auth.hash_key("ak-x") == hashlib.sha256(b"ak-x").hexdigest()


# --- the admin API is the admin key's alone ---

ADMIN_ROUTES = [op for op in OPERATIONS if op[1].startswith("/admin/")]  # test_admin_routes_are_all_covered


def test_admin_routes_are_all_covered(world: World) -> None:
    spec = call(world.server, "GET", "/openapi.json").json()
    found = {(m.upper(), p) for p, ops in spec["paths"].items() if p.startswith("/admin") for m in ops}
    assert found == set(ADMIN_ROUTES)


def _admin_request(w: World, method: str, template: str) -> tuple[str, dict]:
    path = template.format(tenant_id=w.a.id, key_id=w.a.key_id, name="house")
    if template == "/admin/tenants":
        return path, {"json": {"name": "intruder"}} if method == "POST" else {}
    if method == "PATCH":
        return path, {"json": {"max_adapters": 0, "requests_per_minute": 0}}
    if template == "/admin/adapters":
        return path, {"files": {"file": ("a", encode(Adapter.random(w.spec, seed=103)))}, "data": {"name": "house"}}
    return path, {}


@pytest.mark.parametrize(("method", "template"), ADMIN_ROUTES, ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_routes_refuse_tenant_keys_and_no_key(world: World, method: str, template: str) -> None:
    w = world
    if call(w.server, "GET", "/v1/adapters/house", w.a.key).status_code == 404:  # a public adapter to target
        assert (
            upload(w.server, ADMIN, "house", encode(Adapter.random(w.spec, seed=104)), "/admin/adapters").status_code
            == 201
        )
    tenants_before = call(w.server, "GET", "/admin/tenants", ADMIN).json()
    keys_before = call(w.server, "GET", f"/admin/tenants/{w.a.id}/keys", ADMIN).json()
    path, kw = _admin_request(w, method, template)
    refused = [f"Bearer {k}" for k in (w.a.key, w.b.key, ADMIN[:-1], ADMIN + "0", ADMIN.upper())] + ["Bearer"]
    for auth in [None, f"Basic {ADMIN}", ADMIN, f"Bearer  {w.a.key}"] + refused:
        r = call(w.server, method, path, headers={"authorization": auth} if auth is not None else {}, **kw)
        assert_error_shape(r, (401, 403))
        assert r.json()["error"]["code"] in ("invalid_api_key", "permission_denied")
    assert call(w.server, "GET", "/admin/tenants", ADMIN).json() == tenants_before
    assert call(w.server, "GET", f"/admin/tenants/{w.a.id}/keys", ADMIN).json() == keys_before
    assert call(w.server, "GET", "/v1/adapters/house", w.b.key).status_code == 200
    assert call(w.server, "GET", "/v1/models", w.a.key).status_code == 200  # A's key was not revoked
    # positive control: the admin key itself is accepted on this route
    ok = call(w.server, "GET", path, ADMIN) if method == "GET" else None
    assert ok is None or ok.status_code == 200


# --- open mode stays on loopback unless forced ---


def _serve(tmp: Path, host: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGNER_")}
    cmd = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--host",
        host,
        "--port",
        str(free_port()),
        "--store",
        f"sqlite:///{tmp / 'open.db'}",
    ]
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp)
    return out, time.monotonic() - t0


def test_open_mode_refuses_non_loopback_unless_forced(tmp_path: Path, monkeypatch) -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        out, took = _serve(tmp_path, host)
        assert out.returncode == 2, out
        assert (
            "ALIGNER_ADMIN_KEY" in out.stderr and "ALIGNER_ALLOW_OPEN_REMOTE=true" in out.stderr and host in out.stderr
        )
        assert "Traceback" not in out.stderr and "Started server process" not in out.stderr + out.stdout
        assert not (tmp_path / "open.db").exists()  # refused before anything started
        assert took < 15, f"took {took:.1f}s: the check must run before vLLM is even imported"
    # the documented force flag (and a key, and loopback) each make the same settings valid
    from pydantic import ValidationError

    from server.settings import Settings

    for k in [k for k in os.environ if k.startswith("ALIGNER_")]:
        monkeypatch.delenv(k)
    assert "ALIGNER_ALLOW_OPEN_REMOTE=true" in (REPO / "README.md").read_text()
    with pytest.raises(ValidationError, match="ALIGNER_ALLOW_OPEN_REMOTE"):
        Settings(host="0.0.0.0")
    monkeypatch.setenv("ALIGNER_ALLOW_OPEN_REMOTE", "true")
    assert Settings(host="0.0.0.0").host == "0.0.0.0"
    monkeypatch.delenv("ALIGNER_ALLOW_OPEN_REMOTE")
    assert Settings(host="0.0.0.0", admin_key="k").host == "0.0.0.0"
    for loopback in ("127.0.0.1", "::1", "localhost", "127.8.9.10"):
        assert Settings(host=loopback).admin_key is None


# --- limits: each a clear 4xx in OpenAI's error shape ---


def test_configured_adapter_size_and_token_limits(world: World) -> None:
    w = world
    before = call(w.server, "GET", "/v1/adapters", w.b.key).json()
    fits = encode(Adapter.random(w.spec, tokens=MAX_ADAPTER_TOKENS, seed=105))
    too_many = encode(Adapter.random(w.spec, tokens=MAX_ADAPTER_TOKENS + 1, seed=106))
    too_big = encode(Adapter.random(w.spec, tokens=16, seed=107))
    assert len(fits) < len(too_many) <= MAX_ADAPTER_BYTES < len(too_big) < 1 << 20  # below the defaults
    err = assert_error_shape(upload(w.server, w.b.key, "limits", too_big), 413, "file_too_large")
    assert str(MAX_ADAPTER_BYTES) in err["message"] and err["param"] == "file"
    err = assert_error_shape(upload(w.server, w.b.key, "limits", too_many), 422, "invalid_adapter")
    assert f"at most {MAX_ADAPTER_TOKENS}" in err["message"]
    assert call(w.server, "GET", "/v1/adapters", w.b.key).json() == before
    r = upload(w.server, w.b.key, "limits", fits)  # positive control: at the limit is fine
    assert r.status_code == 201 and r.json()["tokens"] == MAX_ADAPTER_TOKENS
    assert call(w.server, "DELETE", "/v1/adapters/limits", w.b.key).status_code == 200


def test_adapter_bytes_quota(world: World) -> None:
    one = encode(Adapter.random(world.spec, tokens=1, seed=108))
    c = new_tenant(world.server, "quota-bytes", {"max_adapter_bytes": len(one) + 100})
    assert upload(world.server, c.key, "first", one).status_code == 201
    r = upload(world.server, c.key, "second", encode(Adapter.random(world.spec, tokens=1, seed=109)))
    err = assert_error_shape(r, 429, "quota_exceeded")
    assert "max_adapter_bytes" in err["message"] and r.headers.get("retry-after")
    names = [a["name"] for a in call(world.server, "GET", "/v1/adapters", c.key).json()["data"] if not a["public"]]
    assert names == ["first"]
    # an overwrite counts too: a new version of "first" would hold two blobs
    assert_error_shape(upload(world.server, c.key, "first", one), 429, "quota_exceeded")


def test_quota_values_past_64_bits_are_refused(world: World) -> None:
    """Found by the schemathesis soak: a quota the store cannot hold was a 500."""
    for quotas in ({"max_adapter_bytes": 2**63}, {"requests_per_minute": 10**28}, {"max_adapters": -1}):
        assert_error_shape(
            call(world.server, "POST", "/admin/tenants", ADMIN, json={"name": "big", "quotas": quotas}), 400
        )
        assert_error_shape(call(world.server, "PATCH", f"/admin/tenants/{world.b.id}", ADMIN, json=quotas), 400)
    r = call(world.server, "PATCH", f"/admin/tenants/{world.b.id}", ADMIN, json={"max_adapter_bytes": 2**63 - 1})
    assert r.status_code == 200 and r.json()["quotas"]["max_adapter_bytes"] == 2**63 - 1, r.text
    # PATCH changes only what it names; null is unlimited
    assert (
        call(world.server, "PATCH", f"/admin/tenants/{world.b.id}", ADMIN, json={}).json()["quotas"][
            "max_adapter_bytes"
        ]
        == 2**63 - 1
    )
    assert (
        call(world.server, "PATCH", f"/admin/tenants/{world.b.id}", ADMIN, json={"max_adapter_bytes": None}).json()[
            "quotas"
        ]["max_adapter_bytes"]
        is None
    )
    assert "big" not in [t["name"] for t in call(world.server, "GET", "/admin/tenants", ADMIN).json()["data"]]


def test_request_body_limit(world: World) -> None:
    w = world
    limit = max(MAX_REQUEST_BYTES, MAX_ADAPTER_BYTES + (64 << 10))
    big = {"messages": [{"role": "user", "content": "x" * (limit + 1000)}], "max_tokens": 1}
    err = assert_error_shape(
        call(w.server, "POST", "/v1/chat/completions", w.a.key, json=big), 413, "request_too_large"
    )
    assert str(limit) in err["message"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        yield b'{"prompt": "'
        for _ in range(limit // 4096 + 2):
            yield b"y" * 4096
        yield b'", "max_tokens": 1}'

    r = call(
        w.server, "POST", "/v1/completions", w.a.key, content=chunks(), headers={"content-type": "application/json"}
    )
    assert_error_shape(r, 413, "request_too_large")
    # a multipart upload past the limit is refused the same way, before it is parsed
    r = call(
        w.server, "POST", "/v1/adapters", w.a.key, files={"file": ("a", b"\0" * (limit + 1))}, data={"name": "huge"}
    )
    assert_error_shape(r, 413)
    assert call(w.server, "GET", "/v1/adapters/huge", w.a.key).status_code == 404
    assert call(w.server, "GET", "/health").status_code == 200


def _generate(w: World, endpoint: str, text: str, **kw) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}]} if endpoint == "chat/completions" else {"prompt": text}
    return call(w.server, "POST", f"/v1/{endpoint}", w.a.key, json=body | kw)


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_prompt_beyond_model_length_is_refused(world: World, endpoint: str) -> None:
    for words in (MAX_MODEL_LEN, MAX_MODEL_LEN * 50):  # past the limit in tokens, and far past it in characters
        err = assert_error_shape(_generate(world, endpoint, "hello " * words, max_tokens=1), 400)
        assert f"maximum context length is {MAX_MODEL_LEN}" in err["message"], err
    ok = _generate(world, endpoint, "Say hi.", max_tokens=2)  # positive control
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_max_tokens_beyond_model_length(world: World, endpoint: str) -> None:
    """Past the model length: a 400 naming max_tokens. Within it but past what the prompt leaves: capped
    to the room left (vLLM's rule), so prompt + completion never exceed the model length."""
    for max_tokens in (MAX_MODEL_LEN + 1, 10**9):
        err = assert_error_shape(_generate(world, endpoint, "Say hi.", max_tokens=max_tokens), 400)
        assert err["param"] == "max_tokens" and f"max_model_len={MAX_MODEL_LEN}" in err["message"], err
    for bad in (-1, "many", 1.5, 2**64):
        assert_error_shape(_generate(world, endpoint, "Say hi.", max_tokens=bad), 400)
    text = "hello " * (MAX_MODEL_LEN - 40)  # leaves a few tokens of room, so the capped generation is short
    r = _generate(world, endpoint, text, max_tokens=MAX_MODEL_LEN, ignore_eos=True, temperature=0)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert 0 < usage["completion_tokens"] and usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN, (
        usage
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"


# --- adapter names: nothing outside [A-Za-z0-9][A-Za-z0-9._-]{0,63} is ever stored ---

BAD_NAMES = {
    "dotdot-slash": "../x",
    "slash": "a/b",
    "backslash": "a\\b",
    "dotdot": "..",
    "dot": ".",
    "percent-dotdot": "%2e%2e",
    "percent-slash": "a%2Fb",
    "nul": "a\x00b",
    "newline": "a\nb",
    "trailing-newline": "secret\n",
    "tab": "a\tb",
    "escape": "a\x1b[31m",
    "del": "a\x7f",
    "empty": "",
    "space": " ",
    "leading-space": " x",
    "65-chars": "a" * 65,
    "cyrillic-s": "\u0455ecret",
    "fullwidth": "\uff53ecret",
    "zero-width": "sec\u200bret",
    "rtl-override": "abc\u202egpj",
    "at": "a@1",
    "leading-dash": "-x",
}


@pytest.mark.parametrize("label", list(BAD_NAMES))
def test_bad_adapter_names_are_refused_and_nothing_is_stored(world: World, label: str) -> None:
    w, name = world, BAD_NAMES[label]
    before = call(w.server, "GET", "/v1/adapters", w.b.key).json()
    data = encode(Adapter.random(w.spec, seed=110))
    r = upload(w.server, w.b.key, name, data)
    assert_error_shape(r, 400)
    assert r.json()["error"]["param"] == "name", r.text
    r = upload(w.server, ADMIN, name, data, path="/admin/adapters")
    assert_error_shape(r, 400)
    assert call(w.server, "GET", "/v1/adapters", w.b.key).json() == before
    quoted = "/v1/adapters/" + "".join(c if c.isascii() and c.isalnum() else quote(c, safe="") for c in name).replace(
        ".", "%2E"
    )
    for method, path in (("GET", quoted), ("GET", quoted + "/versions"), ("DELETE", quoted)):
        r = call(w.server, method, path, w.b.key)
        if name == "" and r.status_code == 307:  # "/v1/adapters/" is the list route, not a name
            assert r.headers["location"].endswith("/v1/adapters")
            continue
        assert_error_shape(r, (400, 404, 405))
    assert_a_intact(w)


def test_longest_valid_name_is_accepted(world: World) -> None:
    """Positive control for the name tests: 64 characters and the full alphabet are fine."""
    for name in ("a" * 64, "Ab9._-z"):
        r = upload(world.server, world.b.key, name, encode(Adapter.random(world.spec, seed=111)))
        assert r.status_code == 201 and r.json()["name"] == name, r.text
        assert call(world.server, "DELETE", f"/v1/adapters/{name}", world.b.key).status_code == 200


# --- numbers from the client: ASCII digits only (str.isdigit() and int() also take "¹", "١", "０") ---

BAD_VERSIONS = ["¹", "١", "０", "+1", " 1", "1_0", "-1", "0", "", "1.0", "2147483648", "9" * 30, "1" * 5000]


def assert_still_serving(w: World) -> None:
    assert call(w.server, "GET", "/health").status_code == 200
    ok = _generate(w, "chat/completions", "Say hi.", max_tokens=2)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None, ok.text


def test_adapter_versions_must_be_ascii_digits(world: World) -> None:
    """Found by fuzzing: `x@¹` passed `str.isdigit()`, then `int()` raised: a 500. A version past the
    stores' 32-bit INTEGER (or 4300 digits, int()'s limit) was one too."""
    w = world
    for v in BAD_VERSIONS:
        for method, path in (
            ("GET", f"/v1/adapters/secret@{quote(v)}"),
            ("GET", f"/v1/adapters/secret@{quote(v)}/versions"),
            ("DELETE", f"/v1/adapters/secret@{quote(v)}"),
        ):
            err = assert_error_shape(call(w.server, method, path, w.a.key), 400)
            assert (
                err["type"] == "invalid_request_error" and err["param"] == "name" and "ASCII digits" in err["message"]
            ), (v, err)
        for field in ("adapter", "model"):
            err = assert_error_shape(
                _generate(w, "chat/completions", "Say hi.", max_tokens=1, **{field: f"secret@{v}"}), 400
            )
            assert err["type"] == "invalid_request_error" and err["param"] == field, (v, err)
    assert_a_intact(w)  # the DELETEs above removed nothing
    for v in ("1", "01"):  # positive control: ASCII digits name the version
        assert call(w.server, "GET", f"/v1/adapters/secret@{v}", w.a.key).json()["version"] == 1
    assert_still_serving(w)


def test_malformed_content_length_is_a_400_not_a_crash(world: World) -> None:
    """Over a socket, uvicorn's HTTP parser refuses these itself (400, before our app); the app refuses
    them too, so another server or transport cannot reach `int()` with them."""
    import asyncio
    import json
    import socket

    from server.limits import BodyLimitMiddleware

    bad = ["¹".encode(), b"\xb9", "١".encode(), "０".encode(), b"1_0", b"+2", b"-2", b"0x2", b"9" * 5000]
    host, port = world.server.base.removeprefix("http://").split(":")
    for value in bad:
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v1/adapters HTTP/1.1\r\nhost: x\r\ncontent-length: " + value + b"\r\n\r\n{}")
            status = s.recv(4096).split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 400"), (value, status)

    async def through_middleware(value: bytes) -> tuple[list[dict], bool]:
        reached = False

        async def app(scope, receive, send) -> None:
            nonlocal reached
            reached = True
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async def receive() -> dict:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/adapters", "headers": [(b"content-length", value)]}
        await BodyLimitMiddleware(app, max_bytes=1024)(scope, receive, send)
        return sent, reached

    for value in bad + [b" 2", b"2 ", b""]:  # a server strips the spaces; ASGI does not promise it
        sent, reached = asyncio.run(through_middleware(value))
        assert not reached and sent[0]["status"] == 400, (value, sent)
        error = json.loads(sent[1]["body"])["error"]
        assert (
            set(error) == ERROR_KEYS
            and error["type"] == "invalid_request_error"
            and "Content-Length" in error["message"]
        )
    sent, reached = asyncio.run(through_middleware(b"2"))  # positive control
    assert reached and sent[0]["status"] == 200
    assert asyncio.run(through_middleware(b"4096"))[0][0]["status"] == 413
    assert_still_serving(world)


# --- structured outputs: a constraint the grammar compiler refuses, or that admits no output, is a 400 ---

SELF_REFERENCING = {  # JSON schemas whose recursion has no way out: no finite JSON value satisfies them
    "ref-root": {"$ref": "#"},
    "anyOf-self": {"anyOf": [{"$ref": "#"}]},
    "allOf-self": {"allOf": [{"$ref": "#"}]},
    "defs-cycle": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "required-self": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "nonempty-array-of-self": {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
}
LINKED_LIST = {  # recursive with a base case: accepted, and it must constrain the output
    "type": "object",
    "properties": {"value": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["value", "next"],
    "additionalProperties": False,
}


def _constrained(
    w: World,
    endpoint: str,
    carrier: str,
    *,
    schema: dict | None = None,
    text: str = "Say hi.",
    max_tokens: int = 4,
    **constraint,
) -> httpx.Response:
    """A generation constrained by `schema` (via `carrier`), or by other `structured_outputs` fields."""
    if schema is not None and carrier == "response_format":
        constraint = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    elif schema is not None:
        constraint = {"structured_outputs": {"json": schema}}
    else:
        constraint = {"structured_outputs": constraint}
    return _generate(w, endpoint, text, max_tokens=max_tokens, temperature=0, **constraint)


@pytest.mark.parametrize("carrier", ["response_format", "structured_outputs"])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_self_referencing_json_schema_is_refused(world: World, endpoint: str, carrier: str) -> None:
    """Found by fuzzing: {"$ref": "#"} compiled, then the engine's grammar rejected the first token: a 500.
    A required property of itself compiled too, and generation could never end."""
    for label, schema in SELF_REFERENCING.items():
        err = assert_error_shape(_constrained(world, endpoint, carrier, schema=schema), 400)
        assert err["type"] == "invalid_request_error" and err["param"] == carrier, (label, err)
        assert "admits no finite value" in err["message"], (label, err)
    assert_still_serving(world)


@pytest.mark.parametrize("carrier", ["response_format", "structured_outputs"])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_recursive_json_schema_with_a_base_case_constrains_the_output(
    world: World, endpoint: str, carrier: str
) -> None:
    """Positive control for the test above: recursion with a way out is accepted and honoured (the model,
    asked to repeat strings, must write integers), not dropped."""
    import json

    def is_list(v) -> bool:
        return (
            isinstance(v, dict)
            and set(v) == {"value", "next"}
            and type(v["value"]) is int
            and (v["next"] is None or is_list(v["next"]))
        )

    text = 'Repeat exactly this JSON: {"value": "one", "next": {"value": "two", "next": null}}\n'
    r = _constrained(world, endpoint, carrier, schema=LINKED_LIST, text=text, max_tokens=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert is_list(json.loads(choice.get("text") or choice["message"]["content"])), choice


COMPILER_REFUSES = {  # label -> (carrier, constraint, a part of the compiler's reason)
    "lookbehind-pattern": ("response_format", {"schema": {"type": "string", "pattern": "(?<=a)b"}}, "look-behind"),
    "missing-ref": ("response_format", {"schema": {"$ref": "#/$defs/nope"}}, "/$defs/nope"),
    "missing-ref-so": (
        "structured_outputs",
        {"schema": {"type": "object", "properties": {"a": {"$ref": "#/definitions/gone"}}}},
        "/definitions/gone",
    ),
    "bad-regex": ("structured_outputs", {"regex": "(ab"}, "unclosed group"),
    "bad-grammar": ("structured_outputs", {"grammar": "root ::= (("}, "Expected ')'"),
}


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_constraints_the_grammar_compiler_refuses_are_400s(world: World, endpoint: str) -> None:
    """vLLM's own 400 for these named no parameter: the field holding the constraint is named now."""
    for label, (carrier, constraint, reason) in COMPILER_REFUSES.items():
        if "schema" in constraint:
            r = _constrained(world, endpoint, carrier, schema=constraint["schema"])
        else:
            r = _constrained(world, endpoint, carrier, **constraint)
        err = assert_error_shape(r, 400)
        assert err["type"] == "invalid_request_error" and err["param"] == carrier, (label, err)
        assert reason in err["message"], (label, err)
    assert_still_serving(world)


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_refused_constraints_are_400s_when_streaming_too(world: World, endpoint: str) -> None:
    """Streaming, vLLM reported these as a 200 and then an error event; the server now looks at a stream's
    first event before answering, so they are the same 400 as without streaming."""
    for label, (carrier, constraint, reason) in COMPILER_REFUSES.items():
        if "schema" in constraint:
            constraint = (
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": constraint["schema"]},
                    }
                }
                if carrier == "response_format"
                else {"structured_outputs": {"json": constraint["schema"]}}
            )
        else:
            constraint = {"structured_outputs": constraint}
        r = _generate(world, endpoint, "Say hi.", max_tokens=4, temperature=0, stream=True, **constraint)
        err = assert_error_shape(r, 400)
        assert reason in err["message"], (label, err)
    assert_still_serving(world)
