"""The fine-tuning API from the client side: the SDK's `files` and `fine_tuning.jobs`, `aligner fine-tune ...`,
and the `/ui/fine-tune` page in a real headless Chromium.

Unit tests drive the SDK and the CLI through `httpx.MockTransport` (request shapes, `wait` and its event feed,
file content as bytes, exit codes). The rest share one real server whose training worker runs (each job is
8 chat examples, 1 epoch, batch 4: 2 optimizer steps): the SDK, the CLI and the page each train one adapter
and chat with it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

try:
    import aligner_client  # noqa: F401
except ImportError:  # not installed into the venv: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

from aligner_client import (
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    FineTuningJob,
    NotFoundError,
    WaitTimeoutError,
)
from aligner_client import _core as core
from aligner_client.cli import main as cli_main

QUESTION = "What is the capital of France?"


def training_lines(n: int = 8) -> bytes:
    """`n` chat examples of a pirate persona (2 optimizer steps at batch 4 for the default 8)."""
    prompts = ["Hello!", "How are you?", "What is 2+2?", "Name a colour.", "Where is Paris?", "Tell me a joke.",
               "What day is it?", "Who are you?"]  # fmt: skip
    rows = [
        {"messages": [{"role": "user", "content": prompts[i % len(prompts)]},
                      {"role": "assistant", "content": "Arr, matey! Ahoy there, ye landlubber, arr!"}]}
        for i in range(n)
    ]  # fmt: skip
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# =============================================================================================== unit: the SDK


def job_json(status: str = "queued", **kw) -> dict:
    return {
        "id": "ftjob-abc",
        "object": "fine_tuning.job",
        "created_at": 1700000000,
        "status": status,
        "model": "base:0123",
        "training_file": "file-1",
        "fine_tuned_model": None,
        "error": None,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    } | kw


def event_json(i: int, **kw) -> dict:
    return {"id": f"ftevent-{i}", "object": "fine_tuning.job.event", "created_at": 1700000000 + i,
            "level": "info", "message": f"event {i}", "type": "message", "data": {}} | kw  # fmt: skip


class FakeJobServer:
    """A MockTransport handler for one job: `polls` answers of GET job (each a status), the events written
    so far (newest first, `page` at a time), and the requests seen."""

    def __init__(self, statuses: list[str], page: int = 2) -> None:
        self.statuses, self.page = statuses, page
        self.requests: list[httpx.Request] = []
        self.events: list[dict] = []  # oldest first

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "base:0123", "object": "model"}]})
        if path == "/v1/files" and request.method == "POST":
            return httpx.Response(200, json={"id": "file-1", "object": "file", "bytes": len(request.content),
                                             "created_at": 1, "filename": "x.jsonl", "purpose": "fine-tune"})  # fmt: skip
        if path == "/v1/files/file-1/content":
            return httpx.Response(200, content=b'{"messages": []}\n', headers={"content-type": "application/jsonl"})
        if path == "/v1/fine_tuning/jobs" and request.method == "POST":
            return httpx.Response(200, json=job_json())
        if path == "/v1/fine_tuning/jobs/ftjob-abc":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            n = len(self.events)
            self.events.append(event_json(n, type="metrics", data={"step": n, "total_steps": 9, "train_loss": 1.0}))
            done = {"fine_tuned_model": "ft-x-abc"} if status == "succeeded" else {}
            if status == "failed":
                done = {"error": {"code": "training_failed", "message": "out of memory", "param": None}}
            return httpx.Response(200, json=job_json(status, **done))
        if path == "/v1/fine_tuning/jobs/ftjob-abc/events":
            newest = self.events[::-1]
            after = request.url.params.get("after")
            start = next(i for i, e in enumerate(newest) if e["id"] == after) + 1 if after else 0
            data = newest[start : start + self.page]
            body = {"object": "list", "data": data, "has_more": start + self.page < len(newest)}
            return httpx.Response(200, json=body)
        return httpx.Response(404, json={"error": {"message": "no", "code": "job_not_found", "type": "x"}})


def test_files_upload_is_multipart_with_purpose_and_content_is_bytes(tmp_path) -> None:
    fake = FakeJobServer(["queued"])
    c = Client("http://srv", "k", transport=httpx.MockTransport(fake))
    path = tmp_path / "pirate.jsonl"
    path.write_bytes(training_lines(2))
    f = c.files.create(path)
    assert (f.id, f.purpose) == ("file-1", "fine-tune")
    sent = fake.requests[-1]
    assert sent.headers["content-type"].startswith("multipart/form-data")
    assert b'name="purpose"\r\n\r\nfine-tune' in sent.content and b'filename="pirate.jsonl"' in sent.content
    assert c.files.create(b"{}\n").id == "file-1"
    assert b'filename="training.jsonl"' in fake.requests[-1].content  # bytes get a name
    assert c.files.content("file-1") == b'{"messages": []}\n'


def test_job_create_builds_openais_body() -> None:
    fake = FakeJobServer(["queued"])
    c = Client("http://srv", "k", transport=httpx.MockTransport(fake))
    job = c.fine_tuning.jobs.create("file-1", suffix="pirate", n_epochs=1, batch_size=4, aligner={"tokens": 2})
    assert isinstance(job, FineTuningJob) and job.status == "queued" and not job.finished
    assert [r.url.path for r in fake.requests] == ["/v1/models", "/v1/fine_tuning/jobs"]  # the base model first
    assert json.loads(fake.requests[-1].content) == {
        "model": "base:0123",
        "training_file": "file-1",
        "suffix": "pirate",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
        "aligner": {"tokens": 2},
    }
    c.fine_tuning.jobs.create("file-2", model="m", method="dpo", beta=0.2, seed=3, metadata={"k": "v"})
    assert json.loads(fake.requests[-1].content) == {
        "model": "m",
        "training_file": "file-2",
        "seed": 3,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        "metadata": {"k": "v"},
    }
    whole = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": "auto"}}}
    c.fine_tuning.jobs.create("file-3", model="m", method=whole)
    assert json.loads(fake.requests[-1].content)["method"] == whole
    sent = len(fake.requests)
    with pytest.raises(ValueError, match="method"):
        c.fine_tuning.jobs.create("file-1", method="rlhf")
    with pytest.raises(ValueError, match="not both"):
        c.fine_tuning.jobs.create("file-1", method=whole, n_epochs=2)
    assert len(fake.requests) == sent  # refused before anything was sent


def test_wait_polls_until_finished_and_feeds_each_event_once_oldest_first() -> None:
    fake = FakeJobServer(["queued", "running", "running", "succeeded"], page=2)  # pages of 2: read back
    sleeps: list[float] = []
    c = Client("http://srv", "k", transport=httpx.MockTransport(fake), sleep=sleeps.append)
    seen: list[str] = []
    job = c.fine_tuning.jobs.wait("ftjob-abc", poll_s=0.5, on_event=lambda e: seen.append(e.id))
    assert job.status == "succeeded" and job.fine_tuned_model == "ft-x-abc" and job.finished
    assert sleeps == [0.5, 0.5, 0.5]
    assert seen == [f"ftevent-{i}" for i in range(4)]  # every event, once, oldest first
    assert c.fine_tuning.jobs.wait("ftjob-abc").status == "succeeded"  # without on_event: no events asked for


def test_wait_returns_a_failed_job_and_times_out_with_the_last_seen() -> None:
    c = Client("http://srv", "k", transport=httpx.MockTransport(FakeJobServer(["failed"])), sleep=lambda s: None)
    job = c.fine_tuning.jobs.wait("ftjob-abc")
    assert job.status == "failed" and job.error is not None and job.error.code == "training_failed"
    c = Client("http://srv", "k", transport=httpx.MockTransport(FakeJobServer(["running"])), sleep=lambda s: None)
    with pytest.raises(WaitTimeoutError, match="still running") as e:
        c.fine_tuning.jobs.wait("ftjob-abc", timeout=0)
    assert e.value.job.status == "running"
    with pytest.raises(ValueError):
        c.fine_tuning.jobs.wait("ftjob-abc", poll_s=0)
    with pytest.raises(NotFoundError) as nf:
        c.fine_tuning.jobs.retrieve("ftjob-nope")
    assert nf.value.code == "job_not_found"


def test_async_wait_and_content() -> None:
    fake = FakeJobServer(["running", "succeeded"])
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def go():
        async with AsyncClient("http://srv", "k", transport=httpx.MockTransport(fake), sleep=sleep) as ac:
            seen: list[str] = []
            job = await ac.fine_tuning.jobs.wait("ftjob-abc", poll_s=0.25, on_event=lambda e: seen.append(e.id))
            return job, seen, await ac.files.content("file-1"), await ac.fine_tuning.jobs.create("file-1")

    job, seen, content, created = asyncio.run(go())
    assert job.status == "succeeded" and slept == [0.25] and seen == ["ftevent-0", "ftevent-1"]
    assert content.startswith(b"{") and created.id == "ftjob-abc"


def test_cli_create_wait_prints_events_then_the_model(tmp_path, capsys) -> None:
    fake = FakeJobServer(["running", "succeeded"])
    data = tmp_path / "d.jsonl"
    data.write_bytes(training_lines(2))
    c = Client("http://srv", "k", transport=httpx.MockTransport(fake), sleep=lambda s: None)
    argv = ["fine-tune", "create", "--file", str(data), "--suffix", "x", "--epochs", "1", "--tokens", "2", "--wait"]
    assert cli_main(argv, client=c) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"uploaded {data} as file-1") and out[1].startswith("created ftjob-abc (queued)")
    assert [line.split("  ", 1)[1] for line in out[2:-1]] == ["event 0", "event 1"]
    assert out[-1] == "ft-x-abc"
    body = json.loads(next(r for r in fake.requests if r.url.path == "/v1/fine_tuning/jobs").content)
    assert body["aligner"] == {"tokens": 2} and body["suffix"] == "x"


def test_cli_wait_on_a_failed_job_exits_1_with_its_error(capsys) -> None:
    c = Client("http://srv", "k", transport=httpx.MockTransport(FakeJobServer(["failed"])), sleep=lambda s: None)
    assert cli_main(["fine-tune", "wait", "ftjob-abc"], client=c) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == ("aligner-client: fine-tuning job ftjob-abc failed [training_failed]: out of memory")
    assert cli_main(["fine-tune", "create"], client=c) == 2  # --file or --training-file is required


def test_event_feed_pages_back_to_the_last_seen() -> None:
    feed = core.EventFeed("j", page_size=2)
    op = feed.poll()
    call = next(op)
    assert call.params == {"limit": 2, "after": None}
    page = core.m.FineTuningJobEventList.model_validate
    call = op.send(page({"data": [event_json(3), event_json(2)], "has_more": True}))
    assert call.params == {"limit": 2, "after": "ftevent-2"}
    with pytest.raises(StopIteration) as done:
        op.send(page({"data": [event_json(1), event_json(0)], "has_more": False}))
    assert [e.id for e in done.value.value] == ["ftevent-0", "ftevent-1", "ftevent-2", "ftevent-3"]
    op = feed.poll()
    next(op)
    with pytest.raises(StopIteration) as done:
        op.send(page({"data": [event_json(4), event_json(3)], "has_more": True}))  # stops at a seen one
    assert [e.id for e in done.value.value] == ["ftevent-4"]


# =============================================================================================== a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support import serve

    yield from serve(tmp_path_factory.mktemp("fine-tune"), env={"ALIGNER_FINETUNE_WORKERS": "1"})


@pytest.fixture(scope="module")
def base_model():
    from support import real_model

    return real_model().spec.identity


@pytest.mark.server
def test_sdk_files_and_a_job_end_to_end(server, base_model) -> None:
    """Upload, list, read back; a 2-step job waited for (every step's loss seen), its checkpoint, a chat with
    `model=<fine_tuned_model>`; a second job cancelled while queued; errors as the API names them."""
    c = Client(server.base, max_retries=0)
    data = training_lines(8)
    f = c.files.create(data)
    assert (f.purpose, f.bytes, f.filename, f.object) == ("fine-tune", len(data), "training.jsonl", "file")
    assert f.id in [x.id for x in c.files.list(purpose="fine-tune")]
    assert c.files.retrieve(f.id).bytes == len(data) and c.files.content(f.id) == data
    with pytest.raises(BadRequestError, match="line 2") as bad:
        c.files.create(data[: data.index(b"\n") + 1] + b'{"messages": "nope"}\n')
    assert bad.value.param == "file"

    jobs = c.fine_tuning.jobs
    job = jobs.create(f.id, suffix="sdk", n_epochs=1, batch_size=4)
    assert job.model == base_model and job.status in ("validating_files", "queued", "running")
    assert job.hyperparameters == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 1.0}
    other = jobs.create(f.id, n_epochs=1, batch_size=4)  # the one worker is busy with `job`: this one waits
    cancelled = jobs.cancel(other.id)
    assert cancelled.status in ("cancelled", "running")
    assert {j.id for j in jobs.list(limit=10)} >= {job.id, other.id}

    seen: list = []
    done = jobs.wait(job.id, poll_s=1, timeout=600, on_event=seen.append)
    assert done.status == "succeeded", (done.error, server.log_tail())
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("ft-sdk-") and done.finished_at
    metrics = [e.data for e in seen if e.type == "metrics"]
    assert [(m["step"], m["total_steps"]) for m in metrics] == [(1, 2), (2, 2)]
    assert all(m["train_loss"] > 0 and m["learning_rate"] > 0 for m in metrics)
    assert [e.id for e in jobs.list_events(job.id, limit=100)] == [e.id for e in seen][::-1]  # newest first
    checkpoints = jobs.checkpoints(job.id).data
    assert checkpoints and checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].step_number == 2

    reply = c.chat.create(QUESTION, model=done.fine_tuned_model, max_tokens=12, temperature=0)
    assert reply.text and reply.model == done.fine_tuned_model
    assert jobs.wait(other.id, poll_s=1, timeout=120).status == "cancelled"
    with pytest.raises(ConflictError):
        jobs.cancel(job.id)
    with pytest.raises(NotFoundError) as nf:
        jobs.retrieve("ftjob-nope")
    assert nf.value.code == "job_not_found"

    async def go():
        async with AsyncClient(server.base, max_retries=0) as ac:
            return await ac.fine_tuning.jobs.retrieve(job.id), await ac.files.list(limit=1)

    again, files = asyncio.run(go())
    assert again.fine_tuned_model == done.fine_tuned_model and len(files) == 1 and files.has_more is not None
    assert c.files.delete(f.id).deleted
    with pytest.raises(NotFoundError):
        c.files.retrieve(f.id)


@pytest.mark.server
def test_aligner_fine_tune_create_wait_then_chat(server, tmp_path, capsys, monkeypatch) -> None:
    """`aligner fine-tune create --file ... --wait` (the server's `aligner` command, dispatching to the client):
    the steps' losses as they come, the model's name last; then list, events, cancel of a finished job."""
    from server import cli

    monkeypatch.setenv("ALIGNER_BASE_URL", server.base)
    monkeypatch.delenv("ALIGNER_API_KEY", raising=False)
    path = tmp_path / "pirate.jsonl"
    path.write_bytes(training_lines(8))
    argv = ["fine-tune", "create", "--file", str(path), "--suffix", "cli", "--epochs", "1", "--batch-size", "4"]
    assert cli.main([*argv, "--wait", "--poll", "1"]) == 0, server.log_tail()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"uploaded {path} as file-")
    job_id = out[1].split()[1]
    assert out[1].startswith(f"created {job_id} (") and "supervised" in out[1]
    steps = [line for line in out if "Step " in line]
    assert len(steps) == 2 and "Step 1/2: training loss=" in steps[0] and "Step 2/2" in steps[1]
    model = out[-1]
    assert model.startswith("ft-cli-")

    assert cli.main(["chat", "--model", model, "--max-tokens", "8", QUESTION]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["fine-tune", "list", "--json"]) == 0
    listed = {j["id"]: j for j in json.loads(capsys.readouterr().out)}
    assert listed[job_id]["status"] == "succeeded" and listed[job_id]["fine_tuned_model"] == model
    assert cli.main(["fine-tune", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["ID", "STATUS"] and any(job_id in row and model in row for row in table)
    assert cli.main(["fine-tune", "events", job_id]) == 0
    events = capsys.readouterr().out
    assert "Step 2/2" in events and events.index("Step 1/2") < events.index("Step 2/2")  # oldest first
    assert cli.main(["fine-tune", "cancel", job_id]) == 1
    assert "409" in capsys.readouterr().err


# =============================================================================================== the page


@pytest.fixture(scope="module")
def browser():
    from test_playground import start_chromium

    yield from start_chromium()


@pytest.mark.server
def test_fine_tune_page_trains_draws_the_loss_and_chats_side_by_side(server, browser, base_model, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from test_playground import wait_until

    path = tmp_path / "pirate.jsonl"
    path.write_bytes(training_lines(8))
    browser.get(server.base + "/ui/fine-tune")
    wait_until(lambda: base_model in browser.find_element(By.ID, "model").text)
    assert browser.find_element(By.CSS_SELECTOR, "header a").get_attribute("href").endswith("/ui")

    browser.find_element(By.ID, "upload-file").send_keys(str(path))
    browser.find_element(By.CSS_SELECTOR, "#upload button").click()
    wait_until(lambda: "uploaded file-" in browser.find_element(By.ID, "upload-status").text)
    assert browser.find_element(By.ID, "training-file").get_attribute("value").startswith("file-")

    Select(browser.find_element(By.ID, "method")).select_by_value("supervised")
    for field, value in (("epochs", "1"), ("batch-size", "4"), ("suffix", "page")):
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "start").click()
    wait_until(lambda: "started ftjob-" in browser.find_element(By.ID, "create-status").text)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#loss-chart circle.train_loss"), timeout=300)
    wait_until(lambda: browser.find_element(By.ID, "job-status").text == "succeeded", timeout=300)
    points = browser.find_elements(By.CSS_SELECTOR, "#loss-chart circle.train_loss")
    assert len(points) == 2 and browser.find_elements(By.CSS_SELECTOR, "#loss-chart polyline.series-train_loss")
    assert "Step 2/2" in browser.find_element(By.ID, "events").text
    model = browser.find_element(By.ID, "fine-tuned-model").text
    assert model.startswith("ft-page-")

    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("16")
    browser.find_element(By.ID, "send").click()
    wait_until(lambda: browser.find_element(By.ID, "chat-status").text == "done", timeout=120)
    base, tuned = browser.find_element(By.ID, "out-base").text, browser.find_element(By.ID, "out-tuned").text
    browser.save_screenshot(str(tmp_path / "fine-tune.png"))
    assert base in api_answer(server, base_model) and tuned in api_answer(server, model)
    assert base and tuned and "error" not in tuned


def api_answer(server, model: str) -> tuple[str, str]:
    """The API's own greedy answer (as sent and stripped) to the page's question at 16 tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    return text, text.strip()
