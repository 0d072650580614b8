"""SQLite-specific store tests (files, locking, corruption).

Backend-independent behaviour is in tests/store_contract/, which runs against
SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from store_contract.support import new_adapter

from adapters_store import (
    SQLiteStore,
    Store,
    StoreConfigError,
    StoreUnavailable,
    open_store,
)

T = TypeVar("T")


def run_with_store(path: Path, body: Callable[[Store], Awaitable[T]]) -> T:
    """Open a store on ``path``, run ``body`` with it, and close it."""

    async def main() -> T:
        async with open_store(f"sqlite:///{path}") as store:
            return await body(store)

    return asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def test_data_survives_reopen_and_migrations_not_reapplied(db: Path) -> None:
    async def first(store: Store):
        tenant = await store.ensure_tenant("acme")
        return tenant, await store.create_adapter(tenant.id, new_adapter("tone", b"kept"))

    async def second(store: Store):
        tenant = await store.ensure_tenant("acme")
        return tenant, await store.get_adapter(tenant.id, "tone"), await store.get_blob(record.id)

    def migration_rows() -> list[tuple[int, str]]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()

    tenant, record = run_with_store(db, first)
    rows_after_first = migration_rows()
    tenant_again, fetched, blob = run_with_store(db, second)
    rows_after_second = migration_rows()

    assert len(rows_after_first) >= 1
    assert rows_after_second == rows_after_first
    assert tenant_again.id == tenant.id
    assert fetched == record
    assert blob == b"kept"


def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(StoreConfigError, match="sqlite:///") as caught:
        open_store("mysql://user:hunter2@db/aligner")
    assert "'mysql'" in str(caught.value)
    assert "postgresql://" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_open_store_memory_url_works() -> None:
    async def main():
        store = open_store("sqlite:///:memory:")
        assert isinstance(store, SQLiteStore)
        async with store:
            tenant = await store.ensure_tenant("acme")
            return await store.create_adapter(tenant.id, new_adapter("tone"))

    assert asyncio.run(main()).version == 1


def test_missing_folder_is_created(tmp_path: Path) -> None:
    async def main() -> int:
        async with open_store(f"sqlite:///{tmp_path / 'new-dir' / 'x.db'}") as store:
            return len(await store.list_tenants())

    assert asyncio.run(main()) == 0
    assert (tmp_path / "new-dir" / "x.db").is_file()


def test_unopenable_file_raises_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")

    async def main() -> None:
        await open_store(f"sqlite:///{tmp_path / 'a-file' / 'x.db'}").open()

    with pytest.raises(StoreUnavailable) as caught:
        asyncio.run(main())
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


def test_locked_database_raises_store_unavailable(db: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(str(db), busy_timeout_ms=50) as store:
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                await store.ensure_tenant("acme")
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()

    with pytest.raises(StoreUnavailable, match="locked") as caught:
        asyncio.run(main())
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


def test_corrupt_file_raises_store_unavailable(db: Path) -> None:
    db.write_bytes(b"this is not a sqlite database" * 100)

    async def main() -> None:
        await SQLiteStore(str(db)).open()

    with pytest.raises(StoreUnavailable):
        asyncio.run(main())


def test_newer_schema_version_is_refused(db: Path) -> None:
    run_with_store(db, lambda store: store.list_tenants())
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 'x')")

    with pytest.raises(StoreConfigError, match="newer"):
        run_with_store(db, lambda store: store.list_tenants())


def test_change_feed_is_per_store_instance(db: Path) -> None:
    """SQLite's feed is in-process: a second store on the same file is not told."""

    async def main():
        seen_a, seen_b = [], []
        async with open_store(f"sqlite:///{db}") as a, open_store(f"sqlite:///{db}") as b:
            await a.subscribe(seen_a.append)
            await b.subscribe(seen_b.append)
            tenant = await a.ensure_tenant("acme")
            await a.create_adapter(tenant.id, new_adapter("tone"))
            await asyncio.sleep(0.2)
        return seen_a, seen_b

    seen_a, seen_b = asyncio.run(main())
    assert [e.kind for e in seen_a] == ["adapter_created"]
    assert seen_b == []


def test_find_api_key_uses_the_hash_index(db: Path) -> None:
    from adapters_store.sqlite import FIND_API_KEY_SQL

    async def body(store: Store):
        for i in range(3):
            tenant = await store.create_tenant(f"t{i}")
            await store.create_api_key(tenant.id, key_hash=f"h{i}", prefix="sk-")
        return await store.find_api_key("h1")

    key, tenant = run_with_store(db, body)
    assert tenant.name == "t1"
    with sqlite3.connect(db) as conn:
        plan = " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {FIND_API_KEY_SQL}", ("h1",)))
    assert "USING INDEX api_keys_by_hash (key_hash=?)" in plan, plan
    assert "SCAN k" not in plan and "SCAN api_keys" not in plan, plan


def test_point_reads_run_on_the_event_loop_and_see_every_commit(db: Path) -> None:
    """get_adapter and find_api_key read on the loop (a second, read-only connection): no hop to the worker
    thread, and each read sees the writes committed before it, while a writer holds the write lock too."""
    from adapters_store import NotFound

    async def main() -> None:
        async with SQLiteStore(str(db)) as store:
            tenant = await store.ensure_tenant("acme")
            hops = []
            real_call = store._call
            store._call = lambda fn, *a: hops.append(fn.__name__) or real_call(fn, *a)  # type: ignore[method-assign]
            for v in (1, 2):
                store._call = lambda fn, *a: real_call(fn, *a)  # type: ignore[method-assign]
                await store.create_adapter(tenant.id, new_adapter("persona", f"v{v}".encode()))
                store._call = lambda fn, *a: hops.append(fn.__name__) or real_call(fn, *a)  # type: ignore[method-assign]
                assert (await store.get_adapter(tenant.id, "persona")).version == v
            blocker = sqlite3.connect(db, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # a writer elsewhere: WAL readers go on
            try:
                assert (await store.get_adapter(tenant.id, "persona", 1)).version == 1
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            store._call = real_call  # type: ignore[method-assign]
            await store.delete_adapter(tenant.id, "persona")
            with pytest.raises(NotFound):
                await store.get_adapter(tenant.id, "persona")
            assert hops == []  # every get_adapter above ran on the loop
            with pytest.raises(sqlite3.OperationalError, match="readonly"):  # the reader is read-only
                store._reader.execute("DELETE FROM tenants")  # type: ignore[union-attr]

    asyncio.run(main())
