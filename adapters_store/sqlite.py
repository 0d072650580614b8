"""SQLite backend of the adapter store (standard library ``sqlite3`` only).

Concurrency model: one connection, used only from one dedicated worker
thread. Every public coroutine submits a single blocking function to that
thread, so operations never interleave on the connection, and a cancelled
caller cannot leave a half-run transaction racing with the next one (the job
still runs to completion on the worker). Writes run inside ``BEGIN IMMEDIATE``
so the write lock is taken up front: the "read max version, insert next"
sequence cannot race with another process, and the adapter row and its blob
commit together or not at all.

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
from pathlib import Path
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TypeVar

from .base import ChangeCallback, Store
from .changes import ChangeFeed, threadsafe_publisher
from .common import ADAPTER_COLUMNS as _ADAPTER_COLUMNS
from .common import API_KEY_COLUMNS as _API_KEY_COLUMNS
from .common import API_KEY_NOT_FOUND
from .common import TENANT_COLUMNS as _TENANT_COLUMNS
from .common import adapter_not_found as _adapter_not_found
from .common import check_quotas as _check_quotas
from .common import find_api_key_sql as _find_api_key_sql
from .common import insert_tenant_sql as _insert_tenant_sql
from .common import new_id as _new_id
from .common import now as _now
from .common import quota_values as _quota_values
from .common import quotas_from_row as _quotas_from_row
from .common import set_quotas_sql as _set_quotas_sql
from .common import validate_api_key as _validate_api_key
from .common import validate_new_adapter as _validate_new_adapter
from .common import validate_quotas as _validate_quotas
from .common import validate_tenant_name as _validate_tenant_name
from .errors import Conflict, NotFound, StoreError, StoreUnavailable
from .migrations import Migration, pending
from .models import (
    PUBLIC_TENANT_NAME,
    AdapterRecord,
    ApiKey,
    ChangeEvent,
    NewAdapter,
    Page,
    Quotas,
    Tenant,
)

Publish = Callable[[ChangeEvent], None]

T = TypeVar("T")

# Schema. Append new steps (API keys, quotas, ...) at the end; never edit one.
# UNIQUE(tenant_id, name, version) is backed by an index whose (tenant_id, name)
# prefix serves every per-tenant lookup by name, so no second index is needed
# for it; the partial index serves resolving public names for other tenants.
SQLITE_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="tenants, adapters and adapter blobs",
        statements=(
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
    ),
    Migration(
        version=2,
        description="tenant quotas and hashed api keys",
        statements=(
            # Existing tenants get NULL everywhere: unlimited.
            "ALTER TABLE tenants ADD COLUMN max_adapters INTEGER"
            " CHECK (max_adapters IS NULL OR max_adapters >= 0)",
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
    ),
    Migration(
        version=3,
        description="tenant quotas on generation requests",
        statements=(
            # Existing tenants get NULL everywhere: unlimited.
            "ALTER TABLE tenants ADD COLUMN max_concurrent_requests INTEGER"
            " CHECK (max_concurrent_requests IS NULL OR max_concurrent_requests >= 0)",
            "ALTER TABLE tenants ADD COLUMN max_n INTEGER"
            " CHECK (max_n IS NULL OR max_n >= 0)",
            "ALTER TABLE tenants ADD COLUMN max_tokens_in_flight INTEGER"
            " CHECK (max_tokens_in_flight IS NULL OR max_tokens_in_flight >= 0)",
            "ALTER TABLE tenants ADD COLUMN max_active_adapters INTEGER"
            " CHECK (max_active_adapters IS NULL OR max_active_adapters >= 0)",
        ),
    ),
)

_INSERT_TENANT = _insert_tenant_sql("?")
_SET_QUOTAS = _set_quotas_sql("?")

#: The key lookup on every authenticated request; served by api_keys_by_hash
#: (tests/test_store_sqlite.py checks the plan).
FIND_API_KEY_SQL = _find_api_key_sql("?")

# Visible adapters, ranked per name: rank 1 is the newest version of the owner
# the name resolves to (the caller itself first, else the earliest publisher).
# ``{name_filter}`` narrows the candidates before ranking.
_RANKED_CTE = f"""
WITH candidates AS (
    SELECT {_ADAPTER_COLUMNS},
           CASE WHEN tenant_id = :tenant THEN 0 ELSE 1 END AS foreign_owner,
           MIN(created_at) OVER (PARTITION BY name, tenant_id) AS owner_since
    FROM adapters
    WHERE (tenant_id = :tenant OR public = 1) AND {{name_filter}}
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

_RESOLVED_VERSIONS = (
    _RANKED_CTE.format(name_filter="name = :name")
    + f"""
SELECT {_ADAPTER_COLUMNS} FROM ranked
WHERE tenant_id = (SELECT tenant_id FROM ranked WHERE rank = 1)
  AND (:version IS NULL OR version = :version)
ORDER BY version
"""
)

_LIST_NEWEST = (
    _RANKED_CTE.format(name_filter="(:after IS NULL OR name > :after)")
    + f"""
SELECT {_ADAPTER_COLUMNS} FROM ranked
WHERE rank = 1
ORDER BY name
LIMIT :limit
"""
)


class SQLiteStore(Store):
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

    def _publisher(self) -> Publish:
        return threadsafe_publisher(asyncio.get_running_loop(), self._feed)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(conn, *args)`` on the worker thread, mapping sqlite errors."""
        if self._conn is None or self._executor is None:
            raise StoreUnavailable(f"{self!r} is not open; call open() first")
        job = functools.partial(fn, self._conn, *args)
        return await _mapped(
            asyncio.get_running_loop().run_in_executor(self._executor, job), self._path
        )

    async def _read(self, fn: Callable[..., T], *args: object) -> T:
        """A point read (primary or unique key, microseconds in SQLite) run on the event loop itself: the hop
        to the worker thread and back costs more than the query and, on a busy machine, sets the tail
        latency. WAL readers never wait for the writer; if the database is busy anyway (a checkpoint), or
        there is no reader connection, the read takes the worker thread."""
        if self._reader is None or self._conn is None:
            return await self._call(fn, *args)
        try:
            return fn(self._reader, *args)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.Error:  # busy, or a failure the worker path maps to the store's errors
            return await self._call(fn, *args)

    # Tenants

    async def ensure_tenant(self, name: str) -> Tenant:
        _validate_tenant_name(name)
        return await self._call(_ensure_tenant, name)

    async def create_tenant(self, name: str, quotas: Quotas | None = None) -> Tenant:
        _validate_tenant_name(name)
        quotas = Quotas() if quotas is None else quotas
        _validate_quotas(quotas)
        return await self._call(_create_tenant, name, quotas)

    async def set_quotas(self, tenant_id: str, quotas: Quotas) -> Tenant:
        _validate_quotas(quotas)
        return await self._call(_set_quotas, tenant_id, quotas)

    async def ensure_public_tenant(self) -> Tenant:
        return await self._call(_ensure_tenant, PUBLIC_TENANT_NAME)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        return await self._call(_get_tenant, tenant_id)

    async def list_tenants(self) -> list[Tenant]:
        return await self._call(_list_tenants)

    # API keys

    async def create_api_key(self, tenant_id: str, *, key_hash: str, prefix: str) -> ApiKey:
        _validate_api_key(key_hash, prefix)
        return await self._call(_create_api_key, tenant_id, key_hash, prefix)

    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, Tenant]:
        return await self._read(_find_api_key, key_hash)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKey]:
        return await self._call(_list_api_keys, tenant_id)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        return await self._call(_revoke_api_key, key_id)

    # Adapters

    async def create_adapter(self, tenant_id: str, new: NewAdapter) -> AdapterRecord:
        _validate_new_adapter(new)
        return await self._call(_create_adapter, tenant_id, new, self._publisher())

    async def get_adapter(
        self, tenant_id: str, name: str, version: int | None = None
    ) -> AdapterRecord:
        rows = await self._read(_resolved_versions, tenant_id, name, version)
        if not rows:
            raise NotFound(_adapter_not_found(name, version))
        return rows[-1]

    async def get_blob(self, adapter_id: str) -> bytes:
        return await self._call(_get_blob, adapter_id)

    async def list_adapters(
        self, tenant_id: str, *, limit: int = 100, after: str | None = None
    ) -> Page:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        # One extra row tells whether another page exists without a COUNT.
        rows = await self._call(_list_newest, tenant_id, after, limit + 1)
        items = rows[:limit]
        next_after = items[-1].name if len(rows) > limit else None
        return Page(items=items, next_after=next_after)

    async def list_versions(self, tenant_id: str, name: str) -> list[AdapterRecord]:
        rows = await self._call(_resolved_versions, tenant_id, name, None)
        if not rows:
            raise NotFound(_adapter_not_found(name, None))
        return rows

    async def delete_adapter(
        self, tenant_id: str, name: str, version: int | None = None
    ) -> list[AdapterRecord]:
        return await self._call(_delete_adapter, tenant_id, name, version, self._publisher())

    async def set_public(self, adapter_tenant_id: str, name: str, public: bool) -> None:
        await self._call(_set_public, adapter_tenant_id, name, public, self._publisher())

    async def count_usage(self, tenant_id: str) -> tuple[int, int]:
        return await self._call(_count_usage, tenant_id)

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


# Helpers shared by the blocking operations below.




def _to_text(moment: datetime) -> str:
    """Fixed-width UTC ISO text, so string order equals time order in SQL."""
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _from_text(text: str) -> datetime:
    return datetime.fromisoformat(text)








def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(
        id=row["id"],
        name=row["name"],
        created_at=_from_text(row["created_at"]),
        quotas=_quotas_from_row(row),
    )


def _api_key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=_from_text(row["created_at"]),
        revoked=row["revoked_at"] is not None,
    )


def _adapter(row: sqlite3.Row) -> AdapterRecord:
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
        created_at=_from_text(row["created_at"]),
    )


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


# Blocking operations: each runs whole on the store's worker thread.


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
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply missing migrations in one transaction: all of them, or none."""
    with _transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        applied = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
        for step in pending(SQLITE_MIGRATIONS, applied):
            for statement in step.statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (step.version, _to_text(_now())),
            )


