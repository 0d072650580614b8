"""The store's SQL, written once for SQLite and PostgreSQL, and the mappers from its rows to records.

``Statements(dialect)`` builds every statement the store runs (bar the migrations) from a
``Dialect``: the few words in which the two databases differ are fields of that row of data, and
the two rows, ``SQLITE`` and ``POSTGRES``, stand side by side at the end of this module. Argument
``n`` is written ``?n`` (SQLite) or ``$n`` (PostgreSQL), so both drivers pass arguments by
position and a statement may use one argument twice.

The tables' columns are named once, below; their DDL is each dialect's numbered migrations
(``migrations.STEPS``, in ``sqlite.py`` and ``postgres.py``), since a shipped step is never
edited. Both create the same tables and columns, which is all the statements rely on.

Values: a job hands in Python values (``datetime``, ``bool``) and the driver stores them as its
database wants them (SQLite: fixed-width UTC ISO text and 0/1). Reading back, the mappers below
turn a stored time into a ``datetime`` with the dialect's ``read_time``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Protocol

from .models import (
    AdapterRecord,
    ApiKey,
    CheckpointRecord,
    FileRecord,
    JobEvent,
    JobRecord,
    Quotas,
    Tenant,
)

# Columns read back, the same in both schemas. Each quota is stored in a column named after its
# ``Quotas`` field, so a new quota is a field plus one migration step per dialect.
ADAPTER_COLUMNS = "id, tenant_id, name, version, tokens, params, bytes, sha256, base_model, public, created_at"
API_KEY_COLUMNS = "id, tenant_id, prefix, created_at, revoked_at"
QUOTA_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Quotas))
_TENANT_COLUMN_NAMES = ("id", "name", "created_at", *QUOTA_COLUMNS)
TENANT_COLUMNS = ", ".join(_TENANT_COLUMN_NAMES)
# Fine-tuning. Contents (file_blobs) are read only by get_file_content; JSON columns are TEXT in
# both schemas (json.dumps on write, json.loads in the mappers below).
FILE_COLUMNS = "id, tenant_id, filename, purpose, format, lines, bytes, created_at"
JOB_COLUMNS = (
    "id, tenant_id, status, model, training_file, validation_file, spec, training_tokens, trained_tokens,"
    " fine_tuned_model, error, attempts, cancel_requested, worker_id, created_at, started_at, heartbeat_at,"
    " finished_at"
)
EVENT_COLUMNS = "id, job_id, seq, message, level, type, data, created_at"
CHECKPOINT_COLUMNS = "id, job_id, step, metrics, fine_tuned_model_checkpoint, created_at"

#: Jobs that hold a place on the queue (``max_queued_jobs``) and keep their files from deletion.
ACTIVE_STATUSES: tuple[str, ...] = ("validating_files", "queued", "running")
#: Jobs whose ``training_tokens`` no longer count against ``max_training_tokens``.
REFUNDED_STATUSES: tuple[str, ...] = ("failed", "cancelled")


def _in(statuses: tuple[str, ...]) -> str:
    """A list of status literals for ``IN``; the statuses are constants, never input."""
    return "(" + ", ".join(f"'{status}'" for status in statuses) + ")"


@dataclass(frozen=True)
class Dialect:
    """What one database spells differently in the store's statements."""

    #: ``?`` or ``$``: argument ``n`` is written ``{mark}{n}``.
    mark: str
    #: The ``public`` column as a condition. SQLite's partial index ``adapters_public_by_name``
    #: serves only the very term its ``WHERE`` names.
    public: str
    #: Whether any row of a group is public, as an aggregate that is false for no rows.
    any_public: str
    #: Column type of a point in time (``schema_migrations.applied_at``).
    timestamp: str
    #: A stored point in time (a column of that type) as an aware ``datetime``.
    read_time: Callable[[Any], datetime]
    #: Whether an argument that may be NULL needs its type spelled out (asyncpg infers types).
    typed_null_args: bool = False
    # Locks, for a database that lets writers run side by side. Their default, no lock, is right
    # where a write transaction holds the whole database's write lock.
    #: Appended to the read of the tenant row whose usage a create counts: a lock until commit.
    lock_tenant: str = ""
    #: Appended to the tenant check before inserting an API key (the foreign key's own lock).
    share_tenant: str = ""
    #: A statement of arguments (tenant id, name) that serialises the creators of one name until
    #: commit.
    lock_name: str | None = None
    #: A statement that serialises migrating processes until commit.
    lock_migrations: str | None = None
    #: Appended to the read of a fine-tuning job a write then changes: a lock until commit, so that
    #: the status read stays true and the job's events get consecutive ``seq`` numbers.
    lock_row: str = ""
    #: Appended to the queue's reads in ``claim_job``: lock the rows taken, skipping those another
    #: claimer holds, so concurrent claimers take distinct jobs without waiting on each other.
    skip_locked: str = ""

    def arg(self, n: int, sql_type: str | None = None) -> str:
        """Argument ``n``; ``sql_type`` names the type of one that may be NULL."""
        mark = f"{self.mark}{n}"
        return f"{mark}::{sql_type}" if sql_type and self.typed_null_args else mark

    def args(self, count: int) -> str:
        """Arguments 1 to ``count``, for a ``VALUES`` list."""
        return ", ".join(self.arg(n) for n in range(1, count + 1))


