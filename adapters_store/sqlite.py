"""SQLite driver of the adapter store (standard library ``sqlite3`` only).

The operations are the shared jobs (``jobs.py``, ``sql_store.SQLStore``); this module only says
how they reach the database.

Concurrency model: one connection, used only from one dedicated worker
thread. Every write, and every read but the point reads below, submits a single
blocking function to that thread, so operations never interleave on the connection,
and a cancelled caller cannot leave a half-run transaction racing with the next one
(the job still runs to completion on the worker). Writes run inside ``BEGIN IMMEDIATE``
so the write lock is taken up front: the "read max version, insert next"
sequence cannot race with another process, and the adapter row and its blob
commit together or not at all. This write lock is why the SQLite dialect needs no row
or advisory locks.

Point reads (``get_adapter``, ``find_api_key``, ``get_file``, ``get_job``) of a file database
run on the event loop itself, on a second, read-only connection: see ``SQLiteStore._point_read``.

Change feed: in-process only. A write job announces its ``ChangeEvent`` from
the worker thread right after COMMIT (so a cancelled caller does not lose it),
and subscribers of this store instance are called on the event loop. Other
processes on the same file are not notified; PostgreSQL is the multi-replica
backend.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from .base import ChangeCallback
from .changes import ChangeFeed, threadsafe_publisher
from .errors import Conflict, StoreError, StoreUnavailable
from .jobs import migrate, run_blocking
from .migrations import dialect_migrations
from .models import ChangeEvent
from .sql import SQLITE, Statements
from .sql_store import Job, SQLStore

Publish = Callable[[ChangeEvent], None]

T = TypeVar("T")

# Schema: SQLite's SQL for each of migrations.STEPS. Append new steps at the end; never edit one.
# UNIQUE(tenant_id, name, version) is backed by an index whose (tenant_id, name)
# prefix serves every per-tenant lookup by name, so no second index is needed
# for it; the partial index serves resolving public names for other tenants.
SQLITE_MIGRATIONS = dialect_migrations(
    # 1. tenants, adapters and adapter blobs
    (
        """
            CREATE TABLE tenants (
                id          TEXT PRIMARY KEY,
                name        TEXT NOT NULL UNIQUE,
                created_at  TEXT NOT NULL
            )
            """,
        """
            CREATE TABLE adapters (
                id          TEXT PRIMARY KEY,
                tenant_id   TEXT NOT NULL REFERENCES tenants(id),
                name        TEXT NOT NULL,
                version     INTEGER NOT NULL CHECK (version >= 1),
                tokens      INTEGER NOT NULL,
                params      INTEGER NOT NULL,
                bytes       INTEGER NOT NULL,
                sha256      TEXT NOT NULL,
                base_model  TEXT NOT NULL,
                public      INTEGER NOT NULL DEFAULT 0 CHECK (public IN (0, 1)),
                created_at  TEXT NOT NULL,
                UNIQUE (tenant_id, name, version)
            )
            """,
        "CREATE INDEX adapters_public_by_name ON adapters (name) WHERE public = 1",
        """
            CREATE TABLE adapter_blobs (
                adapter_id  TEXT PRIMARY KEY REFERENCES adapters(id) ON DELETE CASCADE,
                blob        BLOB NOT NULL
            )
            """,
    ),
    # 2. tenant quotas and hashed api keys
    (
        # Existing tenants get NULL everywhere: unlimited.
        "ALTER TABLE tenants ADD COLUMN max_adapters INTEGER CHECK (max_adapters IS NULL OR max_adapters >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_adapter_bytes INTEGER"
        " CHECK (max_adapter_bytes IS NULL OR max_adapter_bytes >= 0)",
        "ALTER TABLE tenants ADD COLUMN requests_per_minute INTEGER"
        " CHECK (requests_per_minute IS NULL OR requests_per_minute >= 0)",
        """
            CREATE TABLE api_keys (
                id          TEXT PRIMARY KEY,
                tenant_id   TEXT NOT NULL REFERENCES tenants(id),
                key_hash    TEXT NOT NULL,
                prefix      TEXT NOT NULL,
                created_at  TEXT NOT NULL,
                revoked_at  TEXT
            )
            """,
        # Serves find_api_key and enforces one row per hash (revoked included).
        "CREATE UNIQUE INDEX api_keys_by_hash ON api_keys (key_hash)",
        "CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at)",
    ),
    # 3. tenant quotas on generation requests
    (
        # Existing tenants get NULL everywhere: unlimited.
        "ALTER TABLE tenants ADD COLUMN max_concurrent_requests INTEGER"
        " CHECK (max_concurrent_requests IS NULL OR max_concurrent_requests >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_n INTEGER CHECK (max_n IS NULL OR max_n >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_tokens_in_flight INTEGER"
        " CHECK (max_tokens_in_flight IS NULL OR max_tokens_in_flight >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_active_adapters INTEGER"
        " CHECK (max_active_adapters IS NULL OR max_active_adapters >= 0)",
    ),
    # 4. fine-tuning files, jobs, events and checkpoints; tenant quotas on them
    (
        # Existing tenants get NULL everywhere: unlimited.
        "ALTER TABLE tenants ADD COLUMN max_files INTEGER CHECK (max_files IS NULL OR max_files >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_file_bytes INTEGER CHECK (max_file_bytes IS NULL OR max_file_bytes >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_queued_jobs INTEGER"
        " CHECK (max_queued_jobs IS NULL OR max_queued_jobs >= 0)",
        "ALTER TABLE tenants ADD COLUMN max_training_tokens INTEGER"
        " CHECK (max_training_tokens IS NULL OR max_training_tokens >= 0)",
        # Contents apart, as adapter blobs: listings never read them.
        """
            CREATE TABLE files (
                id          TEXT PRIMARY KEY,
                tenant_id   TEXT NOT NULL REFERENCES tenants(id),
                filename    TEXT NOT NULL,
                purpose     TEXT NOT NULL,
                format      TEXT NOT NULL,
                lines       INTEGER NOT NULL CHECK (lines >= 0),
                bytes       INTEGER NOT NULL CHECK (bytes >= 0),
                created_at  TEXT NOT NULL
            )
            """,
        "CREATE INDEX files_by_tenant ON files (tenant_id, created_at, id)",
        """
            CREATE TABLE file_blobs (
                file_id     TEXT PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
                blob        BLOB NOT NULL
            )
            """,
        # The files a job names are not foreign keys: a file may be deleted once no active job
        # uses it (delete_file checks), and the finished job keeps its name.
        """
            CREATE TABLE fine_tuning_jobs (
                id                TEXT PRIMARY KEY,
                tenant_id         TEXT NOT NULL REFERENCES tenants(id),
                status            TEXT NOT NULL CHECK (status IN
                                  ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
                model             TEXT NOT NULL,
                training_file     TEXT NOT NULL,
                validation_file   TEXT,
                spec              TEXT NOT NULL,
                training_tokens   INTEGER NOT NULL CHECK (training_tokens >= 0),
                trained_tokens    INTEGER,
                fine_tuned_model  TEXT,
                error             TEXT,
                attempts          INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
                cancel_requested  INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
                worker_id         TEXT,
                created_at        TEXT NOT NULL,
                started_at        TEXT,
                heartbeat_at      TEXT,
                finished_at       TEXT
            )
            """,
        # The queue (claim_job: oldest queued; the lease sweep: running) and the tenant's listing.
        "CREATE INDEX fine_tuning_jobs_queue ON fine_tuning_jobs (status, created_at, id)",
        "CREATE INDEX fine_tuning_jobs_by_tenant ON fine_tuning_jobs (tenant_id, created_at, id)",
        """
            CREATE TABLE fine_tuning_job_events (
                id          TEXT PRIMARY KEY,
                job_id      TEXT NOT NULL REFERENCES fine_tuning_jobs(id) ON DELETE CASCADE,
                seq         INTEGER NOT NULL CHECK (seq >= 1),
                message     TEXT NOT NULL,
                level       TEXT NOT NULL,
                type        TEXT NOT NULL,
                data        TEXT,
                created_at  TEXT NOT NULL,
                UNIQUE (job_id, seq)
            )
            """,
        # The metrics' training rate (Store.training_steps_since): recent step events of every job.
        "CREATE INDEX fine_tuning_job_events_recent ON fine_tuning_job_events (type, created_at)",
        """
            CREATE TABLE fine_tuning_checkpoints (
                id                           TEXT PRIMARY KEY,
                job_id                       TEXT NOT NULL REFERENCES fine_tuning_jobs(id) ON DELETE CASCADE,
                step                         INTEGER NOT NULL,
                metrics                      TEXT NOT NULL,
                fine_tuned_model_checkpoint  TEXT NOT NULL,
                created_at                   TEXT NOT NULL
            )
            """,
        "CREATE INDEX fine_tuning_checkpoints_by_job ON fine_tuning_checkpoints (job_id, created_at, id)",
    ),
)

SQL = Statements(SQLITE)

#: The key lookup on every authenticated request; served by api_keys_by_hash
#: (tests/test_store_sqlite.py checks the plan).
FIND_API_KEY_SQL = SQL.find_api_key


class SQLiteStore(SQLStore):
    """``Store`` over one SQLite file (or ``":memory:"``)."""

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # point reads on the event loop (file databases)
        self._executor: ThreadPoolExecutor | None = None
        self._feed = ChangeFeed()

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r})"

    async def open(self) -> None:
        if self._conn is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        loop = asyncio.get_running_loop()
        connect = functools.partial(_connect, self._path, busy_timeout_ms=self._busy_timeout_ms)
        try:
            self._conn = await _mapped(loop.run_in_executor(executor, connect), self._path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor = executor
        if self._path != ":memory:":  # another connection to ":memory:" would see another database
            try:
                self._reader = _connect_reader(self._path)
            except sqlite3.Error:
                self._reader = None  # reads take the worker thread, as writes do

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn, self._executor = None, None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        await self._feed.close()
        if conn is None or executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            executor.shutdown(wait=False)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)`` on the worker thread, mapping sqlite errors."""
        if self._conn is None or self._executor is None:
            raise StoreUnavailable(f"{self!r} is not open; call open() first")
        job = functools.partial(fn, self._conn, *args)
        return await _mapped(asyncio.get_running_loop().run_in_executor(self._executor, job), self._path)

    async def _read(self, job: Job[T], *args: object) -> T:
        return await self._call(_run_read, job, *args)

    async def _write(self, job: Job[T], *args: object) -> T:
        publish = threadsafe_publisher(asyncio.get_running_loop(), self._feed)
        return await self._call(_run_write, publish, job, *args)

    async def _point_read(self, job: Job[T], *args: object) -> T:
        """A point read (primary or unique key, microseconds in SQLite) run on the event loop itself: the hop
        to the worker thread and back costs more than the query and, on a busy machine, sets the tail
        latency. WAL readers never wait for the writer; if the database is busy anyway (a checkpoint), or
        there is no reader connection, the read takes the worker thread."""
        if self._reader is None or self._conn is None:
            return await self._read(job, *args)
        try:
            return _run_read(self._reader, job, *args)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.Error:  # busy, or a failure the worker path maps to the store's errors
            return await self._read(job, *args)

    # Change feed

    async def subscribe(self, callback: ChangeCallback) -> None:
        if self._conn is None:
            raise StoreUnavailable(f"{self!r} is not open; call open() first")
        self._feed.add(callback)

    async def unsubscribe(self, callback: ChangeCallback) -> None:
        self._feed.remove(callback)


async def _mapped(job: asyncio.Future[T], path: str) -> T:
    """Await ``job``, turning sqlite failures into the store's own errors.

    Programming errors (bad SQL bindings, closed cursor) are left alone: they
    are bugs, and hiding them as "unavailable" would make them look transient.
    """
    try:
        return await job
    except StoreError:
        raise
    except sqlite3.IntegrityError as exc:
        raise Conflict(f"conflicting write: {exc}") from exc
    except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"sqlite database {path!r} failed: {exc}") from exc


