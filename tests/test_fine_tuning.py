"""Fine-tuning through the API, end to end: the official `openai` client against a real multi-tenant server
with its training worker, on SmolLM2.

files.create -> fine_tuning.jobs.create (a few steps) -> retrieve / list_events until succeeded -> chat with
`model=job.fine_tuned_model`, token for token against the HF reference with the produced weights; the same
for DPO; bad files; another tenant's ids; cancel mid-run; a server restart mid-run (the job is handed back
and runs again after the restart, once).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from support import Generation, Server, parity, real_model

from aligner_core.adapter_format import decode

ADMIN = "admin-secret-ft"
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
pytestmark = pytest.mark.server
FINISHED = ("succeeded", "failed", "cancelled")


def chat_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / "pirate.jsonl").read_text().splitlines()[:n]]


def preference_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "safety_dpo.jsonl").read_text().splitlines()[:n]]
    return [
        {
            "input": {"messages": [{"role": "user", "content": r["prompt"]}]},
            "preferred_output": [{"role": "assistant", "content": r["chosen"]}],
            "non_preferred_output": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fine_tuning")
    env = {
        "ALIGNER_ADMIN_KEY": ADMIN,
        "ALIGNER_FINETUNE_WORKERS": "1",
        "ALIGNER_FINETUNE_THREADS": "2",
        "ALIGNER_FINETUNE_LEASE_SECONDS": "8",
        "ALIGNER_MAX_FILE_BYTES": "200000",
    }
    srv = Server(f"sqlite:///{tmp / 'store.db'}", tmp / "server.log", env=env)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def admin(server, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, server.base + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60, **kw)


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    """alice and bob: tenant name -> API key."""
    out = {}
    for name in ("alice", "bob"):
        tid = admin(server, "POST", "/admin/tenants", json={"name": name}).json()["id"]
        out[name] = admin(server, "POST", f"/admin/tenants/{tid}/keys").json()["key"]
    return out


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=120)


def wait(c: openai.OpenAI, job_id: str, until=FINISHED, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


def steps_seen(c: openai.OpenAI, job_id: str) -> list[int]:
    events = c.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return sorted(e.data["step"] for e in events if e.type == "metrics")


def served_adapter(server, key: str, name: str):
    r = httpx.get(f"{server.base}/v1/adapters/{name}/content", headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert r.status_code == 200, r.text
    return decode(r.content)


@pytest.fixture(scope="module")
def hf():
    from aligner_core.reference import load_hf_model

    return load_hf_model(str(real_model().path))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model().path)


def check_served_like_reference(server, key, name, hf, tokenizer) -> None:
    """Greedy tokens of `model=name` through the openai client equal the HF reference with the job's weights,
    and differ in logprobs from the base model (the adapter really acts)."""
    c = client(server, key)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the moon."}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)

    def complete(model: str) -> Generation:
        r = c.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        lp = r.choices[0].logprobs
        return Generation(prompt, [int(t.removeprefix("token_id:")) for t in lp.tokens], lp.token_logprobs)

    adapter = served_adapter(server, key, name)
    tuned, base = complete(name), complete(real_model().spec.identity)
    p = parity(hf, adapter, tuned)
    assert p.matched == p.total, (
        f"{name}: diverged from the HF reference at token {p.matched} (diff {p.max_logprob_diff})"
    )
    assert tuned.logprobs != base.logprobs
    chat = c.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert chat.model == name and chat.choices[0].message.content


def test_supervised_job_from_file_to_served_adapter(server, keys, hf, tokenizer) -> None:
    c = client(server, keys["alice"])
    f = c.files.create(file=("pirate.jsonl", jsonl(chat_rows(8))), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes > 0 and f.id.startswith("file-")
    base_id = c.models.list().data[0].id
    t0 = time.monotonic()
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        validation_file=c.files.create(file=("val.jsonl", jsonl(chat_rows(12)[8:])), purpose="fine-tune").id,
        model=base_id,
        suffix="pirate",
        seed=3,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}},
        },
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    done = wait(c, job.id)
    took = time.monotonic() - t0
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("ft-pirate-") and done.trained_tokens > 0
    assert steps_seen(c, job.id) == [1, 2]
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("The job has successfully completed")  # newest first
    assert any("valid_loss" in e.data for e in events if e.type == "metrics")
    (ckpt,) = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpt.fine_tuned_model_checkpoint == done.fine_tuned_model and ckpt.step_number == 2
    assert any(j.id == job.id for j in c.fine_tuning.jobs.list().data)
    print(f"\nsupervised job: create -> succeeded in {took:.1f} s")
    check_served_like_reference(server, keys["alice"], done.fine_tuned_model, hf, tokenizer)
    # bob sees none of it: files, job, events, checkpoints, the adapter
    b = client(server, keys["bob"])
    for call in (
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.delete(f.id),
        lambda: b.fine_tuning.jobs.retrieve(job.id),
        lambda: b.fine_tuning.jobs.list_events(job.id),
        lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: b.fine_tuning.jobs.cancel(job.id),
        lambda: b.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "x"}]),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):  # bob cannot train on alice's file either
        b.fine_tuning.jobs.create(training_file=f.id, model=base_id)
    assert b.files.list().data == [] and b.fine_tuning.jobs.list().data == []


def test_dpo_job_trains_a_preference_adapter(server, keys, hf, tokenizer) -> None:
    c = client(server, keys["alice"])
    f = c.files.create(file=("prefs.jsonl", jsonl(preference_rows(8))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model=c.models.list().data[0].id,
        suffix="safety",
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "beta": 0.2}}},
        extra_body={"aligner": {"tokens": 1, "start_layer": 2}},
    )
    done = wait(c, job.id)
    assert done.status == "succeeded", done.error
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.2
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert all("train_reward_accuracy" in e.data for e in events if e.type == "metrics")
    # DPO from zero gates moves little in two steps: the served tokens still must be the reference's
    adapter = served_adapter(server, keys["alice"], done.fine_tuned_model)
    assert adapter.tokens == 1 and adapter.start_layer == 2 and float(adapter.gate.abs().max()) > 0
    check_served_like_reference(server, keys["alice"], done.fine_tuned_model, hf, tokenizer)


BAD_FILES = [
    (b"not json\n", 400, "line 1: not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 400, "line 1: no assistant message"),
    (b'{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}\n', 400, "messages[0].role"),
    (jsonl(chat_rows(2)) + b'{"messages": "nope"}\n', 400, "line 3:"),
    (jsonl(chat_rows(1) + preference_rows(1)), 400, "line 2: a preference example in a file of chat"),
    (b"", 400, "no examples"),
    (b"\n\n", 400, "no examples"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    (jsonl(chat_rows(1)) * 2000, 413, "ALIGNER_MAX_FILE_BYTES"),
]


@pytest.mark.parametrize(("content", "status", "message"), BAD_FILES)
def test_bad_files_are_refused_naming_the_line_and_store_nothing(server, keys, content, status, message) -> None:
    headers = {"authorization": f"Bearer {keys['bob']}"}
    before = httpx.get(server.base + "/v1/files", headers=headers).json()["data"]
    r = httpx.post(
        server.base + "/v1/files",
        headers=headers,
        files={"file": ("bad.jsonl", content)},
        data={"purpose": "fine-tune"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"], r.json()
    assert httpx.get(server.base + "/v1/files", headers=headers).json()["data"] == before


def test_wrong_purpose_and_mismatched_method_are_400(server, keys) -> None:
    c = client(server, keys["bob"])
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("a.jsonl", jsonl(chat_rows(2))), purpose="assistants")
    assert e.value.body["param"] == "purpose"
    f = c.files.create(file=("a.jsonl", jsonl(chat_rows(2))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(training_file=f.id, model=c.models.list().data[0].id, method={"type": "dpo"})
    assert e.value.body["param"] == "training_file" and "chat" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(
            training_file=f.id,
            model=c.models.list().data[0].id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
        )
    assert e.value.body["param"] == "method.supervised.hyperparameters.n_epochs"
    c.files.delete(f.id)


def _long_job(c: openai.OpenAI, suffix: str):
    f = c.files.create(file=(f"{suffix}.jsonl", jsonl(chat_rows(64))), purpose="fine-tune")
    return c.fine_tuning.jobs.create(
        training_file=f.id,
        model=c.models.list().data[0].id,
        suffix=suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )


def _until_a_step(c: openai.OpenAI, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not steps_seen(c, job_id):
        assert time.monotonic() < deadline, "no training step reported in time"
        time.sleep(0.5)


def test_cancel_mid_run_stops_the_job_and_stores_no_adapter(server, keys) -> None:
    c = client(server, keys["alice"])
    job = _long_job(c, "cancelme")  # 32 steps
    _until_a_step(c, job.id)
    assert c.fine_tuning.jobs.cancel(job.id).status == "running"  # cancel requested; the worker stops it
    done = wait(c, job.id, timeout=120)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    assert len(steps_seen(c, job.id)) < 32
    with pytest.raises(openai.ConflictError):
        c.fine_tuning.jobs.cancel(job.id)
    names = [
        a["name"]
        for a in httpx.get(server.base + "/v1/adapters", headers={"authorization": f"Bearer {keys['alice']}"}).json()[
            "data"
        ]
    ]
    assert not any(n.startswith("ft-cancelme") for n in names)


def test_a_server_restart_mid_run_requeues_the_job_which_then_runs_once(server, keys) -> None:
    c = client(server, keys["alice"])
    f = c.files.create(file=("restart.jsonl", jsonl(chat_rows(24))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model=c.models.list().data[0].id,
        suffix="restart",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
    )  # 6 steps
    _until_a_step(c, job.id)
    server.stop()  # SIGTERM: the worker hands its job back
    server.start()
    c = client(server, keys["alice"])
    done = wait(c, job.id)
    assert done.status == "succeeded", done.error
    events = c.fine_tuning.jobs.list_events(job.id, limit=1000).data
    messages = [e.message for e in reversed(events)]
    assert sum(m.startswith("Fine-tuning job started") for m in messages) == 2
    assert any("queued again" in m for m in messages)
    # the second run starts from step 1 and reports each step once after the restart
    after = messages[max(i for i, m in enumerate(messages) if m.startswith("Fine-tuning job started")) :]
    assert [m.split(":")[0] for m in after if m.startswith("Step ")] == [f"Step {i}/6" for i in range(1, 7)]
    assert done.attempts == 1  # a graceful hand-back does not count as a failed attempt
    succeeded = [j for j in c.fine_tuning.jobs.list(limit=100).data if j.id == job.id]
    assert len(succeeded) == 1 and succeeded[0].fine_tuned_model == done.fine_tuned_model


def test_metrics_show_jobs_by_status_and_the_queue(server, keys) -> None:
    text = admin(server, "GET", "/metrics").text
    assert 'aligner_finetune_jobs{status="succeeded"}' in text
    assert "aligner_finetune_queue_length" in text and "aligner_finetune_steps_per_second" in text


# ------------------------------------------------------------------------------ workers on one queue


def _queue_jobs(url: str, count: int, *, rows: int, epochs: int) -> tuple[str, list[str]]:
    """A tenant with `count` jobs queued straight in the store (each `rows` examples x `epochs`, batch 4)."""
    import asyncio

    from adapters_store import NewFile, NewJob, NewJobEvent, open_store
    from server.fine_tuning import JobCreate, plan_job
    from server.training_files import parse

    spec = real_model().spec
    data = jsonl(chat_rows(rows))

    async def main() -> tuple[str, list[str]]:
        async with open_store(url) as store:
            tenant = await store.ensure_tenant("replicas")
            parsed = parse(data)
            f = await store.create_file(
                tenant.id, NewFile("q.jsonl", "fine-tune", parsed.format, len(parsed.rows), data)
            )
            body = JobCreate(
                model=spec.identity,
                training_file=f.id,
                method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": 4}}},
            )
            plan = plan_job(
                body, spec=spec, served={spec.identity}, training=f, validation=None, max_tokens=16, max_steps=2000
            )
            ids = []
            for _ in range(count):
                job = await store.create_job(
                    tenant.id, NewJob(spec.identity, f.id, None, plan, 100), [NewJobEvent("queued")]
                )
                ids.append(job.id)
            return tenant.id, ids

    return asyncio.run(main())


def _jobs(url: str, tenant_id: str, ids: list[str]):
    import asyncio

    from adapters_store import open_store

    async def main():
        async with open_store(url) as store:
            out = []
            for i in ids:
                events = (await store.list_job_events(tenant_id, i, limit=1000)).items
                out.append((await store.get_job(tenant_id, i), [e.message for e in reversed(events)]))
            return out

    return asyncio.run(main())


def _worker(url: str, name: str, log: Path, **env: str):
    import os
    import subprocess
    import sys

    env = {"ALIGNER_STORE": url, "ALIGNER_FINETUNE_THREADS": "1"} | env
    return subprocess.Popen(
        [sys.executable, "-m", "server.finetune_worker", "--id", name],
        env=os.environ | env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def pg_url():
    from store_contract.support import postgres_url_or_skip, throwaway_database

    with throwaway_database(postgres_url_or_skip()) as url:
        yield url


def test_two_replicas_workers_share_one_postgres_queue_and_run_each_job_once(pg_url, tmp_path) -> None:
    tenant, ids = _queue_jobs(pg_url, 6, rows=4, epochs=1)  # 6 one-step jobs
    workers = [_worker(pg_url, f"replica{i}", tmp_path / f"w{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 600
        while True:
            jobs = _jobs(pg_url, tenant, ids)
            if all(j.status in FINISHED for j, _ in jobs) or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        for w in workers:
            w.terminate()
            w.wait(60)
    logs = "".join((tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2))
    assert [j.status for j, _ in jobs] == ["succeeded"] * 6, logs
    for job, messages in jobs:
        assert job.attempts == 1 and sum(m == "Fine-tuning job started" for m in messages) == 1, messages
    by = {j.worker_id for j, _ in jobs}
    assert by <= {"replica0", "replica1"}
    print(f"\njobs per worker: {[sum(j.worker_id == w for j, _ in jobs) for w in sorted(by)]}")
    assert len({j.fine_tuned_model for j, _ in jobs}) == 6


def test_a_killed_worker_loses_its_lease_and_the_job_runs_again_elsewhere(pg_url, tmp_path) -> None:
    """SIGKILL mid-run (no hand-back): after the lease the next worker requeues the job and runs it; the
    dead worker's claim counts as an attempt."""
    import signal

    tenant, (job_id,) = _queue_jobs(pg_url, 1, rows=16, epochs=2)  # 8 steps
    lease = {"ALIGNER_FINETUNE_LEASE_SECONDS": "6"}
    first = _worker(pg_url, "doomed", tmp_path / "a.log", **lease)
    deadline = time.monotonic() + 300
    while not any(m.startswith("Step ") for m in _jobs(pg_url, tenant, [job_id])[0][1]):
        assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
        time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = _worker(pg_url, "heir", tmp_path / "b.log", **lease)
    try:
        deadline = time.monotonic() + 600
        while (job := _jobs(pg_url, tenant, [job_id])[0])[0].status not in FINISHED:
            assert time.monotonic() < deadline, (tmp_path / "b.log").read_text()[-2000:]
            time.sleep(1)
    finally:
        second.terminate()
        second.wait(60)
    record, messages = job
    assert record.status == "succeeded" and record.worker_id == "heir" and record.attempts == 2, messages
    assert any("stopped; queued again" in m for m in messages), messages
    assert sum(m == "Fine-tuning job started" for m in messages) == 2