def _ensure_tenant(conn: sqlite3.Connection, name: str) -> Tenant:
    with _transaction(conn):
        conn.execute(
            "INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (_new_id("ten_"), name, _to_text(_now())),
        )
        row = conn.execute(
            f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = ?", (name,)
        ).fetchone()
    return _tenant(row)


def _create_tenant(conn: sqlite3.Connection, name: str, quotas: Quotas) -> Tenant:
    with _transaction(conn):
        row = conn.execute(
            _INSERT_TENANT, (_new_id("ten_"), name, _to_text(_now()), *_quota_values(quotas))
        ).fetchone()
        if row is None:
            raise Conflict(f"tenant {name!r} already exists")
    return _tenant(row)


def _set_quotas(conn: sqlite3.Connection, tenant_id: str, quotas: Quotas) -> Tenant:
    with _transaction(conn):
        row = conn.execute(_SET_QUOTAS, (*_quota_values(quotas), tenant_id)).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
    return _tenant(row)


def _get_tenant(conn: sqlite3.Connection, tenant_id: str) -> Tenant:
    row = conn.execute(
        f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = ?", (tenant_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"tenant {tenant_id!r} not found")
    return _tenant(row)


def _list_tenants(conn: sqlite3.Connection) -> list[Tenant]:
    rows = conn.execute(
        f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name <> ? ORDER BY name",
        (PUBLIC_TENANT_NAME,),
    )
    return [_tenant(row) for row in rows]


def _create_api_key(
    conn: sqlite3.Connection, tenant_id: str, key_hash: str, prefix: str
) -> ApiKey:
    with _transaction(conn):
        if conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone() is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        # The hash is not echoed: it is as good as the key for an offline attack.
        row = conn.execute(
            "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at)"
            " VALUES (?, ?, ?, ?, ?)"
            f" ON CONFLICT (key_hash) DO NOTHING RETURNING {_API_KEY_COLUMNS}",
            (_new_id("key_"), tenant_id, key_hash, prefix, _to_text(_now())),
        ).fetchone()
        if row is None:
            raise Conflict("an api key with this hash already exists")
    return _api_key(row)


def _find_api_key(conn: sqlite3.Connection, key_hash: str) -> tuple[ApiKey, Tenant]:
    row = conn.execute(FIND_API_KEY_SQL, (key_hash,)).fetchone()
    if row is None:
        raise NotFound(API_KEY_NOT_FOUND)
    key = ApiKey(
        id=row["key_id"],
        tenant_id=row["tenant_id"],
        prefix=row["prefix"],
        created_at=_from_text(row["key_created_at"]),
        revoked=False,
    )
    return key, _tenant(row)


def _list_api_keys(conn: sqlite3.Connection, tenant_id: str) -> list[ApiKey]:
    if conn.execute("SELECT 1 FROM tenants WHERE id = ?", (tenant_id,)).fetchone() is None:
        raise NotFound(f"tenant {tenant_id!r} not found")
    rows = conn.execute(
        f"SELECT {_API_KEY_COLUMNS} FROM api_keys WHERE tenant_id = ? ORDER BY created_at, id",
        (tenant_id,),
    )
    return [_api_key(row) for row in rows]


def _revoke_api_key(conn: sqlite3.Connection, key_id: str) -> ApiKey:
    with _transaction(conn):
        # COALESCE keeps the first revocation time: revoking again changes nothing.
        row = conn.execute(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?)"
            f" WHERE id = ? RETURNING {_API_KEY_COLUMNS}",
            (_to_text(_now()), key_id),
        ).fetchone()
        if row is None:
            raise NotFound(f"api key {key_id!r} not found")
    return _api_key(row)


