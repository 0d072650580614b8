"""Contract for fine-tuning: files, the job queue, its events and checkpoints.

Runs against every backend through the ``backend`` fixture (conftest.py); the last test, many
claimers on two stores ("replicas") of one database, runs on PostgreSQL only.
"""

from __future__ import annotations

import asyncio

import pytest

from adapters_store import (
    ChangeEvent,
    Conflict,
    LeaseLost,
    NewCheckpoint,
    NewFile,
    NewJob,
    NewJobEvent,
    NotFound,
    QuotaExceeded,
    Quotas,
    Store,
    open_store,
)
from adapters_store.models import JOB_STATUSES

from .conftest import Backend
from .support import new_adapter

LEASE = 3600.0  # a lease no test outlives, where leases should not expire
SHORT_LEASE = 0.05


def new_file(
    filename: str = "train.jsonl", blob: bytes = b'{"messages": []}\n', *, purpose: str = "fine-tune"
) -> NewFile:
    return NewFile(filename=filename, purpose=purpose, format="chat", lines=blob.count(b"\n"), blob=blob)


def new_job(training_file: str, *, tokens: int = 100, validation_file: str | None = None) -> NewJob:
    spec = {"method": {"type": "supervised", "hyperparameters": {"n_epochs": 2}}, "suffix": "tone", "seed": 7}
    return NewJob(
        model="tiny-base",
        training_file=training_file,
        validation_file=validation_file,
        spec=spec,
        training_tokens=tokens,
    )


async def tenant_with_file(store: Store, name: str = "acme", quotas: Quotas | None = None) -> tuple[str, str]:
    tenant = await store.create_tenant(name, quotas)
    file = await store.create_file(tenant.id, new_file())
    return tenant.id, file.id


async def messages(store: Store, tenant_id: str, job_id: str) -> list[tuple[int, str, str]]:
    """Every event of the job, oldest first: (seq, level, message)."""
    page = await store.list_job_events(tenant_id, job_id, limit=1000)
    return [(e.seq, e.level, e.message) for e in reversed(page.items)]


# Files


def test_file_round_trip(backend: Backend) -> None:
    blob = b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 3

    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        created = await store.create_file(tenant.id, new_file("data.jsonl", blob))
        return (
            tenant,
            created,
            await store.get_file(tenant.id, created.id),
            await store.get_file_content(tenant.id, created.id),
            await store.list_files(tenant.id),
        )

    tenant, created, fetched, content, page = backend.run(body)
    assert created.id.startswith("file-") and created.tenant_id == tenant.id
    assert (created.filename, created.purpose, created.format, created.lines, created.bytes) == (
        "data.jsonl",
        "fine-tune",
        "chat",
        3,
        len(blob),
    )
    assert created.created_at.tzinfo is not None
    assert fetched == created
    assert content == blob
    assert (page.items, page.has_more) == ([created], False)


