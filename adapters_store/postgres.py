"""PostgreSQL backend of the adapter store (``asyncpg`` connection pool).

Selected by ``open_store("postgresql://user:pass@host:port/db")`` (or
``postgres://``). Same contract as the SQLite backend (see ``base.py``); the
differences are in how it is enforced:

* Versions: ``create_adapter`` takes a transaction-scoped advisory lock on the
  (tenant, name) pair before reading ``MAX(version)``, so concurrent creates of
  one name, from any number of replicas, get consecutive versions; unrelated
  names do not wait on each other. ``UNIQUE (tenant_id, name, version)`` stays
  as the backstop. Row, blob and change notification commit together.
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

The URL holds a password, so messages name the server only as
``postgresql://user@host:port/db``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from .base import ChangeCallback, Store
from .changes import ChangeFeed
from .common import adapter_not_found, new_id, now, validate_new_adapter
from .errors import Conflict, NotFound, StoreConfigError, StoreError, StoreUnavailable
from .migrations import Migration, pending
from .models import CHANGE_KINDS, AdapterRecord, ChangeEvent, NewAdapter, Page, Tenant

log = logging.getLogger(__name__)

SCHEMES = ("postgresql", "postgres")

#: LISTEN/NOTIFY channel shared by every store on one database.
CHANGE_CHANNEL = "aligner_store_changes"

# Key of the database-wide advisory lock held while migrating (the one-bigint
# key space; per-name locks use the separate two-int4 key space).
MIGRATION_LOCK_KEY = 0x616C69676E6572  # "aligner"

# NOTIFY payloads must stay under 8000 bytes; larger events become "resync".
_MAX_PAYLOAD_BYTES = 7900

# Schema. Append new steps (API keys, quotas, ...) at the end; never edit one.
# Mirrors SQLITE_MIGRATIONS step for step, in PostgreSQL's dialect.
POSTGRES_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="tenants, adapters and adapter blobs",
        statements=(
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
    ),
)

_ADAPTER_COLUMNS = (
    "id, tenant_id, name, version, tokens, params, bytes, sha256, base_model, public, created_at"
)

# Same ranking as the SQLite backend: rank 1 is the newest version of the
# owner the name resolves to (the caller itself first, else the earliest
# publisher). $1 is the caller's tenant id.
_RANKED_CTE = f"""
WITH candidates AS (
    SELECT {_ADAPTER_COLUMNS},
           CASE WHEN tenant_id = $1 THEN 0 ELSE 1 END AS foreign_owner,
           MIN(created_at) OVER (PARTITION BY name, tenant_id) AS owner_since
    FROM adapters
    WHERE (tenant_id = $1 OR public) AND {{name_filter}}
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

# $2 name, $3 version or NULL.
_RESOLVED_VERSIONS = (
    _RANKED_CTE.format(name_filter="name = $2")
    + f"""
SELECT {_ADAPTER_COLUMNS} FROM ranked
WHERE tenant_id = (SELECT tenant_id FROM ranked WHERE rank = 1)
  AND ($3::integer IS NULL OR version = $3::integer)
ORDER BY version
"""
)

# $2 cursor or NULL, $3 limit.
_LIST_NEWEST = (
    _RANKED_CTE.format(name_filter="($2::text IS NULL OR name > $2::text)")
    + f"""
SELECT {_ADAPTER_COLUMNS} FROM ranked
WHERE rank = 1
ORDER BY name
LIMIT $3
"""
)

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


class PostgresStore(Store):
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
            )
        try:
            async with self._errors_mapped(), pool.acquire() as conn:
                await _migrate(conn)
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
            raise StoreUnavailable(
                f"postgresql store {self._where} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        except asyncpg.exceptions.InternalClientError as exc:
            # Seen when the server drops a pooled connection mid-exchange.
            raise StoreUnavailable(f"postgresql store {self._where} failed: {exc}") from exc
        except asyncpg.InterfaceError as exc:
            if "closed" in str(exc) or "closing" in str(exc):
                raise StoreUnavailable(f"postgresql store {self._where} failed: {exc}") from exc
            raise

    @asynccontextmanager
    async def _connection(self, *, transaction: bool = False) -> AsyncIterator[Any]:
        pool = self._require_pool()
        async with self._errors_mapped():
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                if not transaction:
                    yield conn
                    return
                async with conn.transaction():
                    yield conn

    # Tenants

    async def ensure_tenant(self, name: str) -> Tenant:
        if not name:
            raise ValueError("tenant name must not be empty")
        async with self._connection() as conn:
            # READ COMMITTED: ON CONFLICT waits for a concurrent insert of the
            # same name, and the next statement's snapshot then sees it.
            await conn.execute(
                "INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO NOTHING",
                new_id("ten_"),
                name,
                now(),
            )
            row = await conn.fetchrow("SELECT id, name, created_at FROM tenants WHERE name = $1", name)
        return Tenant(**dict(row))

    async def get_tenant(self, tenant_id: str) -> Tenant:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, name, created_at FROM tenants WHERE id = $1", tenant_id
            )
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        return Tenant(**dict(row))

    async def list_tenants(self) -> list[Tenant]:
        async with self._connection() as conn:
            rows = await conn.fetch("SELECT id, name, created_at FROM tenants ORDER BY name")
        return [Tenant(**dict(row)) for row in rows]

    # Adapters

    async def create_adapter(self, tenant_id: str, new: NewAdapter) -> AdapterRecord:
        validate_new_adapter(new)
        async with self._connection(transaction=True) as conn:
            if await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id) is None:
                raise NotFound(f"tenant {tenant_id!r} not found")
            # Serialise creators of this (tenant, name) until commit; a hash
            # collision merely serialises two unrelated names.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))", tenant_id, new.name
            )
            latest = await conn.fetchrow(
                "SELECT COALESCE(MAX(version), 0) AS version,"
                " COALESCE(BOOL_OR(public), FALSE) AS public"
                " FROM adapters WHERE tenant_id = $1 AND name = $2",
                tenant_id,
                new.name,
            )
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
                public=latest["public"],
                created_at=now(),
            )
            await conn.execute(
                f"INSERT INTO adapters ({_ADAPTER_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
            await conn.execute(
                "INSERT INTO adapter_blobs (adapter_id, blob) VALUES ($1, $2)", record.id, new.blob
            )
            await _notify(conn, ChangeEvent("adapter_created", tenant_id, new.name, record.version))
        return record

    async def get_adapter(
        self, tenant_id: str, name: str, version: int | None = None
    ) -> AdapterRecord:
        rows = await self._resolved_versions(tenant_id, name, version)
        if not rows:
            raise NotFound(adapter_not_found(name, version))
        return rows[-1]

    async def get_blob(self, adapter_id: str) -> bytes:
        async with self._connection() as conn:
            blob = await conn.fetchval(
                "SELECT blob FROM adapter_blobs WHERE adapter_id = $1", adapter_id
            )
        if blob is None:
            raise NotFound(f"adapter blob {adapter_id!r} not found")
        return bytes(blob)

    async def list_adapters(
        self, tenant_id: str, *, limit: int = 100, after: str | None = None
    ) -> Page:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        async with self._connection() as conn:
            # One extra row tells whether another page exists without a COUNT.
            rows = await conn.fetch(_LIST_NEWEST, tenant_id, after, limit + 1)
        records = [_adapter(row) for row in rows]
        items = records[:limit]
        next_after = items[-1].name if len(records) > limit else None
        return Page(items=items, next_after=next_after)

    async def list_versions(self, tenant_id: str, name: str) -> list[AdapterRecord]:
        rows = await self._resolved_versions(tenant_id, name, None)
        if not rows:
            raise NotFound(adapter_not_found(name, None))
        return rows

    async def delete_adapter(
        self, tenant_id: str, name: str, version: int | None = None
    ) -> list[AdapterRecord]:
        async with self._connection(transaction=True) as conn:
            # Blobs go with their rows through ON DELETE CASCADE.
            rows = await conn.fetch(
                "DELETE FROM adapters WHERE tenant_id = $1 AND name = $2"
                " AND ($3::integer IS NULL OR version = $3::integer)"
                f" RETURNING {_ADAPTER_COLUMNS}",
                tenant_id,
                name,
                version,
            )
            if not rows:
                raise NotFound(adapter_not_found(name, version))
            await _notify(conn, ChangeEvent("adapter_deleted", tenant_id, name, version))
        return sorted((_adapter(row) for row in rows), key=lambda r: r.version)

    async def set_public(self, adapter_tenant_id: str, name: str, public: bool) -> None:
        async with self._connection(transaction=True) as conn:
            status = await conn.execute(
                "UPDATE adapters SET public = $1 WHERE tenant_id = $2 AND name = $3",
                public,
                adapter_tenant_id,
                name,
            )
            if status == "UPDATE 0":
                raise NotFound(adapter_not_found(name, None))
            await _notify(conn, ChangeEvent("adapter_public", adapter_tenant_id, name, None))

    async def count_usage(self, tenant_id: str) -> tuple[int, int]:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM adapters WHERE tenant_id = $1",
                tenant_id,
            )
        return int(row[0]), int(row[1])

    async def _resolved_versions(
        self, tenant_id: str, name: str, version: int | None
    ) -> list[AdapterRecord]:
        async with self._connection() as conn:
            rows = await conn.fetch(_RESOLVED_VERSIONS, tenant_id, name, version)
        return [_adapter(row) for row in rows]

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
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

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


async def _migrate(conn: asyncpg.Connection) -> None:
    """Apply missing migrations in one transaction: all of them, or none.

    The advisory lock makes concurrent openers queue here; each then reads
    ``schema_migrations`` only after the previous one committed.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
        )
        applied = [row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")]
        for step in pending(POSTGRES_MIGRATIONS, applied):
            for statement in step.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                step.version,
                now(),
            )


async def _notify(conn: asyncpg.Connection, event: ChangeEvent) -> None:
    """Queue ``event`` on the channel; PostgreSQL delivers it only if the transaction commits."""
    payload = json.dumps(
        {"kind": event.kind, "tenant_id": event.tenant_id, "name": event.name, "version": event.version},
        separators=(",", ":"),
    )
    if len(payload.encode()) > _MAX_PAYLOAD_BYTES:
        payload = json.dumps({"kind": "resync", "tenant_id": "", "name": "", "version": None})
    await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, payload)


def _adapter(row: asyncpg.Record) -> AdapterRecord:
    return AdapterRecord(**dict(row))
