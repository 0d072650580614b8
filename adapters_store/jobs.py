"""Every store operation as a job, written once for both SQL drivers.

A job is a coroutine function ``job(db, *args)`` over a ``Connection``: four methods that each
driver implements on its own connection, plus the dialect's statements (``db.sql``). The
algorithms, from the quota check to the version numbering, are therefore the same code on both:

* PostgreSQL awaits ``asyncpg`` in them.
* SQLite answers at once from a blocking ``sqlite3`` connection, on its writer thread (or on the
  event loop, for point reads), so its jobs never suspend and ``run_blocking`` runs one to its
  end without an event loop.

A job that writes runs inside one transaction that the driver opens (``SQLStore._write`` in
``sql_store.py``); one that reads runs without (``_read``, ``_point_read``). The locks that keep
a write correct under concurrency are the dialect's (see ``create_adapter``).
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from .common import (
    API_KEY_NOT_FOUND,
    CHECKPOINT_PREFIX,
    EVENT_PREFIX,
    FILE_PREFIX,
    JOB_PREFIX,
    adapter_not_found,
    check_file_quotas,
    check_job_quotas,
    check_quotas,
    file_not_found,
    job_not_found,
    new_id,
    now,
)
from .errors import Conflict, LeaseLost, NotFound
from .migrations import Migration, pending
from .models import (
    FINISHED_STATUSES,
    JOB_STATUSES,
    PUBLIC_TENANT_NAME,
    AdapterRecord,
    ApiKey,
    ChangeEvent,
    CheckpointRecord,
    FileRecord,
    JobEvent,
    JobRecord,
    NewAdapter,
    NewCheckpoint,
    NewFile,
    NewJob,
    NewJobEvent,
    Quotas,
    Tenant,
)
from .sql import (
    Row,
    Statements,
    adapter_from_row,
    adapter_values,
    api_key_from_row,
    checkpoint_from_row,
    checkpoint_values,
    dumps_or_none,
    event_from_row,
    event_values,
    file_from_row,
    file_values,
    found_api_key_from_row,
    job_from_row,
    job_values,
    quota_values,
    tenant_from_row,
)

T = TypeVar("T")


class Connection(Protocol):
    """What a job needs of a driver's connection. Arguments are positional (``sql.Dialect.arg``)."""

    #: The statements in this connection's dialect.
    sql: Statements

    async def fetch(self, sql: str, *args: object) -> Sequence[Row]:
        """Every row of the result."""

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        """The first row of the result, or None."""

    async def execute(self, sql: str, *args: object) -> int:
        """Run a statement; the number of rows it changed."""

    async def announce(self, event: ChangeEvent) -> None:
        """Deliver ``event`` to subscribers once the transaction commits, and never if it rolls back."""


def run_blocking(job: Coroutine[Any, Any, T]) -> T:
    """Run a job on a connection whose methods answer at once (they never suspend) to its end."""
    try:
        job.send(None)
    except StopIteration as done:
        return done.value
    job.close()
    raise RuntimeError("a job on a blocking connection suspended; its connection must answer at once")


def _no_tenant(tenant_id: str) -> NotFound:
    return NotFound(f"tenant {tenant_id!r} not found")


# Schema.


async def migrate(db: Connection, steps: Sequence[Migration]) -> None:
    """Apply the missing ``steps`` (the dialect's migrations); run in one transaction: all or none.

    Where the dialect has a migration lock, concurrent openers queue on it, and each reads
    ``schema_migrations`` only after the previous one committed.
    """
    if db.sql.lock_migrations is not None:
        await db.execute(db.sql.lock_migrations)
    await db.execute(db.sql.create_migrations_table)
    applied = [row["version"] for row in await db.fetch(db.sql.applied_migrations)]
    for step in pending(steps, applied):
        for statement in step.statements:
            await db.execute(statement)
        await db.execute(db.sql.record_migration, step.version, now())