def test_list_files_pages_newest_first_and_filters_by_purpose(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        files = [
            await store.create_file(tenant.id, new_file(f"f{i}.jsonl", purpose="batch" if i % 2 else "fine-tune"))
            for i in range(5)
        ]
        pages = [await store.list_files(tenant.id, limit=2)]
        while pages[-1].has_more:
            pages.append(await store.list_files(tenant.id, limit=2, after=pages[-1].items[-1].id))
        tuning = await store.list_files(tenant.id, purpose="fine-tune")
        tuning_page = await store.list_files(tenant.id, purpose="fine-tune", limit=1, after=files[4].id)
        unknown = await store.list_files(tenant.id, after="file-unknown")
        with pytest.raises(ValueError, match="limit"):
            await store.list_files(tenant.id, limit=0)
        return files, pages, tuning, tuning_page, unknown

    files, pages, tuning, tuning_page, unknown = backend.run(body)
    newest_first = [f.id for f in reversed(files)]
    assert [[f.id for f in p.items] for p in pages] == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    assert [p.has_more for p in pages] == [True, True, False]
    assert [f.filename for f in tuning.items] == ["f4.jsonl", "f2.jsonl", "f0.jsonl"]
    assert ([f.filename for f in tuning_page.items], tuning_page.has_more) == (["f2.jsonl"], True)
    # An unknown cursor gives an empty page (documented in sql_store.py).
    assert (unknown.items, unknown.has_more) == ([], False)


def test_files_of_another_tenant_are_not_found(backend: Backend) -> None:
    async def body(store: Store):
        acme, file_id = await tenant_with_file(store, "acme")
        other = (await store.create_tenant("globex")).id
        raised = []
        for call in (
            store.get_file(other, file_id),
            store.get_file_content(other, file_id),
            store.delete_file(other, file_id),
            store.get_file(other, "file-absent"),
            store.get_file_content(other, "file-absent"),
            store.delete_file(other, "file-absent"),
        ):
            with pytest.raises(NotFound) as caught:
                await call
            raised.append(str(caught.value))
        with pytest.raises(NotFound, match="file 'file-absent' not found"):
            await store.create_job(other, new_job("file-absent"), [])
        with pytest.raises(NotFound, match=f"file '{file_id}' not found"):
            await store.create_job(other, new_job(file_id), [])
        listed = await store.list_files(other)
        after_foreign = await store.list_files(acme, after=file_id)
        return file_id, raised, listed, await store.get_file(acme, file_id), after_foreign

    file_id, raised, listed, still_there, after_foreign = backend.run(body)
    assert raised == [f"file {file_id!r} not found"] * 3 + ["file 'file-absent' not found"] * 3
    assert listed.items == []
    assert still_there.id == file_id
    assert after_foreign.items == []


def test_file_quotas_refuse_and_write_nothing(backend: Backend) -> None:
    async def body(store: Store):
        counted = await store.create_tenant("counted", Quotas(max_files=2))
        sized = await store.create_tenant("sized", Quotas(max_file_bytes=10))
        for _ in range(2):
            await store.create_file(counted.id, new_file(blob=b"x\n"))
        with pytest.raises(QuotaExceeded) as by_count:
            await store.create_file(counted.id, new_file(blob=b"x\n"))
        await store.create_file(sized.id, new_file(blob=b"123456\n"))
        with pytest.raises(QuotaExceeded) as by_bytes:
            await store.create_file(sized.id, new_file(blob=b"1234\n"))
        small = await store.create_file(sized.id, new_file(blob=b"12\n"))  # exactly at the limit
        return by_count.value, by_bytes.value, await store.list_files(counted.id), small

    by_count, by_bytes, counted_files, small = backend.run(body)
    assert (by_count.limit_name, by_count.limit, by_count.current) == ("max_files", 2, 2)
    assert "quota max_files exceeded" in str(by_count)
    assert (by_bytes.limit_name, by_bytes.limit, by_bytes.current) == ("max_file_bytes", 10, 7)
    assert "quota max_file_bytes exceeded" in str(by_bytes)
    assert len(counted_files.items) == 2
    assert small.bytes == 3


def test_delete_file_conflicts_while_an_active_job_uses_it(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        validation = (await store.create_file(tenant, new_file("valid.jsonl"))).id
        spare = (await store.create_file(tenant, new_file("spare.jsonl"))).id
        job = await store.create_job(tenant, new_job(training, validation_file=validation), [])
        conflicts = []
        for file_id in (training, validation):
            with pytest.raises(Conflict) as caught:
                await store.delete_file(tenant, file_id)
            conflicts.append(str(caught.value))
        deleted_spare = await store.delete_file(tenant, spare)
        claimed = await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        with pytest.raises(Conflict):  # running counts too
            await store.delete_file(tenant, training)
        await store.finish_job(job.id, "w1", status="cancelled", events=[])
        deleted = await store.delete_file(tenant, training)
        with pytest.raises(NotFound):
            await store.get_file(tenant, training)
        with pytest.raises(NotFound):
            await store.get_file_content(tenant, training)
        with pytest.raises(NotFound):
            await store.delete_file(tenant, training)
        return job, claimed, conflicts, deleted_spare, spare, deleted, training, await store.get_job(tenant, job.id)

    job, claimed, conflicts, deleted_spare, spare, deleted, training, after = backend.run(body)
    assert claimed is not None and claimed.id == job.id
    assert all(job.id in message for message in conflicts)
    assert deleted_spare.id == spare and deleted.id == training
    assert after.training_file == training  # the finished job keeps the name of its deleted file


# Jobs


def test_create_job_queues_it_with_its_events(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        validation = (await store.create_file(tenant, new_file("valid.jsonl"))).id
        events = [NewJobEvent("Validating training file"), NewJobEvent("Files ok", data={"examples": 1})]
        job = await store.create_job(tenant, new_job(training, validation_file=validation, tokens=640), events)
        with pytest.raises(NotFound, match="tenant"):
            await store.create_job("ten_absent", new_job(training), [])
        with pytest.raises(NotFound, match="file 'file-nope' not found"):
            await store.create_job(tenant, new_job(training, validation_file="file-nope"), [])
        listed = await store.list_job_events(tenant, job.id)
        return job, await store.get_job(tenant, job.id), listed, (await store.list_jobs(tenant)).items

    job, fetched, listed, jobs = backend.run(body)
    assert job.id.startswith("ftjob-")
    assert (job.status, job.attempts, job.cancel_requested, job.worker_id) == ("queued", 0, False, None)
    assert (job.training_tokens, job.trained_tokens, job.fine_tuned_model, job.error) == (640, None, None, None)
    assert (job.started_at, job.heartbeat_at, job.finished_at) == (None, None, None)
    assert job.spec == new_job("x").spec
    assert fetched == job
    assert jobs == [job]  # the refused creates wrote nothing
    assert [(e.seq, e.message, e.data) for e in listed.items] == [
        (2, "Files ok", {"examples": 1}),
        (1, "Validating training file", None),
    ]
    assert all(e.id.startswith("ftevent-") and e.job_id == job.id and e.level == "info" for e in listed.items)


def test_max_queued_jobs_counts_queued_and_running(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store, quotas=Quotas(max_queued_jobs=2))
        first = await store.create_job(tenant, new_job(training), [])
        await store.create_job(tenant, new_job(training), [])
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)  # first: running, still counted
        with pytest.raises(QuotaExceeded) as caught:
            await store.create_job(tenant, new_job(training), [])
        await store.finish_job(first.id, "w1", status="failed", events=[], error={"code": "x", "message": "y"})
        third = await store.create_job(tenant, new_job(training), [])
        return caught.value, third

    error, third = backend.run(body)
    assert (error.limit_name, error.limit, error.current) == ("max_queued_jobs", 2, 2)
    assert "quota max_queued_jobs exceeded" in str(error)
    assert third.status == "queued"


def test_max_training_tokens_refunds_failed_and_cancelled_jobs(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store, quotas=Quotas(max_training_tokens=250))
        a = await store.create_job(tenant, new_job(training, tokens=100), [])
        b = await store.create_job(tenant, new_job(training, tokens=100), [])
        with pytest.raises(QuotaExceeded) as caught:
            await store.create_job(tenant, new_job(training, tokens=100), [])
        await store.cancel_job(tenant, b.id)
        c = await store.create_job(tenant, new_job(training, tokens=150), [])  # 100 + 150: at the limit
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)  # a
        await store.finish_job(a.id, "w1", status="failed", events=[], error={"code": "oom", "message": "m"})
        d = await store.create_job(tenant, new_job(training, tokens=100), [])  # 150 + 100
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)  # c
        await store.finish_job(c.id, "w1", status="succeeded", events=[], adapter=new_adapter("tone"))
        with pytest.raises(QuotaExceeded) as after_success:  # a succeeded job keeps its tokens
            await store.create_job(tenant, new_job(training, tokens=1), [])
        return caught.value, c, d, after_success.value

    error, c, d, after_success = backend.run(body)
    assert (error.limit_name, error.limit, error.current) == ("max_training_tokens", 250, 200)
    assert "quota max_training_tokens exceeded" in str(error)
    assert c.status == d.status == "queued"
    assert (after_success.limit_name, after_success.current) == ("max_training_tokens", 250)