class Statements:
    """Every statement of the store in one dialect; built once per driver, at import."""

    def __init__(self, d: Dialect) -> None:
        self.dialect = d
        a = d.arg

        # Tenants. Tenant rows always come back whole (``TENANT_COLUMNS``).
        self.tenant_by_id = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = {a(1)}"
        self.tenant_by_name = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = {a(1)}"
        self.tenants_other_than = f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name <> {a(1)} ORDER BY name"
        self.tenant_exists = f"SELECT 1 FROM tenants WHERE id = {a(1)}"
        #: Before inserting an API key; the lock (if any) is the one the foreign key takes anyway.
        self.tenant_exists_for_key = self.tenant_exists + d.share_tenant
        #: Before a create counts the tenant's usage (see ``jobs.create_adapter``).
        self.tenant_for_create = self.tenant_by_id + d.lock_tenant
        #: Arguments (id, name, created_at): a tenant without quotas; does nothing when the name is taken.
        self.insert_bare_tenant = (
            f"INSERT INTO tenants (id, name, created_at) VALUES ({d.args(3)}) ON CONFLICT (name) DO NOTHING"
        )
        #: Arguments (id, name, created_at, *quota_values); returns the row, or none when the name is taken.
        self.insert_tenant = (
            f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ({d.args(len(_TENANT_COLUMN_NAMES))})"
            f" ON CONFLICT (name) DO NOTHING RETURNING {TENANT_COLUMNS}"
        )
        #: Arguments (*quota_values, tenant_id); returns the row.
        sets = ", ".join(f"{column} = {a(n)}" for n, column in enumerate(QUOTA_COLUMNS, 1))
        self.set_quotas = f"UPDATE tenants SET {sets} WHERE id = {a(len(QUOTA_COLUMNS) + 1)} RETURNING {TENANT_COLUMNS}"

        # API keys.
        #: Arguments (id, tenant_id, key_hash, prefix, created_at); returns the row, or none when
        #: the hash is stored already.
        self.insert_api_key = (
            f"INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) VALUES ({d.args(5)})"
            f" ON CONFLICT (key_hash) DO NOTHING RETURNING {API_KEY_COLUMNS}"
        )
        #: The key lookup on every authenticated request: the live key of a hash, joined with its
        #: tenant's row (key columns renamed); served by the index api_keys_by_hash.
        tenant = ", ".join(f"t.{column}" for column in _TENANT_COLUMN_NAMES)
        self.find_api_key = (
            "SELECT k.id AS key_id, k.tenant_id, k.prefix, k.created_at AS key_created_at,"
            f" k.revoked_at, {tenant}"
            " FROM api_keys AS k JOIN tenants AS t ON t.id = k.tenant_id"
            f" WHERE k.key_hash = {a(1)} AND k.revoked_at IS NULL"
        )
        self.api_keys_of = f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = {a(1)} ORDER BY created_at, id"
        #: Arguments (revoked_at, id). COALESCE keeps the first revocation time.
        self.revoke_api_key = (
            f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {a(1)})"
            f" WHERE id = {a(2)} RETURNING {API_KEY_COLUMNS}"
        )

        # Adapters.
        self.lock_name = d.lock_name
        self.usage = (
            f"SELECT COUNT(*) AS count, COALESCE(SUM(bytes), 0) AS bytes FROM adapters WHERE tenant_id = {a(1)}"
        )
        #: Arguments (tenant_id, name): the highest version and whether the name is public.
        self.latest = (
            f"SELECT COALESCE(MAX(version), 0) AS version, {d.any_public} AS public"
            f" FROM adapters WHERE tenant_id = {a(1)} AND name = {a(2)}"
        )
        self.insert_adapter = f"INSERT INTO adapters ({ADAPTER_COLUMNS}) VALUES ({d.args(11)})"
        self.insert_blob = f"INSERT INTO adapter_blobs (adapter_id, blob) VALUES ({d.args(2)})"
        self.blob = f"SELECT blob FROM adapter_blobs WHERE adapter_id = {a(1)}"
        #: Arguments (tenant_id, name, version or NULL for all). Blobs go with their rows through
        #: ON DELETE CASCADE; the deleted rows come back in no particular order.
        self.delete_versions = (
            f"DELETE FROM adapters WHERE tenant_id = {a(1)} AND name = {a(2)}"
            f" AND ({a(3, 'integer')} IS NULL OR version = {a(3, 'integer')})"
            f" RETURNING {ADAPTER_COLUMNS}"
        )
        #: Arguments (public, tenant_id, name).
        self.set_public = f"UPDATE adapters SET public = {a(1)} WHERE tenant_id = {a(2)} AND name = {a(3)}"

        # Visible adapters, ranked per name: rank 1 is the newest version of the owner the name
        # resolves to (the caller itself first, else the earliest publisher); see base.py.
        # Argument 1 is the caller's tenant id; ``name_filter`` narrows the candidates first.
        def ranked(name_filter: str) -> str:
            return f"""
WITH candidates AS (
    SELECT {ADAPTER_COLUMNS},
           CASE WHEN tenant_id = {a(1)} THEN 0 ELSE 1 END AS foreign_owner,
           MIN(created_at) OVER (PARTITION BY name, tenant_id) AS owner_since
    FROM adapters
    WHERE (tenant_id = {a(1)} OR {d.public}) AND {name_filter}
),
ranked AS (
    SELECT *,
           ROW_NUMBER() OVER (
               PARTITION BY name
               ORDER BY foreign_owner, owner_since, tenant_id, version DESC
           ) AS rank
    FROM candidates
)
"""

        #: Arguments (tenant_id, name, version or NULL for all): the versions the name resolves
        #: to, ascending. The lookup behind every request's adapter name.
        self.resolved_versions = ranked(f"name = {a(2)}") + (
            f"SELECT {ADAPTER_COLUMNS} FROM ranked\n"
            "WHERE tenant_id = (SELECT tenant_id FROM ranked WHERE rank = 1)\n"
            f"  AND ({a(3, 'integer')} IS NULL OR version = {a(3, 'integer')})\n"
            "ORDER BY version\n"
        )
        #: Arguments (tenant_id, cursor name or NULL, limit): the newest version of each visible
        #: name after the cursor, by name.
        self.list_newest = ranked(f"({a(2, 'text')} IS NULL OR name > {a(2, 'text')})") + (
            f"SELECT {ADAPTER_COLUMNS} FROM ranked\nWHERE rank = 1\nORDER BY name\nLIMIT {a(3)}\n"
        )

        # Fine-tuning files. Every read names the tenant: another tenant's id finds nothing.
        #: Arguments (tenant_id): the tenant's stored files and their bytes, for the quotas.
        self.file_usage = (
            f"SELECT COUNT(*) AS count, COALESCE(SUM(bytes), 0) AS bytes FROM files WHERE tenant_id = {a(1)}"
        )
        self.insert_file = f"INSERT INTO files ({FILE_COLUMNS}) VALUES ({d.args(8)})"
        self.insert_file_blob = f"INSERT INTO file_blobs (file_id, blob) VALUES ({d.args(2)})"
        #: Arguments (file_id, tenant_id).
        self.file_by_id = f"SELECT {FILE_COLUMNS} FROM files WHERE id = {a(1)} AND tenant_id = {a(2)}"
        #: Arguments (file_id, tenant_id).
        self.file_content = (
            "SELECT b.blob FROM file_blobs AS b JOIN files AS f ON f.id = b.file_id"
            f" WHERE f.id = {a(1)} AND f.tenant_id = {a(2)}"
        )
        #: Arguments (tenant_id, cursor file id or NULL, purpose or NULL, limit).
        self.list_files = (
            f"SELECT {FILE_COLUMNS} FROM files WHERE tenant_id = {a(1)}"
            f" AND ({a(3, 'text')} IS NULL OR purpose = {a(3, 'text')})"
            f" AND {_after(d, 'files', 'tenant_id')}"
            f" ORDER BY created_at DESC, id DESC LIMIT {a(4)}"
        )
        #: Arguments (tenant_id, file_id): an active job of the tenant that names the file.
        self.file_in_use = (
            f"SELECT id, status FROM fine_tuning_jobs WHERE tenant_id = {a(1)} AND status IN {_in(ACTIVE_STATUSES)}"
            f" AND (training_file = {a(2)} OR validation_file = {a(2)}) ORDER BY created_at, id LIMIT 1"
        )
        #: Arguments (file_id, tenant_id); the content goes with the row (ON DELETE CASCADE).
        self.delete_file = f"DELETE FROM files WHERE id = {a(1)} AND tenant_id = {a(2)} RETURNING {FILE_COLUMNS}"

        # Fine-tuning jobs.
        #: Arguments (tenant_id): jobs on the queue, and the training tokens not refunded.
        self.job_usage = (
            f"SELECT COALESCE(SUM(CASE WHEN status IN {_in(ACTIVE_STATUSES)} THEN 1 ELSE 0 END), 0) AS active,"
            f" COALESCE(SUM(CASE WHEN status IN {_in(REFUNDED_STATUSES)} THEN 0 ELSE training_tokens END), 0)"
            f" AS tokens FROM fine_tuning_jobs WHERE tenant_id = {a(1)}"
        )
        self.insert_job = f"INSERT INTO fine_tuning_jobs ({JOB_COLUMNS}) VALUES ({d.args(18)})"
        #: Arguments (job_id, tenant_id).
        self.job_by_id = f"SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE id = {a(1)} AND tenant_id = {a(2)}"
        #: Arguments (job_id, tenant_id): the job, locked until commit.
        self.job_for_update = self.job_by_id + d.lock_row
        #: Arguments (job_id, worker_id): the job if it runs under the worker, locked until commit.
        self.job_of_worker = (
            f"SELECT {JOB_COLUMNS} FROM fine_tuning_jobs"
            f" WHERE id = {a(1)} AND worker_id = {a(2)} AND status = 'running'{d.lock_row}"
        )
        #: Arguments (tenant_id, cursor job id or NULL, limit).
        self.list_jobs = (
            f"SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE tenant_id = {a(1)}"
            f" AND {_after(d, 'fine_tuning_jobs', 'tenant_id')}"
            f" ORDER BY created_at DESC, id DESC LIMIT {a(3)}"
        )
        #: Arguments (cutoff): running jobs whose last heartbeat is older than the cutoff, locked.
        self.expired_jobs = (
            f"SELECT {JOB_COLUMNS} FROM fine_tuning_jobs WHERE status = 'running' AND heartbeat_at < {a(1)}"
            f" ORDER BY created_at, id{d.skip_locked}"
        )
        #: Arguments (worker_id, now): the oldest queued job, now running under the worker. The
        #: subquery runs once (it is not correlated), and takes the row lock the UPDATE then holds.
        self.claim_next = (
            f"UPDATE fine_tuning_jobs SET status = 'running', worker_id = {a(1)},"
            f" started_at = COALESCE(started_at, {a(2)}), heartbeat_at = {a(2)}, attempts = attempts + 1"
            " WHERE id = (SELECT id FROM fine_tuning_jobs WHERE status = 'queued'"
            f" ORDER BY created_at, id LIMIT 1{d.skip_locked})"
            f" RETURNING {JOB_COLUMNS}"
        )
        #: Arguments (attempts change, job_id): back on the queue, under no worker.
        self.requeue_job = (
            f"UPDATE fine_tuning_jobs SET status = 'queued', worker_id = NULL, attempts = attempts + {a(1)}"
            f" WHERE id = {a(2)} RETURNING {JOB_COLUMNS}"
        )
        #: Arguments (job_id). SQLite reads TRUE as 1.
        self.request_cancel = (
            f"UPDATE fine_tuning_jobs SET cancel_requested = TRUE WHERE id = {a(1)} RETURNING {JOB_COLUMNS}"
        )
        #: Arguments (now, trained_tokens or NULL to keep, job_id, worker_id): the lease renewed,
        #: or no row when the job no longer runs under the worker.
        self.heartbeat = (
            f"UPDATE fine_tuning_jobs SET heartbeat_at = {a(1)},"
            f" trained_tokens = COALESCE({a(2, 'bigint')}, trained_tokens)"
            f" WHERE id = {a(3)} AND worker_id = {a(4)} AND status = 'running' RETURNING {JOB_COLUMNS}"
        )
        #: Arguments (status, finished_at, error JSON or NULL, fine_tuned_model or NULL,
        #: trained_tokens or NULL to keep, job_id): every ending of a job.
        self.end_job = (
            f"UPDATE fine_tuning_jobs SET status = {a(1)}, finished_at = {a(2)}, error = {a(3, 'text')},"
            f" fine_tuned_model = {a(4, 'text')}, trained_tokens = COALESCE({a(5, 'bigint')}, trained_tokens)"
            f" WHERE id = {a(6)} RETURNING {JOB_COLUMNS}"
        )
        self.job_counts = "SELECT status, COUNT(*) AS count FROM fine_tuning_jobs GROUP BY status"
        #: Arguments (since): step reports (``metrics`` events) of every job since then.
        self.steps_since = (
            f"SELECT COUNT(*) AS count FROM fine_tuning_job_events WHERE type = 'metrics' AND created_at >= {a(1)}"
        )

        # Events and checkpoints of a job; the callers check the job's tenant first.
        #: Arguments (job_id): the last seq written (0 for none). Every writer of events holds
        #: the job's row lock, so the next numbers are its own; UNIQUE (job_id, seq) backs it.
        self.last_seq = f"SELECT COALESCE(MAX(seq), 0) AS seq FROM fine_tuning_job_events WHERE job_id = {a(1)}"
        self.insert_event = f"INSERT INTO fine_tuning_job_events ({EVENT_COLUMNS}) VALUES ({d.args(8)})"
        #: Arguments (job_id, cursor event id or NULL, limit): newest (highest seq) first.
        self.list_events = (
            f"SELECT {EVENT_COLUMNS} FROM fine_tuning_job_events WHERE job_id = {a(1)}"
            f" AND ({a(2, 'text')} IS NULL OR seq < (SELECT seq FROM fine_tuning_job_events"
            f" WHERE id = {a(2, 'text')} AND job_id = {a(1)}))"
            f" ORDER BY seq DESC LIMIT {a(3)}"
        )
        self.insert_checkpoint = f"INSERT INTO fine_tuning_checkpoints ({CHECKPOINT_COLUMNS}) VALUES ({d.args(6)})"
        #: Arguments (job_id, cursor checkpoint id or NULL, limit).
        self.list_checkpoints = (
            f"SELECT {CHECKPOINT_COLUMNS} FROM fine_tuning_checkpoints WHERE job_id = {a(1)}"
            f" AND {_after(d, 'fine_tuning_checkpoints', 'job_id')}"
            f" ORDER BY created_at DESC, id DESC LIMIT {a(3)}"
        )

        # Migrations (see migrations.py).
        self.lock_migrations = d.lock_migrations
        self.create_migrations_table = (
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            f" version INTEGER PRIMARY KEY, applied_at {d.timestamp} NOT NULL)"
        )
        self.applied_migrations = "SELECT version FROM schema_migrations"
        self.record_migration = f"INSERT INTO schema_migrations (version, applied_at) VALUES ({d.args(2)})"


