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
from typing import Any, Protocol, TypeVar

from .common import API_KEY_NOT_FOUND, adapter_not_found, check_quotas, new_id, now
from .errors import Conflict, NotFound
from .migrations import Migration, pending
from .models import PUBLIC_TENANT_NAME, AdapterRecord, ApiKey, ChangeEvent, NewAdapter, Quotas, Tenant
from .sql import (
    Row,
    Statements,
    adapter_from_row,
    adapter_values,
    api_key_from_row,
    found_api_key_from_row,
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