def test_list_jobs_pages_newest_first(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        other, other_file = await tenant_with_file(store, "globex")
        created = [await store.create_job(tenant, new_job(training), []) for _ in range(5)]
        await store.create_job(other, new_job(other_file), [])
        pages = [await store.list_jobs(tenant, limit=3)]
        pages.append(await store.list_jobs(tenant, limit=3, after=pages[0].items[-1].id))
        with pytest.raises(ValueError):
            await store.list_jobs(tenant, limit=0)
        return created, pages, await store.list_jobs(tenant, after="ftjob-absent")

    created, pages, unknown = backend.run(body)
    newest_first = [j.id for j in reversed(created)]
    assert [[j.id for j in p.items] for p in pages] == [newest_first[:3], newest_first[3:]]
    assert [p.has_more for p in pages] == [True, False]
    assert unknown.items == []


def test_cancel_queued_running_and_finished_jobs(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        running = await store.create_job(tenant, new_job(training), [])
        queued = await store.create_job(tenant, new_job(training), [])
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        cancelled = await store.cancel_job(tenant, queued.id)
        requested = await store.cancel_job(tenant, running.id)
        again = await store.cancel_job(tenant, running.id)  # idempotent while it runs
        seen_by_worker = await store.heartbeat(running.id, "w1", [])
        ended = await store.finish_job(running.id, "w1", status="cancelled", events=[NewJobEvent("Stopped")])
        refused = []
        for job_id in (queued.id, running.id):
            with pytest.raises(Conflict) as caught:
                await store.cancel_job(tenant, job_id)
            refused.append(str(caught.value))
        return (
            queued,
            running,
            cancelled,
            requested,
            again,
            seen_by_worker,
            ended,
            refused,
            await messages(store, tenant, queued.id),
            await messages(store, tenant, running.id),
        )

    queued, running, cancelled, requested, again, seen, ended, refused, queued_log, running_log = backend.run(body)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", False)
    assert cancelled.finished_at is not None and cancelled.started_at is None
    assert (requested.status, requested.cancel_requested) == ("running", True)
    assert again == requested
    assert seen.cancel_requested is True
    assert (ended.status, ended.worker_id) == ("cancelled", "w1")
    assert ended.finished_at is not None
    assert refused == [
        f"fine-tuning job {queued.id!r} is already cancelled",
        f"fine-tuning job {running.id!r} is already cancelled",
    ]
    assert queued_log == [(1, "info", "Job was cancelled")]
    assert running_log == [
        (1, "info", "Fine-tuning job started"),
        (2, "info", "Cancellation requested"),
        (3, "info", "Stopped"),
    ]


def test_jobs_of_another_tenant_are_not_found(backend: Backend) -> None:
    async def body(store: Store):
        acme, training = await tenant_with_file(store)
        job = await store.create_job(acme, new_job(training), [NewJobEvent("Created")])
        other = (await store.create_tenant("globex")).id
        raised = []
        for job_id in (job.id, "ftjob-absent"):
            for call in (
                store.get_job(other, job_id),
                store.list_job_events(other, job_id),
                store.list_checkpoints(other, job_id),
                store.cancel_job(other, job_id),
            ):
                with pytest.raises(NotFound) as caught:
                    await call
                raised.append(str(caught.value))
        return job, raised, await store.list_jobs(other), await store.get_job(acme, job.id)

    job, raised, listed, untouched = backend.run(body)
    assert raised == [f"fine-tuning job {job.id!r} not found"] * 4 + ["fine-tuning job 'ftjob-absent' not found"] * 4
    assert listed.items == []
    assert untouched == job  # the refused cancel changed nothing


# The queue


def test_claim_takes_the_oldest_queued_job(backend: Backend) -> None:
    async def body(store: Store):
        acme, acme_file = await tenant_with_file(store, "acme")
        globex, globex_file = await tenant_with_file(store, "globex")
        created = [
            await store.create_job(acme, new_job(acme_file), []),
            await store.create_job(globex, new_job(globex_file), []),
            await store.create_job(acme, new_job(acme_file), []),
        ]
        claims = [await store.claim_job(f"w{i}", lease_s=LEASE, max_attempts=3) for i in range(4)]
        return created, claims, await messages(store, acme, created[0].id)

    created, claims, log = backend.run(body)
    assert claims[3] is None
    got = [c for c in claims[:3] if c is not None]
    assert [c.id for c in got] == [j.id for j in created]
    assert [c.worker_id for c in got] == ["w0", "w1", "w2"]
    for claim, job in zip(got, created, strict=True):
        assert (claim.status, claim.attempts, claim.tenant_id) == ("running", 1, job.tenant_id)
        assert claim.started_at is not None and claim.heartbeat_at == claim.started_at
    assert log == [(1, "info", "Fine-tuning job started")]


def test_lost_lease_requeues_then_fails_after_max_attempts(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        job = await store.create_job(tenant, new_job(training), [])
        first = await store.claim_job("w1", lease_s=LEASE, max_attempts=2)
        await asyncio.sleep(SHORT_LEASE * 2)
        # w2's claim finds w1's lease expired: the job is queued again, and w2 takes it itself.
        second = await store.claim_job("w2", lease_s=SHORT_LEASE, max_attempts=2)
        with pytest.raises(LeaseLost):
            await store.heartbeat(job.id, "w1", [NewJobEvent("late")])
        with pytest.raises(LeaseLost):
            await store.finish_job(job.id, "w1", status="succeeded", events=[], adapter=new_adapter("tone"))
        await store.release_job(job.id, "w1", NewJobEvent("not mine"))  # nothing happens
        still_second = await store.get_job(tenant, job.id)
        await asyncio.sleep(SHORT_LEASE * 2)
        third = await store.claim_job("w3", lease_s=SHORT_LEASE, max_attempts=2)
        with pytest.raises(LeaseLost):
            await store.heartbeat(job.id, "w2", [])
        with pytest.raises(NotFound):
            await store.get_adapter(tenant, "tone")
        return (
            first,
            second,
            still_second,
            third,
            await store.get_job(tenant, job.id),
            await messages(store, tenant, job.id),
        )

    first, second, still_second, third, failed, log = backend.run(body)
    assert first is not None and second is not None
    assert (second.id, second.worker_id, second.attempts) == (first.id, "w2", 2)
    assert second.started_at == first.started_at  # the first claim's time is kept
    assert second.heartbeat_at is not None and first.heartbeat_at is not None
    assert second.heartbeat_at > first.heartbeat_at
    assert still_second == second
    assert third is None
    assert (failed.status, failed.attempts) == ("failed", 2)
    assert failed.error is not None and failed.error["code"] == "worker_lost" and failed.error["param"] is None
    assert failed.finished_at is not None
    assert [(seq, level) for seq, level, _ in log] == [(1, "info"), (2, "warn"), (3, "info"), (4, "error")]
    assert log[1][2] == "The worker running the job stopped; queued again"
    assert log[2][2] == "Fine-tuning job started"


def test_lost_lease_of_a_job_asked_to_cancel_cancels_it(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        job = await store.create_job(tenant, new_job(training), [])
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        await store.cancel_job(tenant, job.id)
        await asyncio.sleep(SHORT_LEASE * 2)
        claimed = await store.claim_job("w2", lease_s=SHORT_LEASE, max_attempts=3)
        return claimed, await store.get_job(tenant, job.id), await messages(store, tenant, job.id)

    claimed, job, log = backend.run(body)
    assert claimed is None
    assert (job.status, job.attempts) == ("cancelled", 1)
    assert job.finished_at is not None
    assert [m for _, _, m in log][-1] == "Job was cancelled"


def test_heartbeat_renews_the_lease_and_appends_events(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        job = await store.create_job(tenant, new_job(training), [NewJobEvent("Created")])
        claimed = await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        metrics = NewJobEvent("Step 1", type="metrics", data={"step": 1, "train_loss": 2.5})
        beat = await store.heartbeat(job.id, "w1", [metrics, NewJobEvent("Slow", level="warn")], trained_tokens=10)
        kept = await store.heartbeat(job.id, "w1", [])  # trained_tokens None: kept
        with pytest.raises(LeaseLost):
            await store.heartbeat(job.id, "w-other", [])
        with pytest.raises(LeaseLost):
            await store.heartbeat("ftjob-absent", "w1", [])
        page = await store.list_job_events(tenant, job.id, limit=2)
        rest = await store.list_job_events(tenant, job.id, limit=2, after=page.items[-1].id)
        return claimed, beat, kept, page, rest

    claimed, beat, kept, page, rest = backend.run(body)
    assert claimed is not None and claimed.heartbeat_at is not None and beat.heartbeat_at is not None
    assert beat.heartbeat_at > claimed.heartbeat_at
    assert (beat.status, beat.trained_tokens, beat.cancel_requested) == ("running", 10, False)
    assert kept.trained_tokens == 10
    assert [(e.seq, e.message) for e in page.items] == [(4, "Slow"), (3, "Step 1")]
    assert page.has_more is True
    assert [(e.seq, e.message) for e in rest.items] == [(2, "Fine-tuning job started"), (1, "Created")]
    assert rest.has_more is False
    assert (page.items[1].type, page.items[1].data) == ("metrics", {"step": 1, "train_loss": 2.5})
    assert page.items[0].level == "warn"


def test_finish_succeeded_stores_the_adapter_for_the_tenant(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        other = (await store.create_tenant("globex")).id
        job = await store.create_job(tenant, new_job(training), [])
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        changes: list[ChangeEvent] = []
        await store.subscribe(changes.append)
        done = await store.finish_job(
            job.id,
            "w1",
            status="succeeded",
            events=[NewJobEvent("The job has successfully completed")],
            adapter=new_adapter("ft-tone", b"trained weights"),
            checkpoint=NewCheckpoint(step=40, metrics={"step": 40, "train_loss": 0.5}),
            trained_tokens=200,
        )
        adapter = await store.get_adapter(tenant, "ft-tone")
        with pytest.raises(NotFound):
            await store.get_adapter(other, "ft-tone")
        with pytest.raises(LeaseLost):  # finished: the worker holds nothing any more
            await store.heartbeat(job.id, "w1", [])
        with pytest.raises(LeaseLost):
            await store.finish_job(job.id, "w1", status="cancelled", events=[])
        checkpoints = await store.list_checkpoints(tenant, job.id)
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.01)
        return (
            done,
            adapter,
            await store.get_blob(adapter.id),
            checkpoints,
            changes,
            await store.get_job(tenant, job.id),
        )

    done, adapter, blob, checkpoints, changes, fetched = backend.run(body)
    assert (done.status, done.fine_tuned_model, done.trained_tokens, done.worker_id) == (
        "succeeded",
        "ft-tone",
        200,
        "w1",
    )
    assert done.finished_at is not None and done.error is None
    assert fetched == done
    assert (adapter.tenant_id, adapter.version, adapter.public) == (done.tenant_id, 1, False)
    assert blob == b"trained weights"
    assert [(c.step, c.metrics, c.fine_tuned_model_checkpoint) for c in checkpoints.items] == [
        (40, {"step": 40, "train_loss": 0.5}, "ft-tone")
    ]
    assert checkpoints.items[0].id.startswith("ftckpt-") and checkpoints.has_more is False
    assert [(e.kind, e.name, e.version) for e in changes] == [("adapter_created", "ft-tone", 1)]


def test_finish_over_the_adapter_quota_writes_nothing(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store, quotas=Quotas(max_adapters=0))
        job = await store.create_job(tenant, new_job(training), [])
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        with pytest.raises(QuotaExceeded) as caught:
            await store.finish_job(
                job.id,
                "w1",
                status="succeeded",
                events=[NewJobEvent("done")],
                adapter=new_adapter("ft-tone"),
                checkpoint=NewCheckpoint(step=1, metrics={}),
                trained_tokens=5,
            )
        with pytest.raises(NotFound):
            await store.get_adapter(tenant, "ft-tone")
        still = await store.get_job(tenant, job.id)
        checkpoints = await store.list_checkpoints(tenant, job.id)
        failed = await store.finish_job(
            job.id, "w1", status="failed", events=[], error={"code": "quota", "message": str(caught.value)}
        )
        return caught.value, still, checkpoints, await messages(store, tenant, job.id), failed

    error, still, checkpoints, log, failed = backend.run(body)
    assert error.limit_name == "max_adapters"
    assert (still.status, still.worker_id, still.trained_tokens, still.fine_tuned_model) == (
        "running",
        "w1",
        None,
        None,
    )
    assert checkpoints.items == []
    assert log == [(1, "info", "Fine-tuning job started")]
    assert failed.status == "failed" and failed.error is not None and failed.error["code"] == "quota"


def test_release_job_queues_it_again_without_counting_the_claim(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        job = await store.create_job(tenant, new_job(training), [])
        first = await store.claim_job("w1", lease_s=LEASE, max_attempts=1)
        await store.release_job(job.id, "w-other", NewJobEvent("not mine"))
        await store.release_job(job.id, "w1", NewJobEvent("Worker stopping; queued again", level="warn"))
        released = await store.get_job(tenant, job.id)
        again = await store.claim_job("w2", lease_s=LEASE, max_attempts=1)
        await store.release_job(job.id, "w1", NewJobEvent("stale"))  # no longer w1's: nothing
        return first, released, again, await store.get_job(tenant, job.id), await messages(store, tenant, job.id)

    first, released, again, after, log = backend.run(body)
    assert first is not None and again is not None
    assert (released.status, released.worker_id, released.attempts) == ("queued", None, 0)
    assert (again.worker_id, again.attempts, again.started_at) == ("w2", 1, first.started_at)
    assert after == again
    assert log == [
        (1, "info", "Fine-tuning job started"),
        (2, "warn", "Worker stopping; queued again"),
        (3, "info", "Fine-tuning job started"),
    ]


def test_job_counts_cover_every_status(backend: Backend) -> None:
    async def body(store: Store):
        empty = await store.job_counts()
        tenant, training = await tenant_with_file(store)
        jobs = [await store.create_job(tenant, new_job(training), []) for _ in range(4)]
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        await store.claim_job("w2", lease_s=LEASE, max_attempts=3)
        await store.finish_job(jobs[0].id, "w1", status="succeeded", events=[], adapter=new_adapter("a"))
        await store.cancel_job(tenant, jobs[2].id)
        return empty, await store.job_counts()

    empty, counts = backend.run(body)
    assert empty == dict.fromkeys(JOB_STATUSES, 0)
    assert counts == {
        "validating_files": 0,
        "queued": 1,
        "running": 1,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 1,
    }


def test_worker_input_is_checked_before_any_write(backend: Backend) -> None:
    async def body(store: Store):
        tenant, training = await tenant_with_file(store)
        job = await store.create_job(tenant, new_job(training), [])
        await store.claim_job("w1", lease_s=LEASE, max_attempts=3)
        for call in (
            store.finish_job(job.id, "w1", status="succeeded", events=[]),  # no adapter
            store.finish_job(job.id, "w1", status="failed", events=[]),  # no error
            store.finish_job(job.id, "w1", status="running", events=[]),
            store.heartbeat(job.id, "w1", [NewJobEvent("x", level="debug")]),  # type: ignore[arg-type]
            store.claim_job("w1", lease_s=0, max_attempts=3),
            store.claim_job("", lease_s=LEASE, max_attempts=3),
            store.list_job_events(tenant, job.id, limit=0),
            store.create_job(tenant, new_job(training, tokens=-1), []),
        ):
            with pytest.raises(ValueError):
                await call
        return await store.get_job(tenant, job.id)

    job = backend.run(body)
    assert (job.status, job.worker_id) == ("running", "w1")


# Replicas (PostgreSQL)


def test_concurrent_claimers_on_two_replicas_take_each_job_once(backend: Backend) -> None:
    if backend.kind != "postgresql":
        pytest.skip("SQLite has one writer per database file; replicas share PostgreSQL")
    jobs_count, claimers_per_store = 12, 4

    async def main():
        async with open_store(backend.url) as a, open_store(backend.url) as b:
            tenant, training = await tenant_with_file(a)
            created = [await a.create_job(tenant, new_job(training, tokens=1), []) for _ in range(jobs_count)]

            async def claimer(store: Store, name: str) -> list[str]:
                taken = []
                while (job := await store.claim_job(name, lease_s=LEASE, max_attempts=3)) is not None:
                    assert job.worker_id == name
                    taken.append(job.id)
                    await asyncio.sleep(0)  # let the others in
                return taken

            results = await asyncio.gather(
                *(claimer(store, f"{tag}{i}") for tag, store in (("a", a), ("b", b)) for i in range(claimers_per_store))
            )
            return created, results, await b.job_counts(), await a.list_jobs(tenant, limit=100)

    created, results, counts, listed = asyncio.run(main())
    claimed = [job_id for taken in results for job_id in taken]
    assert sorted(claimed) == sorted(j.id for j in created)  # every job exactly once
    assert counts["running"] == jobs_count and counts["queued"] == 0
    assert all(j.status == "running" and j.attempts == 1 for j in listed.items)
    for job in listed.items:
        owners = [worker for worker, taken in enumerate(results) if job.id in taken]
        assert len(owners) == 1