def _after(d: Dialect, table: str, owner: str) -> str:
    """The newest-first cursor: rows strictly after the row whose id is argument 2, among those of
    the same owner (argument 1). An unknown (or another owner's) id matches nothing, so its page is
    empty: the row comparison with an empty subquery is NULL."""
    cursor = d.arg(2, "text")
    return (
        f"({cursor} IS NULL OR (created_at, id) < (SELECT created_at, id FROM {table}"
        f" WHERE id = {cursor} AND {owner} = {d.arg(1)}))"
    )


# Rows to records.


class Row(Protocol):
    """A result row read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def quota_values(quotas: Quotas) -> tuple[int | None, ...]:
    """The quota columns' values, in ``QUOTA_COLUMNS`` order."""
    return tuple(getattr(quotas, column) for column in QUOTA_COLUMNS)


def adapter_values(record: AdapterRecord) -> tuple[object, ...]:
    """The adapter columns' values, in ``ADAPTER_COLUMNS`` order."""
    return (
        record.id,
        record.tenant_id,
        record.name,
        record.version,
        record.tokens,
        record.params,
        record.bytes,
        record.sha256,
        record.base_model,
        record.public,
        record.created_at,
    )


def tenant_from_row(row: Row, d: Dialect) -> Tenant:
    """A row holding the tenant columns."""
    return Tenant(
        id=row["id"],
        name=row["name"],
        created_at=d.read_time(row["created_at"]),
        quotas=Quotas(**{column: row[column] for column in QUOTA_COLUMNS}),
    )