# Tenants.


async def ensure_tenant(db: Connection, name: str) -> Tenant:
    # ON CONFLICT waits for a concurrent insert of the same name to commit, and the next
    # statement (a fresh snapshot under READ COMMITTED) then sees it.
    await db.execute(db.sql.insert_bare_tenant, new_id("ten_"), name, now())
    (row,) = await db.fetch(db.sql.tenant_by_name, name)
    return tenant_from_row(row, db.sql.dialect)


async def create_tenant(db: Connection, name: str, quotas: Quotas) -> Tenant:
    row = await db.fetchrow(db.sql.insert_tenant, new_id("ten_"), name, now(), *quota_values(quotas))
    if row is None:
        raise Conflict(f"tenant {name!r} already exists")
    return tenant_from_row(row, db.sql.dialect)


async def set_quotas(db: Connection, tenant_id: str, quotas: Quotas) -> Tenant:
    # The row lock this takes waits for creates holding the tenant row (see create_adapter),
    # so a limit applies from the next create on.
    row = await db.fetchrow(db.sql.set_quotas, *quota_values(quotas), tenant_id)
    if row is None:
        raise _no_tenant(tenant_id)
    return tenant_from_row(row, db.sql.dialect)


async def get_tenant(db: Connection, tenant_id: str) -> Tenant:
    row = await db.fetchrow(db.sql.tenant_by_id, tenant_id)
    if row is None:
        raise _no_tenant(tenant_id)
    return tenant_from_row(row, db.sql.dialect)


async def list_tenants(db: Connection) -> list[Tenant]:
    rows = await db.fetch(db.sql.tenants_other_than, PUBLIC_TENANT_NAME)
    return [tenant_from_row(row, db.sql.dialect) for row in rows]


# API keys.


async def create_api_key(db: Connection, tenant_id: str, key_hash: str, prefix: str) -> ApiKey:
    # The check only makes the NotFound explicit instead of a foreign key violation.
    if (await db.fetchrow(db.sql.tenant_exists_for_key, tenant_id)) is None:
        raise _no_tenant(tenant_id)
    # The hash is not echoed: it is as good as the key for an offline attack.
    row = await db.fetchrow(db.sql.insert_api_key, new_id("key_"), tenant_id, key_hash, prefix, now())
    if row is None:
        raise Conflict("an api key with this hash already exists")
    return api_key_from_row(row, db.sql.dialect)


async def find_api_key(db: Connection, key_hash: str) -> tuple[ApiKey, Tenant]:
    row = await db.fetchrow(db.sql.find_api_key, key_hash)
    if row is None:
        raise NotFound(API_KEY_NOT_FOUND)
    return found_api_key_from_row(row, db.sql.dialect)


async def list_api_keys(db: Connection, tenant_id: str) -> list[ApiKey]:
    if (await db.fetchrow(db.sql.tenant_exists, tenant_id)) is None:
        raise _no_tenant(tenant_id)
    rows = await db.fetch(db.sql.api_keys_of, tenant_id)
    return [api_key_from_row(row, db.sql.dialect) for row in rows]


async def revoke_api_key(db: Connection, key_id: str) -> ApiKey:
    row = await db.fetchrow(db.sql.revoke_api_key, now(), key_id)
    if row is None:
        raise NotFound(f"api key {key_id!r} not found")
    return api_key_from_row(row, db.sql.dialect)


# Adapters.


