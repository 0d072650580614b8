"""Two server processes sharing one PostgreSQL store: changes made through one are seen by the other
within a second, through the store's change feed (LISTEN/NOTIFY) rather than polling."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from store_contract.support import postgres_url_or_skip, throwaway_database
from support import Server, real_model

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    with throwaway_database(postgres_url_or_skip()) as url:
        servers = [Server(url, tmp / f"replica{i}.log") for i in (1, 2)]
        try:
            for s in servers:
                s.start()
            yield servers
        finally:
            for s in servers:
                s.stop()


def chat(server, adapter: str) -> httpx.Response:
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0, "adapter": adapter}
    return httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)


def wait_for(check, timeout: float = 1.0) -> float:
    """Seconds until check() is true; fails past the timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if check():
            return time.perf_counter() - t0
        time.sleep(0.01)
    pytest.fail(f"not propagated within {timeout} s")


def test_changes_propagate_between_replicas(replicas) -> None:
    r1, r2 = replicas
    spec = real_model().spec
    v1, v2 = (Adapter.random(spec, tokens=1, seed=s, gate_scale=0.08) for s in (61, 62))
    assert chat(r2, "shared").status_code == 404  # r2 caches "not found" for this name
    visible = lambda: httpx.get(r2.base + "/v1/adapters/shared").status_code == 200  # noqa: E731

    up = httpx.post(r1.base + "/v1/adapters", files={"file": ("a", encode(v1))}, data={"name": "shared"})
    assert up.status_code == 201
    created = wait_for(visible)
    assert chat(r2, "shared").status_code == 200
    assert httpx.get(r2.base + "/v1/adapters/shared").json()["sha256"] == v1.sha256()

    httpx.post(r1.base + "/v1/adapters", files={"file": ("a", encode(v2))}, data={"name": "shared"})
    overwritten = wait_for(lambda: httpx.get(r2.base + "/v1/adapters/shared").json()["version"] == 2)
    assert (
        chat(r2, "shared").json()["choices"][0]["message"]["content"]
        == chat(r1, "shared").json()["choices"][0]["message"]["content"]
    )

    assert httpx.delete(r1.base + "/v1/adapters/shared").status_code == 200
    deleted = wait_for(lambda: not visible())
    assert chat(r2, "shared").status_code == 404

    figures = {"create_s": created, "overwrite_s": overwritten, "delete_s": deleted}
    print("\n[replicas] " + json.dumps(figures))