def api_key_from_row(row: Row, d: Dialect) -> ApiKey:
    """A row holding the API key columns."""
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=d.read_time(row["created_at"]),
        revoked=row["revoked_at"] is not None,
    )


def found_api_key_from_row(row: Row, d: Dialect) -> tuple[ApiKey, Tenant]:
    """A row of ``Statements.find_api_key``: the live key and its tenant."""
    key = ApiKey(
        id=row["key_id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=d.read_time(row["key_created_at"]),
        revoked=False,
    )
    return key, tenant_from_row(row, d)


def adapter_from_row(row: Row, d: Dialect) -> AdapterRecord:
    """A row holding the adapter columns."""
    return AdapterRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        name=row["name"],
        version=row["version"],
        tokens=row["tokens"],
        params=row["params"],
        bytes=row["bytes"],
        sha256=row["sha256"],
        base_model=row["base_model"],
        public=bool(row["public"]),
        created_at=d.read_time(row["created_at"]),
    )


def _time_or_none(value: Any, d: Dialect) -> datetime | None:
    return None if value is None else d.read_time(value)


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def dumps_or_none(value: dict | None) -> str | None:
    """A JSON column's value (None stays NULL)."""
    return None if value is None else json.dumps(value)


def file_values(record: FileRecord) -> tuple[object, ...]:
    """The file columns' values, in ``FILE_COLUMNS`` order."""
    return (
        record.id,
        record.tenant_id,
        record.filename,
        record.purpose,
        record.format,
        record.lines,
        record.bytes,
        record.created_at,
    )