def _create_adapter(
    conn: sqlite3.Connection, tenant_id: str, new: NewAdapter, publish: Publish
) -> AdapterRecord:
    with _transaction(conn):
        # BEGIN IMMEDIATE holds the database write lock, so the usage read
        # here stays true until the insert below commits.
        tenant = conn.execute(
            f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE id = ?", (tenant_id,)
        ).fetchone()
        if tenant is None:
            raise NotFound(f"tenant {tenant_id!r} not found")
        count, total_bytes = _count_usage(conn, tenant_id)
        _check_quotas(_tenant(tenant).quotas, count, total_bytes, len(new.blob))
        latest = conn.execute(
            "SELECT MAX(version) AS version, MAX(public) AS public"
            " FROM adapters WHERE tenant_id = ? AND name = ?",
            (tenant_id, new.name),
        ).fetchone()
        record = AdapterRecord(
            id=_new_id("ad_"),
            tenant_id=tenant_id,
            name=new.name,
            version=(latest["version"] or 0) + 1,
            tokens=new.tokens,
            params=new.params,
            bytes=len(new.blob),
            sha256=new.sha256.lower(),
            base_model=new.base_model,
            public=bool(latest["public"]) or tenant["name"] == PUBLIC_TENANT_NAME,
            created_at=_now(),
        )
        conn.execute(
            f"INSERT INTO adapters ({_ADAPTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.tenant_id,
                record.name,
                record.version,
                record.tokens,
                record.params,
                record.bytes,
                record.sha256,
                record.base_model,
                int(record.public),
                _to_text(record.created_at),
            ),
        )
        conn.execute(
            "INSERT INTO adapter_blobs (adapter_id, blob) VALUES (?, ?)", (record.id, new.blob)
        )
    publish(ChangeEvent("adapter_created", tenant_id, record.name, record.version))
    return record


