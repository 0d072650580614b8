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