def file_from_row(row: Row, d: Dialect) -> FileRecord:
    """A row holding the file columns."""
    return FileRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        filename=row["filename"],
        purpose=row["purpose"],
        format=row["format"],
        lines=row["lines"],
        bytes=row["bytes"],
        created_at=d.read_time(row["created_at"]),
    )


def job_values(record: JobRecord) -> tuple[object, ...]:
    """The job columns' values, in ``JOB_COLUMNS`` order."""
    return (
        record.id,
        record.tenant_id,
        record.status,
        record.model,
        record.training_file,
        record.validation_file,
        json.dumps(record.spec),
        record.training_tokens,
        record.trained_tokens,
        record.fine_tuned_model,
        dumps_or_none(record.error),
        record.attempts,
        record.cancel_requested,
        record.worker_id,
        record.created_at,
        record.started_at,
        record.heartbeat_at,
        record.finished_at,
    )


def job_from_row(row: Row, d: Dialect) -> JobRecord:
    """A row holding the job columns."""
    return JobRecord(
        id=row["id"],
        tenant_id=row["tenant_id"],
        status=row["status"],
        model=row["model"],
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        spec=json.loads(row["spec"]),
        training_tokens=row["training_tokens"],
        trained_tokens=row["trained_tokens"],
        fine_tuned_model=row["fine_tuned_model"],
        error=_json_or_none(row["error"]),
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        worker_id=row["worker_id"],
        created_at=d.read_time(row["created_at"]),
        started_at=_time_or_none(row["started_at"], d),
        heartbeat_at=_time_or_none(row["heartbeat_at"], d),
        finished_at=_time_or_none(row["finished_at"], d),
    )


