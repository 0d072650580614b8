"""Tests of the SQLite adapter store against real database files."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from adapters_store import (
    NewAdapter,
    NotFound,
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


def new_adapter(name: str, blob: bytes = b"weights", *, tokens: int = 4) -> NewAdapter:
    return NewAdapter(
        name=name,
        blob=blob,
        tokens=tokens,
        params=tokens * 8,
        sha256=hashlib.sha256(blob).hexdigest(),
        base_model="tiny-base",
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def test_ensure_tenant_is_idempotent(db: Path) -> None:
    async def body(store: Store):
        first = await store.ensure_tenant("acme")
        second = await store.ensure_tenant("acme")
        other = await store.ensure_tenant("globex")
        return first, second, other, await store.list_tenants(), await store.get_tenant(first.id)

    first, second, other, tenants, fetched = run_with_store(db, body)
    assert first == second == fetched
    assert first.id.startswith("ten_") and other.id != first.id
    assert [t.name for t in tenants] == ["acme", "globex"]
    assert first.created_at.utcoffset() == timedelta(0)


def test_get_tenant_missing_raises_not_found(db: Path) -> None:
    async def body(store: Store) -> None:
        await store.get_tenant("ten_missing")

    with pytest.raises(NotFound, match="ten_missing"):
        run_with_store(db, body)


def test_create_assigns_increasing_versions(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        v1 = await store.create_adapter(tenant.id, new_adapter("tone", b"one"))
        v2 = await store.create_adapter(tenant.id, new_adapter("tone", b"two!"))
        other = await store.create_adapter(tenant.id, new_adapter("other"))
        return tenant, v1, v2, other

    tenant, v1, v2, other = run_with_store(db, body)
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.id.startswith("ad_") and v1.id != v2.id
    assert v1.tenant_id == tenant.id
    assert (v2.bytes, v2.tokens, v2.params, v2.base_model) == (4, 4, 32, "tiny-base")
    assert v2.sha256 == hashlib.sha256(b"two!").hexdigest()
    assert v1.public is False
    assert v1.created_at.tzinfo is not None


def test_create_rejects_wrong_digest(db: Path) -> None:
    async def body(store: Store) -> None:
        tenant = await store.ensure_tenant("acme")
        bad = NewAdapter("x", b"abc", 1, 1, hashlib.sha256(b"other").hexdigest(), "m")
        await store.create_adapter(tenant.id, bad)

    with pytest.raises(ValueError, match="sha256"):
        run_with_store(db, body)


def test_get_newest_and_pinned_version(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for blob in (b"a", b"bb", b"ccc"):
            await store.create_adapter(tenant.id, new_adapter("tone", blob))
        newest = await store.get_adapter(tenant.id, "tone")
        pinned = await store.get_adapter(tenant.id, "tone", 2)
        return newest, pinned

    newest, pinned = run_with_store(db, body)
    assert (newest.version, newest.bytes) == (3, 3)
    assert (pinned.version, pinned.bytes) == (2, 2)


def test_not_found_message_does_not_reveal_existence(db: Path) -> None:
    async def body(store: Store) -> tuple[str, str, str]:
        owner = await store.ensure_tenant("owner")
        stranger = await store.ensure_tenant("stranger")
        await store.create_adapter(owner.id, new_adapter("secret"))
        messages = []
        for tenant_id, name, version in (
            (stranger.id, "secret", None),
            (stranger.id, "nothing", None),
            (owner.id, "secret", 9),
        ):
            with pytest.raises(NotFound) as caught:
                await store.get_adapter(tenant_id, name, version)
            messages.append(str(caught.value))
        with pytest.raises(NotFound) as caught:
            await store.list_versions(stranger.id, "secret")
        assert str(caught.value) == messages[0]
        return messages[0], messages[1], messages[2]

    hidden, absent, missing_version = run_with_store(db, body)
    assert hidden == "adapter 'secret' not found"
    assert absent == "adapter 'nothing' not found"
    assert hidden.replace("secret", "nothing") == absent
    assert missing_version == "adapter 'secret' version 9 not found"


def test_public_adapter_visible_but_not_deletable_by_others(db: Path) -> None:
    async def body(store: Store):
        owner = await store.ensure_tenant("owner")
        reader = await store.ensure_tenant("reader")
        created = await store.create_adapter(owner.id, new_adapter("shared"))
        await store.set_public(owner.id, "shared", True)
        seen = await store.get_adapter(reader.id, "shared")
        listed = await store.list_adapters(reader.id)
        with pytest.raises(NotFound):
            await store.delete_adapter(reader.id, "shared")
        still_there = await store.get_adapter(owner.id, "shared")
        await store.set_public(owner.id, "shared", False)
        with pytest.raises(NotFound):
            await store.get_adapter(reader.id, "shared")
        return created, seen, listed, still_there

    created, seen, listed, still_there = run_with_store(db, body)
    assert seen.id == created.id and seen.public is True
    assert [a.id for a in listed.items] == [created.id]
    assert still_there.id == created.id


def test_new_version_inherits_public_flag(db: Path) -> None:
    async def body(store: Store):
        owner = await store.ensure_tenant("owner")
        reader = await store.ensure_tenant("reader")
        await store.create_adapter(owner.id, new_adapter("shared"))
        await store.set_public(owner.id, "shared", True)
        v2 = await store.create_adapter(owner.id, new_adapter("shared", b"v2"))
        return v2, await store.get_adapter(reader.id, "shared")

    v2, seen = run_with_store(db, body)
    assert v2.public is True
    assert (seen.id, seen.version) == (v2.id, 2)


def test_set_public_on_unowned_name_raises_not_found(db: Path) -> None:
    async def body(store: Store) -> None:
        owner = await store.ensure_tenant("owner")
        other = await store.ensure_tenant("other")
        await store.create_adapter(owner.id, new_adapter("mine"))
        await store.set_public(other.id, "mine", True)

    with pytest.raises(NotFound, match="adapter 'mine' not found"):
        run_with_store(db, body)


def test_own_adapter_shadows_public_same_name(db: Path) -> None:
    async def body(store: Store):
        publisher = await store.ensure_tenant("publisher")
        tenant = await store.ensure_tenant("tenant")
        for blob in (b"p1", b"p2", b"p3"):
            await store.create_adapter(publisher.id, new_adapter("tone", blob))
        await store.set_public(publisher.id, "tone", True)
        own = await store.create_adapter(tenant.id, new_adapter("tone", b"mine"))
        got = await store.get_adapter(tenant.id, "tone")
        versions = await store.list_versions(tenant.id, "tone")
        listed = await store.list_adapters(tenant.id)
        with pytest.raises(NotFound):
            await store.get_adapter(tenant.id, "tone", 3)
        return own, got, versions, listed

    own, got, versions, listed = run_with_store(db, body)
    assert got.id == own.id and got.version == 1
    assert [v.id for v in versions] == [own.id]
    assert [a.id for a in listed.items] == [own.id]


def test_list_adapters_paginates_across_three_pages(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for name in ("echo", "alpha", "delta", "bravo", "charlie"):
            await store.create_adapter(tenant.id, new_adapter(name))
        await store.create_adapter(tenant.id, new_adapter("bravo", b"newer"))
        pages = []
        after = None
        while True:
            page = await store.list_adapters(tenant.id, limit=2, after=after)
            pages.append(page)
            if page.next_after is None:
                return pages
            after = page.next_after

    pages = run_with_store(db, body)
    assert [[a.name for a in p.items] for p in pages] == [
        ["alpha", "bravo"],
        ["charlie", "delta"],
        ["echo"],
    ]
    assert [p.next_after for p in pages] == ["bravo", "delta", None]
    assert pages[0].items[1].version == 2


def test_list_adapters_exact_page_boundary_ends_with_none(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for name in ("a", "b"):
            await store.create_adapter(tenant.id, new_adapter(name))
        return await store.list_adapters(tenant.id, limit=2)

    page = run_with_store(db, body)
    assert [a.name for a in page.items] == ["a", "b"]
    assert page.next_after is None


def test_list_versions_ascending(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for blob in (b"1", b"22", b"333"):
            await store.create_adapter(tenant.id, new_adapter("tone", blob))
        return await store.list_versions(tenant.id, "tone")

    versions = run_with_store(db, body)
    assert [(v.version, v.bytes) for v in versions] == [(1, 1), (2, 2), (3, 3)]


def test_delete_all_versions_then_not_found(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        created = [
            await store.create_adapter(tenant.id, new_adapter("tone", blob)) for blob in (b"1", b"2")
        ]
        deleted = await store.delete_adapter(tenant.id, "tone")
        with pytest.raises(NotFound, match="adapter 'tone' not found"):
            await store.get_adapter(tenant.id, "tone")
        with pytest.raises(NotFound):
            await store.get_blob(created[0].id)
        with pytest.raises(NotFound):
            await store.delete_adapter(tenant.id, "tone")
        return created, deleted, await store.count_usage(tenant.id)

    created, deleted, usage = run_with_store(db, body)
    assert [d.id for d in deleted] == [c.id for c in created]
    assert usage == (0, 0)


def test_delete_one_version(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for blob in (b"1", b"2", b"3"):
            await store.create_adapter(tenant.id, new_adapter("tone", blob))
        deleted = await store.delete_adapter(tenant.id, "tone", 2)
        remaining = await store.list_versions(tenant.id, "tone")
        with pytest.raises(NotFound, match="version 2"):
            await store.delete_adapter(tenant.id, "tone", 2)
        return deleted, remaining

    deleted, remaining = run_with_store(db, body)
    assert [d.version for d in deleted] == [2]
    assert [r.version for r in remaining] == [1, 3]


def test_blob_round_trip(db: Path) -> None:
    blob = bytes(range(256)) * 1000

    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        record = await store.create_adapter(tenant.id, new_adapter("big", blob))
        with pytest.raises(NotFound):
            await store.get_blob("ad_missing")
        return record, await store.get_blob(record.id)

    record, fetched = run_with_store(db, body)
    assert fetched == blob
    assert record.bytes == len(blob) == 256_000


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


def test_concurrent_creates_get_distinct_versions(db: Path) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        records = await asyncio.gather(
            *(
                store.create_adapter(tenant.id, new_adapter("hot", str(i).encode()))
                for i in range(20)
            )
        )
        return records, await store.list_versions(tenant.id, "hot")

    records, versions = run_with_store(db, body)
    assert sorted(r.version for r in records) == list(range(1, 21))
    assert [v.version for v in versions] == list(range(1, 21))


def test_count_usage(db: Path) -> None:
    async def body(store: Store):
        acme = await store.ensure_tenant("acme")
        other = await store.ensure_tenant("other")
        await store.create_adapter(acme.id, new_adapter("a", b"x" * 10))
        await store.create_adapter(acme.id, new_adapter("a", b"x" * 5))
        await store.create_adapter(acme.id, new_adapter("b", b"x" * 7))
        await store.create_adapter(other.id, new_adapter("a", b"x" * 100))
        return await store.count_usage(acme.id), await store.count_usage(other.id)

    acme_usage, other_usage = run_with_store(db, body)
    assert acme_usage == (3, 22)
    assert other_usage == (1, 100)


def test_create_for_unknown_tenant_raises_not_found(db: Path) -> None:
    async def body(store: Store) -> None:
        await store.create_adapter("ten_nobody", new_adapter("x"))

    with pytest.raises(NotFound, match="ten_nobody"):
        run_with_store(db, body)


def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(StoreConfigError, match="sqlite:///") as caught:
        open_store("postgresql://user:hunter2@db/aligner")
    assert "'postgresql'" in str(caught.value)
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


def test_use_before_open_raises_store_unavailable() -> None:
    async def main() -> None:
        await SQLiteStore(":memory:").list_tenants()

    with pytest.raises(StoreUnavailable, match="not open"):
        asyncio.run(main())


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