async def create_adapter(db: Connection, tenant_id: str, new: NewAdapter) -> AdapterRecord:
    """The next version of ``new.name``, within the tenant's quotas (see ``Store.create_adapter``)."""
    # Reading the tenant row takes the dialect's lock on it (PostgreSQL: FOR NO KEY UPDATE; SQLite's
    # BEGIN IMMEDIATE holds the database write lock already). That serialises this tenant's
    # creates, from every replica, until commit, so the usage counted below cannot change before
    # our insert commits: quotas hold under concurrency. NO KEY UPDATE does not block the FOR KEY
    # SHARE that foreign key checks take, and set_quotas waits for us (and we for it).
    tenant_row = await db.fetchrow(db.sql.tenant_for_create, tenant_id)
    if tenant_row is None:
        raise _no_tenant(tenant_id)
    (usage,) = await db.fetch(db.sql.usage, tenant_id)  # aggregates: one row
    quotas = tenant_from_row(tenant_row, db.sql.dialect).quotas
    check_quotas(quotas, int(usage["count"]), int(usage["bytes"]), len(new.blob))
    if db.sql.lock_name is not None:
        # Serialise creators of this (tenant, name) until commit; a hash collision merely
        # serialises two unrelated names. (Redundant under the tenant row lock, kept as the
        # version backstop next to UNIQUE (tenant_id, name, version).)
        await db.execute(db.sql.lock_name, tenant_id, new.name)
    (latest,) = await db.fetch(db.sql.latest, tenant_id, new.name)
    record = AdapterRecord(
        id=new_id("ad_"),
        tenant_id=tenant_id,
        name=new.name,
        version=latest["version"] + 1,
        tokens=new.tokens,
        params=new.params,
        bytes=len(new.blob),
        sha256=new.sha256.lower(),
        base_model=new.base_model,
        public=bool(latest["public"]) or tenant_row["name"] == PUBLIC_TENANT_NAME,
        created_at=now(),
    )
    await db.execute(db.sql.insert_adapter, *adapter_values(record))
    await db.execute(db.sql.insert_blob, record.id, new.blob)
    await db.announce(ChangeEvent("adapter_created", tenant_id, new.name, record.version))
    return record


async def resolved_versions(db: Connection, tenant_id: str, name: str, version: int | None) -> list[AdapterRecord]:
    rows = await db.fetch(db.sql.resolved_versions, tenant_id, name, version)
    return [adapter_from_row(row, db.sql.dialect) for row in rows]


async def list_newest(db: Connection, tenant_id: str, after: str | None, limit: int) -> list[AdapterRecord]:
    rows = await db.fetch(db.sql.list_newest, tenant_id, after, limit)
    return [adapter_from_row(row, db.sql.dialect) for row in rows]


async def get_blob(db: Connection, adapter_id: str) -> bytes:
    row = await db.fetchrow(db.sql.blob, adapter_id)
    if row is None:
        raise NotFound(f"adapter blob {adapter_id!r} not found")
    return bytes(row["blob"])


async def delete_adapter(db: Connection, tenant_id: str, name: str, version: int | None) -> list[AdapterRecord]:
    rows = await db.fetch(db.sql.delete_versions, tenant_id, name, version)
    if not rows:
        raise NotFound(adapter_not_found(name, version))
    await db.announce(ChangeEvent("adapter_deleted", tenant_id, name, version))
    return sorted((adapter_from_row(row, db.sql.dialect) for row in rows), key=lambda r: r.version)


async def set_public(db: Connection, tenant_id: str, name: str, public: bool) -> None:
    if (await db.execute(db.sql.set_public, public, tenant_id, name)) == 0:
        raise NotFound(adapter_not_found(name, None))
    await db.announce(ChangeEvent("adapter_public", tenant_id, name, None))


async def count_usage(db: Connection, tenant_id: str) -> tuple[int, int]:
    (row,) = await db.fetch(db.sql.usage, tenant_id)
    return int(row["count"]), int(row["bytes"])


# Fine-tuning files.