def test_the_objects_validate_as_the_openai_sdks_own_types(server, keys) -> None:
    """Every field the official SDK's types require is there with its type (pydantic validation, not the
    SDK's lenient construct)."""
    from openai.types import FileDeleted, FileObject
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    headers = {"authorization": f"Bearer {keys['alice']}"}

    def get(path: str) -> dict:
        r = httpx.get(server.base + path, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    jobs = get("/v1/fine_tuning/jobs?limit=100")
    assert jobs["object"] == "list" and jobs["data"] and jobs["has_more"] is False
    for j in jobs["data"]:
        FineTuningJob.model_validate(j, strict=False)
        assert j == get(f"/v1/fine_tuning/jobs/{j['id']}")
        for e in get(f"/v1/fine_tuning/jobs/{j['id']}/events?limit=1000")["data"]:
            FineTuningJobEvent.model_validate(e)
        for c in get(f"/v1/fine_tuning/jobs/{j['id']}/checkpoints")["data"]:
            FineTuningJobCheckpoint.model_validate(c)
    files = get("/v1/files")["data"]
    for f in files:
        FileObject.model_validate(f)
    one = client(server, keys["alice"]).files.create(file=("x.jsonl", jsonl(chat_rows(1))), purpose="fine-tune")
    r = httpx.delete(f"{server.base}/v1/files/{one.id}", headers=headers)
    FileDeleted.model_validate(r.json())
    # pagination: pages of one, newest first, following `after`
    seen, after = [], None
    while True:
        page = get("/v1/fine_tuning/jobs?limit=1" + (f"&after={after}" if after else ""))
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == [j["id"] for j in jobs["data"]]


def test_fine_tuning_quotas_are_the_tenants_and_refuse_with_429(server, keys) -> None:
    tid = next(t["id"] for t in admin(server, "GET", "/admin/tenants").json()["data"] if t["name"] == "bob")
    assert admin(server, "GET", "/admin/tenants").json()["data"][0]["quotas"]["max_queued_jobs"] == 4  # default
    r = admin(server, "PATCH", f"/admin/tenants/{tid}", json={"max_files": 1, "max_queued_jobs": 0})
    assert r.status_code == 200, r.text
    c = client(server, keys["bob"])
    for f in c.files.list().data:
        c.files.delete(f.id)
    f = c.files.create(file=("a.jsonl", jsonl(chat_rows(2))), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as e:
        c.files.create(file=("b.jsonl", jsonl(chat_rows(2))), purpose="fine-tune")
    assert "max_files" in e.value.message and "delete files first" in e.value.message
    with pytest.raises(openai.RateLimitError) as e:
        c.fine_tuning.jobs.create(training_file=f.id, model=c.models.list().data[0].id)
    assert "max_queued_jobs" in e.value.message
    assert c.fine_tuning.jobs.list().data == []  # nothing was queued
