"""Faults against a real server process: client disconnects, a dying engine core, SIGKILL during an
upload, and PostgreSQL going away and coming back."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import httpx
import psutil
import pytest
from store_contract.support import postgres_url_or_skip, throwaway_database
from support import Server, real_model, record

from aligner_core.adapter_format import Adapter, encode

pytestmark = pytest.mark.server

QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.base + "/metrics", timeout=10).text
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))


def upload(server: Server, name: str, adapter: Adapter) -> httpx.Response:
    return httpx.post(
        server.base + "/v1/adapters", files={"file": ("a", encode(adapter))}, data={"name": name}, timeout=30
    )


@pytest.fixture
def server(tmp_path):
    srv = Server(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


def test_client_disconnect_aborts_and_releases_the_adapter(server) -> None:
    """A client that leaves mid-stream: the lease is held while the stream runs and released (the request
    aborted) within seconds of the disconnect.

    The "held while it runs" check needs the stream still running when /metrics is read. On a heavily
    loaded machine the server can finish all 900 tokens before this process reads its fourth event (CI saw
    it once), so an attempt whose stream turns out to have run to its end is tried again (at most 3); a
    lease released early fails every attempt."""
    assert upload(server, "talker", Adapter.random(real_model().spec, tokens=1, seed=71)).status_code == 201
    body = {"messages": QUESTION, "max_tokens": 900, "stream": True, "adapter": "talker", "ignore_eos": True}
    finished_early = []
    for _attempt in range(3):
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()  # held: a dropped iterator would close the connection
            events = []
            while len(events) < 4 and "data: [DONE]" not in events:  # a few content chunks of the 900 tokens
                line = next(lines)
                if line.startswith("data: "):
                    events.append(line)
            in_flight = metric(server, "aligner_adapter_requests_in_flight")
            assert '"error"' not in "".join(events), f"{events=}\n{server.log_tail()}"
            if in_flight == 1:
                break  # leave the with-block: the client disconnects mid-stream
            rest = [line for line in lines if line.startswith("data: ")]  # the stream's end, if it has one
            assert rest and rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(rest), (
                f"the lease was released while the stream ran: {in_flight=} {events=} {rest[-3:]=}\n{server.log_tail()}"
            )
            finished_early.append(len(rest))
    else:
        raise AssertionError(f"each attempt's stream ended before /metrics was read: {finished_early=}")
    # the connection is closed after a handful of the 900 tokens
    closed = time.monotonic()
    deadline = closed + 10
    while metric(server, "aligner_adapter_requests_in_flight") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "aligner_adapter_requests_in_flight") == 0
    record(
        "client_disconnect",
        released_after_s=round(time.monotonic() - closed, 2),
        max_tokens=900,
        attempts=len(finished_early) + 1,
    )
    text = httpx.get(server.base + "/metrics").text
    running = [l for l in text.splitlines() if l.startswith("vllm:num_requests_running")]
    assert all(float(l.split()[-1]) == 0 for l in running)  # aborted in the engine too (if vLLM exports it)
    assert httpx.get(server.base + "/health").status_code == 200


def test_engine_core_death_fails_health_and_exits_nonzero(server) -> None:
    proc = psutil.Process(server.proc.pid)
    cores = [
        p for p in proc.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
    ]
    assert cores, [(p.pid, p.name(), p.cmdline()[:3]) for p in proc.children(recursive=True)]
    assert httpx.get(server.base + "/health").status_code == 200
    for p in cores:
        p.kill()
    t0 = time.monotonic()
    health_failed = None
    while server.proc.poll() is None and time.monotonic() - t0 < 30:
        try:
            ok = httpx.get(server.base + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        if not ok and health_failed is None:
            health_failed = time.monotonic() - t0
        time.sleep(0.05)
    code = server.proc.wait(timeout=30)
    exited = time.monotonic() - t0
    record(
        "engine_core_death",
        health_failed_after_s=health_failed and round(health_failed, 2),
        exited_after_s=round(exited, 2),
        exit_code=code,
    )
    assert code != 0
    assert health_failed is not None and health_failed < 5
    assert exited < 30


def test_sigkill_during_upload_leaves_nothing_half_written(tmp_path) -> None:
    srv = Server(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "server.log")
    srv.start()
    data = encode(Adapter.random(real_model().spec, tokens=4, seed=72))
    boundary = "xyzzy"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhalf\r\n--{boundary}\r\n'
        f'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + data + tail
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(
        (
            f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[: len(body) // 2]
    )
    time.sleep(0.5)
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    sock.close()
    srv.start()
    try:
        assert httpx.get(srv.base + "/v1/adapters/half").status_code == 404
        assert httpx.get(srv.base + "/v1/adapters").json()["data"] == []
        assert upload(srv, "half", Adapter.random(real_model().spec, tokens=4, seed=72)).json()["version"] == 1
        record(
            "sigkill_during_upload", bytes_sent_before_kill=len(body) // 2, visible_after_restart=0, reupload_version=1
        )
    finally:
        srv.stop()


def _pg_cluster(action: str) -> None:
    version = subprocess.run(
        "ls /usr/lib/postgresql | sort -n | tail -1", shell=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["pg_ctlcluster", version, "main", action], check=True)


def test_postgres_outage_is_503_then_recovers(tmp_path) -> None:
    base_url = postgres_url_or_skip()
    spec = real_model().spec
    with throwaway_database(base_url) as url:
        srv = Server(url, tmp_path / "server.log")
        srv.start()
        try:
            assert upload(srv, "kept", Adapter.random(spec, tokens=1, seed=73)).status_code == 201
            chat = {"messages": QUESTION, "max_tokens": 8, "temperature": 0, "adapter": "kept"}
            before = httpx.post(srv.base + "/v1/chat/completions", json=chat, timeout=60).json()
            _pg_cluster("stop")
            try:
                r = upload(srv, "new", Adapter.random(spec, tokens=1, seed=74))
                assert (
                    r.status_code == 503
                    and r.headers.get("retry-after")
                    and r.json()["error"]["code"] == "store_unavailable"
                )
                assert httpx.get(srv.base + "/v1/adapters", timeout=30).status_code == 503
                during = httpx.post(srv.base + "/v1/chat/completions", json=chat, timeout=60)
                assert during.status_code == 200, during.text  # resident adapter, cached name: generation goes on
                assert during.json()["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
                retry_after = r.headers["retry-after"]
            finally:
                _pg_cluster("start")
            restarted = time.monotonic()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if upload(srv, "new", Adapter.random(spec, tokens=1, seed=74)).status_code == 201:
                        break
                time.sleep(1)
            else:
                pytest.fail("the store did not recover after PostgreSQL came back")
            recovered = time.monotonic() - restarted
            names = [a["name"] for a in httpx.get(srv.base + "/v1/adapters").json()["data"]]
            assert names == ["kept", "new"]  # nothing written before was lost
            record(
                "postgres_outage",
                store_status=503,
                retry_after=retry_after,
                generation_during_outage=200,
                recovered_after_db_start_s=round(recovered, 2),
                adapters_after=names,
            )
        finally:
            srv.stop()