async def create_file(db: Connection, tenant_id: str, new: NewFile) -> FileRecord:
    """A new file within the tenant's file quotas, under the tenant lock (as ``create_adapter``)."""
    tenant_row = await db.fetchrow(db.sql.tenant_for_create, tenant_id)
    if tenant_row is None:
        raise _no_tenant(tenant_id)
    (usage,) = await db.fetch(db.sql.file_usage, tenant_id)
    quotas = tenant_from_row(tenant_row, db.sql.dialect).quotas
    check_file_quotas(quotas, int(usage["count"]), int(usage["bytes"]), len(new.blob))
    record = FileRecord(
        id=new_id(FILE_PREFIX),
        tenant_id=tenant_id,
        filename=new.filename,
        purpose=new.purpose,
        format=new.format,
        lines=new.lines,
        bytes=len(new.blob),
        created_at=now(),
    )
    await db.execute(db.sql.insert_file, *file_values(record))
    await db.execute(db.sql.insert_file_blob, record.id, new.blob)
    return record


async def get_file(db: Connection, tenant_id: str, file_id: str) -> FileRecord:
    row = await db.fetchrow(db.sql.file_by_id, file_id, tenant_id)
    if row is None:
        raise NotFound(file_not_found(file_id))
    return file_from_row(row, db.sql.dialect)


async def get_file_content(db: Connection, tenant_id: str, file_id: str) -> bytes:
    row = await db.fetchrow(db.sql.file_content, file_id, tenant_id)
    if row is None:
        raise NotFound(file_not_found(file_id))
    return bytes(row["blob"])


async def list_files(
    db: Connection, tenant_id: str, after: str | None, purpose: str | None, limit: int
) -> list[FileRecord]:
    rows = await db.fetch(db.sql.list_files, tenant_id, after, purpose, limit)
    return [file_from_row(row, db.sql.dialect) for row in rows]


async def delete_file(db: Connection, tenant_id: str, file_id: str) -> FileRecord:
    # The tenant lock serialises this with create_job, which checks under it that its files
    # exist: a job can never be queued on a file deleted meanwhile.
    if (await db.fetchrow(db.sql.tenant_for_create, tenant_id)) is None:
        raise NotFound(file_not_found(file_id))
    user = await db.fetchrow(db.sql.file_in_use, tenant_id, file_id)
    if user is not None:  # the job was created with the file, so the file exists
        raise Conflict(f"file {file_id!r} is used by fine-tuning job {user['id']!r} ({user['status']})")
    row = await db.fetchrow(db.sql.delete_file, file_id, tenant_id)
    if row is None:
        raise NotFound(file_not_found(file_id))
    return file_from_row(row, db.sql.dialect)


# Fine-tuning jobs. Every write to an existing job first holds its row (``job_for_update``,
# ``job_of_worker``, or an UPDATE), which keeps its status true until commit and numbers its
# events without gaps or collisions (``append_events``).


async def append_events(db: Connection, job_id: str, events: Sequence[NewJobEvent]) -> list[JobEvent]:
    """Write ``events`` after the job's last one; the caller holds the job's row."""
    if not events:
        return []
    (last,) = await db.fetch(db.sql.last_seq, job_id)
    moment = now()
    written = [
        JobEvent(
            id=new_id(EVENT_PREFIX),
            job_id=job_id,
            seq=int(last["seq"]) + n,
            message=event.message,
            level=event.level,
            type=event.type,
            data=event.data,
            created_at=moment,
        )
        for n, event in enumerate(events, 1)
    ]
    for event in written:
        await db.execute(db.sql.insert_event, *event_values(event))
    return written


async def _end(
    db: Connection,
    job_id: str,
    status: str,
    *,
    error: dict | None = None,
    fine_tuned_model: str | None = None,
    trained_tokens: int | None = None,
) -> JobRecord:
    """Finish a job whose row the caller holds."""
    (row,) = await db.fetch(
        db.sql.end_job, status, now(), dumps_or_none(error), fine_tuned_model, trained_tokens, job_id
    )
    return job_from_row(row, db.sql.dialect)