# Running jobs: the functions below run whole on the store's worker thread (or, for point
# reads, on the event loop), on a connection that no other thread uses meanwhile.


class _Connection:
    """``jobs.Connection`` over a blocking sqlite3 connection: every method answers at once."""

    sql = SQL

    def __init__(self, conn: sqlite3.Connection, announced: list[ChangeEvent] | None = None) -> None:
        self._conn = conn
        self._announced = announced  # None: a read, which has nothing to announce

    async def fetch(self, sql: str, *args: object) -> list[sqlite3.Row]:
        return self._conn.execute(sql, _bind(args)).fetchall()

    async def fetchrow(self, sql: str, *args: object) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(sql, _bind(args)).fetchone()
        return row

    async def execute(self, sql: str, *args: object) -> int:
        return self._conn.execute(sql, _bind(args)).rowcount

    async def announce(self, event: ChangeEvent) -> None:
        if self._announced is None:
            raise RuntimeError(f"a read job announced {event!r}")
        self._announced.append(event)  # published once committed: see _run_write


def _bind(args: tuple[object, ...]) -> tuple[object, ...]:
    """The arguments as SQLite keeps them: times as text (``_to_text``), booleans as 0 and 1."""
    if not any(isinstance(a, (datetime, bool)) for a in args):
        return args  # the usual read: nothing to convert
    return tuple(_to_text(a) if isinstance(a, datetime) else int(a) if isinstance(a, bool) else a for a in args)


