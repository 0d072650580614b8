"""PostgreSQL backend of the adapter store (``asyncpg`` connection pool).

Selected by ``open_store("postgresql://user:pass@host:port/db")`` (or
``postgres://``). Same contract as the SQLite backend (see ``base.py``); the
differences are in how it is enforced:

* Versions: ``create_adapter`` takes a transaction-scoped advisory lock on the
  (tenant, name) pair before reading ``MAX(version)``, so concurrent creates of
  one name, from any number of replicas, get consecutive versions; unrelated
  names do not wait on each other. ``UNIQUE (tenant_id, name, version)`` stays
  as the backstop. Row, blob and change notification commit together.
* Quotas: ``create_adapter`` first locks the tenant row (``FOR NO KEY
  UPDATE``), which serialises one tenant's creates across replicas, so the
  usage it counts stays true until its insert commits.
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
import inspect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from .base import ChangeCallback, Store
from .changes import ChangeFeed
from .common import (
    ADAPTER_COLUMNS,
    API_KEY_COLUMNS,
    API_KEY_NOT_FOUND,
    TENANT_COLUMNS,
    adapter_not_found,
    check_quotas,
    find_api_key_sql,
    insert_tenant_sql,
    new_id,
    now,
    quota_values,
    quotas_from_row,
    set_quotas_sql,
    validate_api_key,
    validate_new_adapter,
    validate_quotas,
    validate_tenant_name,
)
from .errors import Conflict, NotFound, StoreConfigError, StoreError, StoreUnavailable
from .migrations import Migration, pending
from .models import (
    CHANGE_KINDS,
    PUBLIC_TENANT_NAME,
    AdapterRecord,
    ApiKey,
    ChangeEvent,
    NewAdapter,
    Page,
    Quotas,
    Tenant,
)

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
    Migration(
        version=2,
        description="tenant quotas and hashed api keys",
        statements=(
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
    ),
    Migration(
        version=3,
        description="tenant quotas on generation requests",
        statements=(
            # Existing tenants get NULL everywhere: unlimited.
            "ALTER TABLE tenants"
            " ADD COLUMN max_concurrent_requests BIGINT CHECK (max_concurrent_requests >= 0),"
            " ADD COLUMN max_n BIGINT CHECK (max_n >= 0),"
            " ADD COLUMN max_tokens_in_flight BIGINT CHECK (max_tokens_in_flight >= 0),"
            " ADD COLUMN max_active_adapters BIGINT CHECK (max_active_adapters >= 0)",
        ),
    ),
)

_INSERT_TENANT = insert_tenant_sql("$")
_SET_QUOTAS = set_quotas_sql("$")

#: The key lookup on every authenticated request; served by api_keys_by_hash
#: (tests/store_contract/test_postgres.py checks the plan).
FIND_API_KEY_SQL = find_api_key_sql("$")

# Same ranking as the SQLite backend: rank 1 is the newest version of the
# owner the name resolves to (the caller itself first, else the earliest
# publisher). $1 is the caller's tenant id.
_RANKED_CTE = f"""
WITH candidates AS (
    SELECT {ADAPTER_COLUMNS},
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
SELECT {ADAPTER_COLUMNS} FROM ranked
WHERE tenant_id = (SELECT tenant_id FROM ranked WHERE rank = 1)
  AND ($3::integer IS NULL OR version = $3::integer)
ORDER BY version
"""
)

# $2 cursor or NULL, $3 limit.
_LIST_NEWEST = (
    _RANKED_CTE.format(name_filter="($2::text IS NULL OR name > $2::text)")
    + f"""
SELECT {ADAPTER_COLUMNS} FROM ranked
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
                **_POOL_RESET,
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
        validate_tenant_name(name)
        return await self._ensure_tenant(name)

    async def ensure_public_tenant(self) -> Tenant:
        return await self._ensure_tenant(PUBLIC_TENANT_NAME)

    async def _ensure_tenant(self, name: str) -> Tenant:
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
            row = await conn.fetchrow(
                f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1", name
            )
        return _tenant(row)

    async def create_tenant(self, name: str, quotas: Quotas | None = None) -> Tenant:
        validate_tenant_name(name)
        quotas = Quotas() if quotas is None else quotas
        validate_quotas(quotas)
        async with self._connection() as conn:
            row = await conn.fetchrow(
                _INSERT_TENANT, new_id("ten_"), name, now(), *quota_values(quotas)
            )
        if row is None:
            raise Conflict(f"tenant {name!r} already exists")
        return _tenant(row)

    async def set_quotas(self, tenant_id: str, quotas: Quotas) -> Tenant:
        validate_quotas(quotas)
        async with self._connection() as conn:
            # The row lock this takes waits for creates holding the tenant row
            # (see create_adapter), so a limit applies from the next create on.
            row = await conn.fetchrow(_SET_QUOTAS, *quota_values(quotas), tenant_id)
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        return _tenant(row)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1", tenant_id
            )
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        return _tenant(row)

    async def list_tenants(self) -> list[Tenant]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {TENANT_COLUMNS} FROM tenants WHERE name <> $1 ORDER BY name",
                PUBLIC_TENANT_NAME,
            )
        return [_tenant(row) for row in rows]

    # API keys

    async def create_api_key(self, tenant_id: str, *, key_hash: str, prefix: str) -> ApiKey:
        validate_api_key(key_hash, prefix)
        async with self._connection(transaction=True) as conn:
            # FOR KEY SHARE: the same lock the foreign key takes; it only
            # makes the NotFound explicit instead of a constraint violation.
            if await conn.fetchval(
                "SELECT 1 FROM tenants WHERE id = $1 FOR KEY SHARE", tenant_id
            ) is None:
                raise NotFound(f"tenant {tenant_id!r} not found")
            # The hash is not echoed: it is as good as the key for an offline attack.
            row = await conn.fetchrow(
                "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at)"
                " VALUES ($1, $2, $3, $4, $5)"
                f" ON CONFLICT (key_hash) DO NOTHING RETURNING {API_KEY_COLUMNS}",
                new_id("key_"),
                tenant_id,
                key_hash,
                prefix,
                now(),
            )
            if row is None:
                raise Conflict("an api key with this hash already exists")
        return _api_key(row)

    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, Tenant]:
        async with self._connection() as conn:
            row = await conn.fetchrow(FIND_API_KEY_SQL, key_hash)
        if row is None:
            raise NotFound(API_KEY_NOT_FOUND)
        key = ApiKey(
            id=row["key_id"],
            tenant_id=row["tenant_id"],
            prefix=row["prefix"],
            created_at=row["key_created_at"],
            revoked=False,
        )
        return key, _tenant(row)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKey]:
        async with self._connection() as conn:
            if await conn.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id) is None:
                raise NotFound(f"tenant {tenant_id!r} not found")
            rows = await conn.fetch(
                f"SELECT {API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1"
                " ORDER BY created_at, id",
                tenant_id,
            )
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        async with self._connection() as conn:
            # COALESCE keeps the first revocation time: revoking again changes nothing.
            row = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1)"
                f" WHERE id = $2 RETURNING {API_KEY_COLUMNS}",
                now(),
                key_id,
            )
        if row is None:
            raise NotFound(f"api key {key_id!r} not found")
        return _api_key(row)

    # Adapters

    async def create_adapter(self, tenant_id: str, new: NewAdapter) -> AdapterRecord:
        validate_new_adapter(new)
        async with self._connection(transaction=True) as conn:
            # Locking the tenant row serialises this tenant's creates (from
            # every replica) until commit, so the usage counted below cannot
            # change before our insert commits: quotas hold under concurrency.
            # NO KEY UPDATE does not block the FOR KEY SHARE that foreign key
            # checks take, and set_quotas waits for us (and we for it).
            tenant_row = await conn.fetchrow(
                f"SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1 FOR NO KEY UPDATE",
                tenant_id,
            )
            if tenant_row is None:
                raise NotFound(f"tenant {tenant_id!r} not found")
            usage = await conn.fetchrow(
                "SELECT COUNT(*) AS count, COALESCE(SUM(bytes), 0) AS bytes"
                " FROM adapters WHERE tenant_id = $1",
                tenant_id,
            )
            check_quotas(
                _tenant(tenant_row).quotas, int(usage["count"]), int(usage["bytes"]), len(new.blob)
            )
            # Serialise creators of this (tenant, name) until commit; a hash
            # collision merely serialises two unrelated names. (Redundant
            # under the tenant row lock, kept as the version backstop.)
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
                public=latest["public"] or tenant_row["name"] == PUBLIC_TENANT_NAME,
                created_at=now(),
            )
            await conn.execute(
                f"INSERT INTO adapters ({ADAPTER_COLUMNS})"
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
                f" RETURNING {ADAPTER_COLUMNS}",
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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` hook: skip asyncpg's default reset query when a connection is released.

    The default sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release, one more round trip per store call (about 0.3 ms of a 0.5 ms ``get_adapter``, see
    bench/store_scale.py). This store leaves no session state on a pooled connection: its advisory
    locks are transaction scoped, it never SETs, LISTENs (the change feed has its own connection,
    outside the pool) or keeps cursors. The pool still rolls back an unfinished transaction first.
    """


# asyncpg < 0.30 has no reset hook (and would pass ``reset`` on to connect()): keep its default there.
_POOL_RESET = (
    {"reset": _keep_session} if "reset" in inspect.signature(asyncpg.create_pool).parameters else {}
)


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


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        quotas=quotas_from_row(row),
    )


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        revoked=row["revoked_at"] is not None,
    )