async def create_job(db: Connection, tenant_id: str, new: NewJob, events: list[NewJobEvent]) -> JobRecord:
    """Queue a job within the tenant's job quotas, under the tenant lock (as ``create_adapter``)."""
    tenant_row = await db.fetchrow(db.sql.tenant_for_create, tenant_id)
    if tenant_row is None:
        raise _no_tenant(tenant_id)
    for file_id in (new.training_file, new.validation_file):
        if file_id is not None and (await db.fetchrow(db.sql.file_by_id, file_id, tenant_id)) is None:
            raise NotFound(file_not_found(file_id))
    (usage,) = await db.fetch(db.sql.job_usage, tenant_id)
    quotas = tenant_from_row(tenant_row, db.sql.dialect).quotas
    check_job_quotas(quotas, int(usage["active"]), int(usage["tokens"]), new.training_tokens)
    record = JobRecord(
        id=new_id(JOB_PREFIX),
        tenant_id=tenant_id,
        status="queued",
        model=new.model,
        training_file=new.training_file,
        validation_file=new.validation_file,
        spec=new.spec,
        training_tokens=new.training_tokens,
        trained_tokens=None,
        fine_tuned_model=None,
        error=None,
        attempts=0,
        cancel_requested=False,
        worker_id=None,
        created_at=now(),
        started_at=None,
        heartbeat_at=None,
        finished_at=None,
    )
    await db.execute(db.sql.insert_job, *job_values(record))
    await append_events(db, record.id, events)
    return record


async def get_job(db: Connection, tenant_id: str, job_id: str) -> JobRecord:
    row = await db.fetchrow(db.sql.job_by_id, job_id, tenant_id)
    if row is None:
        raise NotFound(job_not_found(job_id))
    return job_from_row(row, db.sql.dialect)


async def list_jobs(db: Connection, tenant_id: str, after: str | None, limit: int) -> list[JobRecord]:
    rows = await db.fetch(db.sql.list_jobs, tenant_id, after, limit)
    return [job_from_row(row, db.sql.dialect) for row in rows]


async def list_job_events(db: Connection, tenant_id: str, job_id: str, after: str | None, limit: int) -> list[JobEvent]:
    await get_job(db, tenant_id, job_id)
    rows = await db.fetch(db.sql.list_events, job_id, after, limit)
    return [event_from_row(row, db.sql.dialect) for row in rows]


async def list_checkpoints(
    db: Connection, tenant_id: str, job_id: str, after: str | None, limit: int
) -> list[CheckpointRecord]:
    await get_job(db, tenant_id, job_id)
    rows = await db.fetch(db.sql.list_checkpoints, job_id, after, limit)
    return [checkpoint_from_row(row, db.sql.dialect) for row in rows]


async def cancel_job(db: Connection, tenant_id: str, job_id: str) -> JobRecord:
    row = await db.fetchrow(db.sql.job_for_update, job_id, tenant_id)
    if row is None:
        raise NotFound(job_not_found(job_id))
    job = job_from_row(row, db.sql.dialect)
    if job.status in FINISHED_STATUSES:
        raise Conflict(f"fine-tuning job {job_id!r} is already {job.status}")
    if job.status != "running":  # queued (or validating its files): no worker to tell
        await append_events(db, job_id, [NewJobEvent("Job was cancelled")])
        return await _end(db, job_id, "cancelled")
    if job.cancel_requested:
        return job  # asked already: one event is enough
    (row,) = await db.fetch(db.sql.request_cancel, job_id)
    await append_events(db, job_id, [NewJobEvent("Cancellation requested")])
    return job_from_row(row, db.sql.dialect)


WORKER_LOST_EVENT = "The worker running the job stopped; queued again"