def _to_text(moment: datetime) -> str:
    """Fixed-width UTC ISO text, so string order equals time order in SQL."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _run_read(conn: sqlite3.Connection, job: Job[T], *args: object) -> T:
    return run_blocking(job(_Connection(conn), *args))


def _run_write(conn: sqlite3.Connection, publish: Publish, job: Job[T], *args: object) -> T:
    """Run a write job in one transaction, then announce its changes (only once committed)."""
    announced: list[ChangeEvent] = []
    with _transaction(conn):
        result = run_blocking(job(_Connection(conn, announced), *args))
    for event in announced:
        publish(event)
    return result


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds the write lock from its first statement."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _connect_reader(path: str) -> sqlite3.Connection:
    """A read-only connection for point reads on the event loop; it never waits on a lock (timeout 0)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA query_only = ON")
    return conn


def _connect(path: str, *, busy_timeout_ms: int) -> sqlite3.Connection:
    if path != ":memory:":  # a fresh deployment's data folder may not exist yet
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise sqlite3.OperationalError(f"cannot create the folder for {path}: {e}") from e
    # isolation_level=None hands transaction control to explicit BEGIN/COMMIT.
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=busy_timeout_ms / 1000,
    )
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        # Missing migrations in one transaction: all of them, or none.
        with _transaction(conn):
            run_blocking(migrate(_Connection(conn), SQLITE_MIGRATIONS))
    except BaseException:
        conn.close()
        raise
    return conn