def event_values(record: JobEvent) -> tuple[object, ...]:
    """The event columns' values, in ``EVENT_COLUMNS`` order."""
    return (
        record.id,
        record.job_id,
        record.seq,
        record.message,
        record.level,
        record.type,
        dumps_or_none(record.data),
        record.created_at,
    )


def event_from_row(row: Row, d: Dialect) -> JobEvent:
    """A row holding the event columns."""
    return JobEvent(
        id=row["id"],
        job_id=row["job_id"],
        seq=row["seq"],
        message=row["message"],
        level=row["level"],
        type=row["type"],
        data=_json_or_none(row["data"]),
        created_at=d.read_time(row["created_at"]),
    )


def checkpoint_values(record: CheckpointRecord) -> tuple[object, ...]:
    """The checkpoint columns' values, in ``CHECKPOINT_COLUMNS`` order."""
    return (
        record.id,
        record.job_id,
        record.step,
        json.dumps(record.metrics),
        record.fine_tuned_model_checkpoint,
        record.created_at,
    )


def checkpoint_from_row(row: Row, d: Dialect) -> CheckpointRecord:
    """A row holding the checkpoint columns."""
    return CheckpointRecord(
        id=row["id"],
        job_id=row["job_id"],
        step=row["step"],
        metrics=json.loads(row["metrics"]),
        fine_tuned_model_checkpoint=row["fine_tuned_model_checkpoint"],
        created_at=d.read_time(row["created_at"]),
    )