def _resolved_versions(
    conn: sqlite3.Connection, tenant_id: str, name: str, version: int | None
) -> list[AdapterRecord]:
    params = {"tenant": tenant_id, "name": name, "version": version}
    return [_adapter(row) for row in conn.execute(_RESOLVED_VERSIONS, params)]


def _list_newest(
    conn: sqlite3.Connection, tenant_id: str, after: str | None, limit: int
) -> list[AdapterRecord]:
    params = {"tenant": tenant_id, "after": after, "limit": limit}
    return [_adapter(row) for row in conn.execute(_LIST_NEWEST, params)]


def _get_blob(conn: sqlite3.Connection, adapter_id: str) -> bytes:
    row = conn.execute(
        "SELECT blob FROM adapter_blobs WHERE adapter_id = ?", (adapter_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"adapter blob {adapter_id!r} not found")
    return bytes(row["blob"])


def _delete_adapter(
    conn: sqlite3.Connection, tenant_id: str, name: str, version: int | None, publish: Publish
) -> list[AdapterRecord]:
    where = "tenant_id = :tenant AND name = :name AND (:version IS NULL OR version = :version)"
    params = {"tenant": tenant_id, "name": name, "version": version}
    with _transaction(conn):
        rows = conn.execute(
            f"SELECT {_ADAPTER_COLUMNS} FROM adapters WHERE {where} ORDER BY version", params
        ).fetchall()
        if not rows:
            raise NotFound(_adapter_not_found(name, version))
        # Blobs go with their rows through ON DELETE CASCADE.
        conn.execute(f"DELETE FROM adapters WHERE {where}", params)
    publish(ChangeEvent("adapter_deleted", tenant_id, name, version))
    return [_adapter(row) for row in rows]


def _set_public(
    conn: sqlite3.Connection, tenant_id: str, name: str, public: bool, publish: Publish
) -> None:
    with _transaction(conn):
        changed = conn.execute(
            "UPDATE adapters SET public = ? WHERE tenant_id = ? AND name = ?",
            (int(public), tenant_id, name),
        ).rowcount
        if changed == 0:
            raise NotFound(_adapter_not_found(name, None))
    publish(ChangeEvent("adapter_public", tenant_id, name, None))


def _count_usage(conn: sqlite3.Connection, tenant_id: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM adapters WHERE tenant_id = ?",
        (tenant_id,),
    ).fetchone()
    return int(row[0]), int(row[1])