async def claim_job(db: Connection, worker_id: str, lease_s: float, max_attempts: int) -> JobRecord | None:
    """Requeue (or fail) the jobs of lost workers, then take the oldest queued job."""
    moment = now()
    # The sweep locks what it changes; on PostgreSQL a job another claimer is sweeping (or a worker
    # is heartbeating) right now is skipped: it is theirs to settle.
    for row in await db.fetch(db.sql.expired_jobs, moment - timedelta(seconds=lease_s)):
        job = job_from_row(row, db.sql.dialect)
        if job.cancel_requested:
            await append_events(db, job.id, [NewJobEvent("Job was cancelled")])
            await _end(db, job.id, "cancelled")
        elif job.attempts >= max_attempts:
            message = f"The worker running the job stopped {job.attempts} times; the job failed"
            await append_events(db, job.id, [NewJobEvent(message, level="error")])
            await _end(db, job.id, "failed", error={"code": "worker_lost", "message": message, "param": None})
        else:
            await db.execute(db.sql.requeue_job, 0, job.id)
            await append_events(db, job.id, [NewJobEvent(WORKER_LOST_EVENT, level="warn")])
    claimed = await db.fetchrow(db.sql.claim_next, worker_id, moment)
    if claimed is None:
        return None
    job = job_from_row(claimed, db.sql.dialect)
    await append_events(db, job.id, [NewJobEvent("Fine-tuning job started")])
    return job


async def heartbeat(
    db: Connection, job_id: str, worker_id: str, events: list[NewJobEvent], trained_tokens: int | None
) -> JobRecord:
    row = await db.fetchrow(db.sql.heartbeat, now(), trained_tokens, job_id, worker_id)
    if row is None:
        raise LeaseLost(f"fine-tuning job {job_id!r} is no longer running under worker {worker_id!r}")
    await append_events(db, job_id, events)
    return job_from_row(row, db.sql.dialect)


async def finish_job(
    db: Connection,
    job_id: str,
    worker_id: str,
    status: str,
    events: list[NewJobEvent],
    adapter: NewAdapter | None,
    checkpoint: NewCheckpoint | None,
    error: dict | None,
    trained_tokens: int | None,
) -> JobRecord:
    row = await db.fetchrow(db.sql.job_of_worker, job_id, worker_id)
    if row is None:
        raise LeaseLost(f"fine-tuning job {job_id!r} is no longer running under worker {worker_id!r}")
    job = job_from_row(row, db.sql.dialect)
    fine_tuned_model = None
    if status == "succeeded":
        if adapter is None:
            raise ValueError("a succeeded job needs its adapter")
        # The job's adapter is one more adapter of its tenant: the same job, lock and quotas as the
        # API's create; a QuotaExceeded rolls the whole finish back, and the job stays running.
        await create_adapter(db, job.tenant_id, adapter)
        fine_tuned_model = adapter.name
        if checkpoint is not None:
            record = CheckpointRecord(
                id=new_id(CHECKPOINT_PREFIX),
                job_id=job_id,
                step=checkpoint.step,
                metrics=checkpoint.metrics,
                fine_tuned_model_checkpoint=adapter.name,
                created_at=now(),
            )
            await db.execute(db.sql.insert_checkpoint, *checkpoint_values(record))
    await append_events(db, job_id, events)
    return await _end(db, job_id, status, error=error, fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens)


async def release_job(db: Connection, job_id: str, worker_id: str, event: NewJobEvent) -> None:
    row = await db.fetchrow(db.sql.job_of_worker, job_id, worker_id)
    if row is None:
        return
    await append_events(db, job_id, [event])
    if job_from_row(row, db.sql.dialect).cancel_requested:
        # Queued again, it would be cancelled at once (cancel_job): do it here.
        await append_events(db, job_id, [NewJobEvent("Job was cancelled")])
        await _end(db, job_id, "cancelled")
    else:
        await db.execute(db.sql.requeue_job, -1, job_id)  # the claim does not count


async def job_counts(db: Connection) -> dict[str, int]:
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for row in await db.fetch(db.sql.job_counts):
        counts[row["status"]] = int(row["count"])
    return counts


async def training_steps_since(db: Connection, since: datetime) -> int:
    (row,) = await db.fetch(db.sql.steps_since, since)
    return int(row["count"])
