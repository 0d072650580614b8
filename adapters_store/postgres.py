"""PostgreSQL driver of the adapter store (``asyncpg`` connection pool).

Selected by ``open_store("postgresql://user:pass@host:port/db")`` (or
``postgres://``). The operations are the shared jobs (``jobs.py``,
``sql_store.SQLStore``), so the contract is the SQLite driver's; the differences
are in how it is enforced: the locks the jobs take (spelled in ``sql.POSTGRES``;
SQLite needs none) and this module's pool, change feed and error mapping:

* Versions: ``create_adapter`` takes a transaction-scoped advisory lock on the
  (tenant, name) pair before reading ``MAX(version)``, so concurrent creates of
  one name, from any number of replicas, get consecutive versions; unrelated
  names do not wait on each other. ``UNIQUE (tenant_id, name, version)`` stays
  as the backstop. Row, blob and change notification commit together.
* Quotas: ``create_adapter`` first locks the tenant row (``FOR NO KEY
  UPDATE``), which serialises one tenant's creates across replicas, so the
  usage it counts stays true until its insert commits.
* Fine-tuning queue: ``claim_job`` takes the oldest queued job with ``FOR NO KEY
  UPDATE SKIP LOCKED``, so claimers on every replica take distinct jobs without
  waiting on each other; every other write to a job locks its row first.
* Migrations: applied at ``open()`` in one transaction that first takes a
  database-wide advisory lock, so replicas starting at once apply each step
  exactly once and the others wait, then find nothing to do.
* Ordering: names are ``COLLATE "C"`` so that listings and the pagination
  cursor compare code points, exactly like SQLite, whatever the database's
  default collation.
* Change feed: each write runs ``pg_notify`` inside its transaction (so an
  event is delivered only on commit), and ``subscribe`` LISTENs on a dedicated
  connection that is health-checked and re-established when it drops (after
  which a ``resync`` event says that events may have been missed).
  A transaction-pooling proxy (pgbouncer in transaction mode) breaks LISTEN;
  point the store at PostgreSQL or a session-pooling proxy.
* Errors: SQLSTATE classes map onto the store's exceptions (``_errors_mapped``).

The URL holds a password, so messages name the server only as
``postgresql://user@host:port/db``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from .base import ChangeCallback
from .changes import ChangeFeed, cancel_and_wait
from .errors import Conflict, StoreConfigError, StoreError, StoreUnavailable
from .jobs import migrate
from .migrations import dialect_migrations
from .models import CHANGE_KINDS, ChangeEvent
from .sql import POSTGRES, Statements
from .sql_store import Job, SQLStore

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMES = ("postgresql", "postgres")

#: LISTEN/NOTIFY channel shared by every store on one database.
CHANGE_CHANNEL = "aligner_store_changes"

# NOTIFY payloads must stay under 8000 bytes; larger events become "resync".
_MAX_PAYLOAD_BYTES = 7900

# Schema: PostgreSQL's SQL for each of migrations.STEPS (as SQLITE_MIGRATIONS, step for step).
# Append new steps at the end; never edit one.
POSTGRES_MIGRATIONS = dialect_migrations(
    # 1. tenants, adapters and adapter blobs
    (
        """
            CREATE TABLE tenants (
                id          TEXT COLLATE "C" PRIMARY KEY,
                name        TEXT COLLATE "C" NOT NULL UNIQUE,
                created_at  TIMESTAMPTZ NOT NULL
            )
            """,
        """
            CREATE TABLE adapters (
                id          TEXT COLLATE "C" PRIMARY KEY,
                tenant_id   TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
                name        TEXT COLLATE "C" NOT NULL,
                version     INTEGER NOT NULL CHECK (version >= 1),
                tokens      BIGINT NOT NULL,
                params      BIGINT NOT NULL,
                bytes       BIGINT NOT NULL,
                sha256      TEXT NOT NULL,
                base_model  TEXT NOT NULL,
                public      BOOLEAN NOT NULL DEFAULT FALSE,
                created_at  TIMESTAMPTZ NOT NULL,
                UNIQUE (tenant_id, name, version)
            )
            """,
        "CREATE INDEX adapters_public_by_name ON adapters (name) WHERE public",
        """
            CREATE TABLE adapter_blobs (
                adapter_id  TEXT COLLATE "C" PRIMARY KEY
                            REFERENCES adapters(id) ON DELETE CASCADE,
                blob        BYTEA NOT NULL
            )
            """,
        # Weights do not compress; store them out of line without trying.
        "ALTER TABLE adapter_blobs ALTER COLUMN blob SET STORAGE EXTERNAL",
    ),
    # 2. tenant quotas and hashed api keys
    (
        # Existing tenants get NULL everywhere: unlimited.
        "ALTER TABLE tenants"
        " ADD COLUMN max_adapters BIGINT CHECK (max_adapters >= 0),"
        " ADD COLUMN max_adapter_bytes BIGINT CHECK (max_adapter_bytes >= 0),"
        " ADD COLUMN requests_per_minute BIGINT CHECK (requests_per_minute >= 0)",
        """
            CREATE TABLE api_keys (
                id          TEXT COLLATE "C" PRIMARY KEY,
                tenant_id   TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
                key_hash    TEXT COLLATE "C" NOT NULL,
                prefix      TEXT NOT NULL,
                created_at  TIMESTAMPTZ NOT NULL,
                revoked_at  TIMESTAMPTZ
            )
            """,
        # Serves find_api_key and enforces one row per hash (revoked included).
        "CREATE UNIQUE INDEX api_keys_by_hash ON api_keys (key_hash)",
        "CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, created_at)",
    ),
    # 3. tenant quotas on generation requests
    (
        # Existing tenants get NULL everywhere: unlimited.
        "ALTER TABLE tenants"
        " ADD COLUMN max_concurrent_requests BIGINT CHECK (max_concurrent_requests >= 0),"
        " ADD COLUMN max_n BIGINT CHECK (max_n >= 0),"
        " ADD COLUMN max_tokens_in_flight BIGINT CHECK (max_tokens_in_flight >= 0),"
        " ADD COLUMN max_active_adapters BIGINT CHECK (max_active_adapters >= 0)",
    ),
    # 4. fine-tuning files, jobs, events and checkpoints; tenant quotas on them
    (
        # Existing tenants get NULL everywhere: unlimited.
        "ALTER TABLE tenants"
        " ADD COLUMN max_files BIGINT CHECK (max_files >= 0),"
        " ADD COLUMN max_file_bytes BIGINT CHECK (max_file_bytes >= 0),"
        " ADD COLUMN max_queued_jobs BIGINT CHECK (max_queued_jobs >= 0),"
        " ADD COLUMN max_training_tokens BIGINT CHECK (max_training_tokens >= 0)",
        # Contents apart, as adapter blobs: listings never read them.
        """
            CREATE TABLE files (
                id          TEXT COLLATE "C" PRIMARY KEY,
                tenant_id   TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
                filename    TEXT NOT NULL,
                purpose     TEXT NOT NULL,
                format      TEXT NOT NULL,
                lines       BIGINT NOT NULL CHECK (lines >= 0),
                bytes       BIGINT NOT NULL CHECK (bytes >= 0),
                created_at  TIMESTAMPTZ NOT NULL
            )
            """,
        "CREATE INDEX files_by_tenant ON files (tenant_id, created_at, id)",
        """
            CREATE TABLE file_blobs (
                file_id     TEXT COLLATE "C" PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
                blob        BYTEA NOT NULL
            )
            """,
        # JSON columns (spec, error, data, metrics) are TEXT, as in SQLite: the store only hands
        # them back. The files a job names are not foreign keys: a file may be deleted once no
        # active job uses it (delete_file checks), and the finished job keeps its name.
        """
            CREATE TABLE fine_tuning_jobs (
                id                TEXT COLLATE "C" PRIMARY KEY,
                tenant_id         TEXT COLLATE "C" NOT NULL REFERENCES tenants(id),
                status            TEXT NOT NULL CHECK (status IN
                                  ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
                model             TEXT NOT NULL,
                training_file     TEXT COLLATE "C" NOT NULL,
                validation_file   TEXT COLLATE "C",
                spec              TEXT NOT NULL,
                training_tokens   BIGINT NOT NULL CHECK (training_tokens >= 0),
                trained_tokens    BIGINT,
                fine_tuned_model  TEXT,
                error             TEXT,
                attempts          INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
                cancel_requested  BOOLEAN NOT NULL DEFAULT FALSE,
                worker_id         TEXT,
                created_at        TIMESTAMPTZ NOT NULL,
                started_at        TIMESTAMPTZ,
                heartbeat_at      TIMESTAMPTZ,
                finished_at       TIMESTAMPTZ
            )
            """,
        # The queue (claim_job: oldest queued; the lease sweep: running) and the tenant's listing.
        "CREATE INDEX fine_tuning_jobs_queue ON fine_tuning_jobs (status, created_at, id)",
        "CREATE INDEX fine_tuning_jobs_by_tenant ON fine_tuning_jobs (tenant_id, created_at, id)",
        """
            CREATE TABLE fine_tuning_job_events (
                id          TEXT COLLATE "C" PRIMARY KEY,
                job_id      TEXT COLLATE "C" NOT NULL REFERENCES fine_tuning_jobs(id) ON DELETE CASCADE,
                seq         INTEGER NOT NULL CHECK (seq >= 1),
                message     TEXT NOT NULL,
                level       TEXT NOT NULL,
                type        TEXT NOT NULL,
                data        TEXT,
                created_at  TIMESTAMPTZ NOT NULL,
                UNIQUE (job_id, seq)
            )
            """,
        # The metrics' training rate (Store.training_steps_since): recent step events of every job.
        "CREATE INDEX fine_tuning_job_events_recent ON fine_tuning_job_events (type, created_at)",
        """
            CREATE TABLE fine_tuning_checkpoints (
                id                           TEXT COLLATE "C" PRIMARY KEY,
                job_id                       TEXT COLLATE "C" NOT NULL
                                             REFERENCES fine_tuning_jobs(id) ON DELETE CASCADE,
                step                         BIGINT NOT NULL,
                metrics                      TEXT NOT NULL,
                fine_tuned_model_checkpoint  TEXT NOT NULL,
                created_at                   TIMESTAMPTZ NOT NULL
            )
            """,
        "CREATE INDEX fine_tuning_checkpoints_by_job ON fine_tuning_checkpoints (job_id, created_at, id)",
        # Training data is text and compresses: keep the default (compressed, out of line) storage.
    ),
)

SQL = Statements(POSTGRES)

#: The key lookup on every authenticated request; served by api_keys_by_hash
#: (tests/store_contract/test_postgres.py checks the plan).
FIND_API_KEY_SQL = SQL.find_api_key

# SQLSTATE classes that mean a bug in this module, not a database problem.
_BUG_CLASSES = ("42", "0A", "26", "34")


def redacted(url: str) -> str:
    """``scheme://user@host:port/db`` without the password (or query string)."""
    try:
        parts = urlsplit(url)
        user = f"{unquote(parts.username)}@" if parts.username else ""
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{user}{host}{port}{parts.path}"
    except ValueError:
        return "postgresql://(unparsable URL)"


class PostgresStore(SQLStore):
    """``Store`` over one PostgreSQL database, shared safely by many replicas."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 60.0,
        keepalive_s: float = 5.0,
    ) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a malformed port
        except ValueError:
            raise StoreConfigError("malformed postgresql store URL") from None
        if parts.scheme not in SCHEMES:
            raise StoreConfigError(f"not a postgresql URL (scheme {parts.scheme!r})")
        self._dsn = url
        self._where = redacted(url)
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._keepalive_s = keepalive_s
        self._pool: asyncpg.Pool | None = None
        self._feed = ChangeFeed()
        self._listen_task: asyncio.Task[None] | None = None
        self._listen_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({self._where!r})"

    # Lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        async with self._errors_mapped():
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": "aligner-store"},
                **_POOL_RESET,
            )
        try:
            async with self._errors_mapped(), pool.acquire() as conn:
                # Missing migrations in one transaction: all of them, or none.
                async with conn.transaction():
                    await migrate(_Connection(conn), POSTGRES_MIGRATIONS)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        await self._stop_listener()
        await self._feed.close()
        self._listen_lock = None  # bound to this event loop
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=10)
        except (TimeoutError, asyncpg.PostgresError, OSError):
            pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable(f"{self!r} is not open; call open() first")
        return self._pool

    @asynccontextmanager
    async def _errors_mapped(self) -> AsyncIterator[None]:
        """Turn driver and network failures into the store's own errors."""
        try:
            yield
        except StoreError:
            raise
        except asyncpg.exceptions.ClientConfigurationError:
            # The driver's message may quote the URL, password included.
            raise StoreConfigError(f"invalid postgresql store URL for {self._where}") from None
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate or ""
            if state.startswith("23"):
                raise Conflict(f"conflicting write: {exc}") from exc
            if state.startswith("22"):
                raise ValueError(f"value rejected by the database: {exc}") from exc
            if state.startswith(("28", "3D")) or state == "42501":
                raise StoreConfigError(f"postgresql store {self._where} refused: {exc}") from exc
            if state.startswith(_BUG_CLASSES):
                raise
            raise StoreUnavailable(f"postgresql store {self._where} failed: {exc}") from exc
        except OSError as exc:  # refused, unreachable, DNS, TimeoutError
            raise StoreUnavailable(f"postgresql store {self._where} unreachable: {type(exc).__name__}: {exc}") from exc
        except asyncpg.exceptions.InternalClientError as exc:
            # Seen when the server drops a pooled connection mid-exchange.
            raise StoreUnavailable(f"postgresql store {self._where} failed: {exc}") from exc
        except asyncpg.InterfaceError as exc:
            if "closed" in str(exc) or "closing" in str(exc):
                raise StoreUnavailable(f"postgresql store {self._where} failed: {exc}") from exc
            raise

    # Running jobs

    async def _read(self, job: Job[T], *args: object) -> T:
        pool = self._require_pool()
        async with self._errors_mapped(), pool.acquire(timeout=self._connect_timeout) as conn:
            return await job(_Connection(conn), *args)

    async def _write(self, job: Job[T], *args: object) -> T:
        pool = self._require_pool()
        async with self._errors_mapped(), pool.acquire(timeout=self._connect_timeout) as conn:
            async with conn.transaction():
                return await job(_Connection(conn), *args)

    # Change feed

    async def subscribe(self, callback: ChangeCallback) -> None:
        self._require_pool()
        if self._listen_lock is None:
            self._listen_lock = asyncio.Lock()
        async with self._listen_lock:
            if self._listen_task is None or self._listen_task.done():
                conn, lost = await self._listen()
                self._listen_task = asyncio.get_running_loop().create_task(
                    self._keep_listening(conn, lost), name="postgres-store-listener"
                )
        self._feed.add(callback)

    async def unsubscribe(self, callback: ChangeCallback) -> None:
        self._feed.remove(callback)
        if not self._feed:
            await self._stop_listener()

    async def _listen(self) -> tuple[asyncpg.Connection, asyncio.Event]:
        """Open the dedicated connection and LISTEN on it."""
        lost = asyncio.Event()
        async with self._errors_mapped():
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout,
                server_settings={"application_name": "aligner-store-listener"},
            )
            try:
                conn.add_termination_listener(lambda _conn: lost.set())
                await conn.add_listener(CHANGE_CHANNEL, self._on_notification)
            except BaseException:
                conn.terminate()
                raise
        return conn, lost

    async def _keep_listening(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Health-check the listening connection; replace it when it drops."""
        try:
            while True:
                try:
                    await asyncio.wait_for(lost.wait(), timeout=self._keepalive_s)
                except TimeoutError:
                    try:
                        await conn.execute("SELECT 1", timeout=self._keepalive_s)
                        continue
                    except Exception as exc:  # any failure: replace the connection
                        log.warning("change feed connection to %s failed: %s", self._where, exc)
                conn.terminate()
                log.warning("change feed connection to %s lost; reconnecting", self._where)
                delay = 0.05
                while True:
                    try:
                        conn, lost = await self._listen()
                        break
                    except StoreError as exc:
                        log.warning("change feed reconnect to %s failed: %s", self._where, exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
                # Whatever was committed while we were away was not delivered.
                self._feed.publish(ChangeEvent("resync", "", "", None))
        finally:
            conn.terminate()

    async def _stop_listener(self) -> None:
        task, self._listen_task = self._listen_task, None
        await cancel_and_wait(task)

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            data = json.loads(payload)
            kind = data["kind"]
            if kind not in CHANGE_KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            event = ChangeEvent(kind, str(data["tenant_id"]), str(data["name"]), data["version"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring malformed change notification %r: %s", payload[:200], exc)
            return
        self._feed.publish(event)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook: skip asyncpg's default reset query when a connection is released.

    The default sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release, one more round trip per store call (about 0.3 ms of a 0.5 ms ``get_adapter``, see
    bench/store_scale.py). This store leaves no session state on a pooled connection: its advisory
    locks are transaction scoped, it never SETs, LISTENs (the change feed has its own connection,
    outside the pool) or keeps cursors. The pool still rolls back an unfinished transaction first.
    """


# asyncpg < 0.30 has no reset hook (and would pass ``reset`` on to connect()): keep its default there.
_POOL_RESET = {"reset": _keep_session} if "reset" in inspect.signature(asyncpg.create_pool).parameters else {}


class _Connection:
    """``jobs.Connection`` over an asyncpg connection."""

    sql = SQL

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        return await self._conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        return await self._conn.fetchrow(sql, *args)

    async def execute(self, sql: str, *args: object) -> int:
        return _changed(await self._conn.execute(sql, *args))

    async def announce(self, event: ChangeEvent) -> None:
        await _notify(self._conn, event)


def _changed(status: str) -> int:
    """Rows changed, from a command status such as ``UPDATE 3`` or ``INSERT 0 1`` (0 for DDL)."""
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


async def _notify(conn: asyncpg.Connection, event: ChangeEvent) -> None:
    """Queue ``event`` on the channel; PostgreSQL delivers it only if the transaction commits."""
    payload = json.dumps(
        {"kind": event.kind, "tenant_id": event.tenant_id, "name": event.name, "version": event.version},
        separators=(",", ":"),
    )
    if len(payload.encode()) > _MAX_PAYLOAD_BYTES:
        payload = json.dumps({"kind": "resync", "tenant_id": "", "name": "", "version": None})
    await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, payload)