# The two dialects.

#: SQLite: one writer at a time (``BEGIN IMMEDIATE`` holds the database's write lock for a whole
#: write transaction), so no locks; times are fixed-width UTC ISO text (see ``sqlite._bind``).
SQLITE = Dialect(
    mark="?",
    public="public = 1",
    any_public="COALESCE(MAX(public), 0)",
    timestamp="TEXT",
    read_time=datetime.fromisoformat,
)

#: Key of PostgreSQL's database-wide advisory lock held while migrating (the one-bigint key
#: space; per-name locks use the separate two-int4 key space).
MIGRATION_LOCK_KEY = 0x616C69676E6572  # "aligner"

#: PostgreSQL: replicas write side by side, so creates lock the tenant row (``FOR NO KEY UPDATE``
#: serialises one tenant's creates and does not block the ``FOR KEY SHARE`` of foreign key checks)
#: and the (tenant, name) pair (a transaction-scoped advisory lock), migrations take a
#: database-wide advisory lock, writes to a fine-tuning job lock its row, and claimers of the
#: queue skip the rows other claimers hold (``SKIP LOCKED``).
POSTGRES = Dialect(
    mark="$",
    typed_null_args=True,
    public="public",
    any_public="COALESCE(BOOL_OR(public), FALSE)",
    timestamp="TIMESTAMPTZ",
    read_time=lambda moment: moment,  # asyncpg returns TIMESTAMPTZ as an aware datetime
    lock_tenant=" FOR NO KEY UPDATE",
    share_tenant=" FOR KEY SHARE",
    lock_name="SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
    lock_migrations=f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})",
    lock_row=" FOR NO KEY UPDATE",
    skip_locked=" FOR NO KEY UPDATE SKIP LOCKED",
)
