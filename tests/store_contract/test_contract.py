"""The store contract, run against every backend (SQLite, and PostgreSQL when configured).

Each test gets a fresh, empty store from the ``backend`` fixture (conftest.py).
PostgreSQL runs need ALIGNER_TEST_POSTGRES_URL (see deploy/dev/postgres.sh);
without it they are skipped, except under CI=true where they fail.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest

from adapters_store import ChangeEvent, NewAdapter, NotFound, Store, StoreUnavailable

from .conftest import Backend
from .support import kinds, new_adapter, wait_until


def test_ensure_tenant_is_idempotent(backend: Backend) -> None:
    async def body(store: Store):
        first = await store.ensure_tenant("acme")
        second = await store.ensure_tenant("acme")
        other = await store.ensure_tenant("globex")
        return first, second, other, await store.list_tenants(), await store.get_tenant(first.id)

    first, second, other, tenants, fetched = backend.run(body)
    assert first == second == fetched
    assert first.id.startswith("ten_") and other.id != first.id
    assert [t.name for t in tenants] == ["acme", "globex"]
    assert first.created_at.utcoffset() == timedelta(0)


def test_get_tenant_missing_raises_not_found(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.get_tenant("ten_missing")

    with pytest.raises(NotFound, match="ten_missing"):
        backend.run(body)


def test_create_assigns_increasing_versions(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        v1 = await store.create_adapter(tenant.id, new_adapter("tone", b"one"))
        v2 = await store.create_adapter(tenant.id, new_adapter("tone", b"two!"))
        other = await store.create_adapter(tenant.id, new_adapter("other"))
        return tenant, v1, v2, other

    tenant, v1, v2, other = backend.run(body)
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.id.startswith("ad_") and v1.id != v2.id
    assert v1.tenant_id == tenant.id
    assert (v2.bytes, v2.tokens, v2.params, v2.base_model) == (4, 4, 32, "tiny-base")
    assert v2.sha256 == hashlib.sha256(b"two!").hexdigest()
    assert v1.public is False
    assert v1.created_at.tzinfo is not None


def test_create_rejects_wrong_digest(backend: Backend) -> None:
    async def body(store: Store) -> None:
        tenant = await store.ensure_tenant("acme")
        bad = NewAdapter("x", b"abc", 1, 1, hashlib.sha256(b"other").hexdigest(), "m")
        await store.create_adapter(tenant.id, bad)

    with pytest.raises(ValueError, match="sha256"):
        backend.run(body)


def test_get_newest_and_pinned_version(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for blob in (b"a", b"bb", b"ccc"):
            await store.create_adapter(tenant.id, new_adapter("tone", blob))
        newest = await store.get_adapter(tenant.id, "tone")
        pinned = await store.get_adapter(tenant.id, "tone", 2)
        return newest, pinned

    newest, pinned = backend.run(body)
    assert (newest.version, newest.bytes) == (3, 3)
    assert (pinned.version, pinned.bytes) == (2, 2)


def test_not_found_message_does_not_reveal_existence(backend: Backend) -> None:
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

    hidden, absent, missing_version = backend.run(body)
    assert hidden == "adapter 'secret' not found"
    assert absent == "adapter 'nothing' not found"
    assert hidden.replace("secret", "nothing") == absent
    assert missing_version == "adapter 'secret' version 9 not found"


def test_public_adapter_visible_but_not_deletable_by_others(backend: Backend) -> None:
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

    created, seen, listed, still_there = backend.run(body)
    assert seen.id == created.id and seen.public is True
    assert [a.id for a in listed.items] == [created.id]
    assert still_there.id == created.id


def test_new_version_inherits_public_flag(backend: Backend) -> None:
    async def body(store: Store):
        owner = await store.ensure_tenant("owner")
        reader = await store.ensure_tenant("reader")
        await store.create_adapter(owner.id, new_adapter("shared"))
        await store.set_public(owner.id, "shared", True)
        v2 = await store.create_adapter(owner.id, new_adapter("shared", b"v2"))
        return v2, await store.get_adapter(reader.id, "shared")

    v2, seen = backend.run(body)
    assert v2.public is True
    assert (seen.id, seen.version) == (v2.id, 2)


def test_set_public_on_unowned_name_raises_not_found(backend: Backend) -> None:
    async def body(store: Store) -> None:
        owner = await store.ensure_tenant("owner")
        other = await store.ensure_tenant("other")
        await store.create_adapter(owner.id, new_adapter("mine"))
        await store.set_public(other.id, "mine", True)

    with pytest.raises(NotFound, match="adapter 'mine' not found"):
        backend.run(body)


def test_own_adapter_shadows_public_same_name(backend: Backend) -> None:
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

    own, got, versions, listed = backend.run(body)
    assert got.id == own.id and got.version == 1
    assert [v.id for v in versions] == [own.id]
    assert [a.id for a in listed.items] == [own.id]


def test_list_adapters_paginates_across_three_pages(backend: Backend) -> None:
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

    pages = backend.run(body)
    assert [[a.name for a in p.items] for p in pages] == [
        ["alpha", "bravo"],
        ["charlie", "delta"],
        ["echo"],
    ]
    assert [p.next_after for p in pages] == ["bravo", "delta", None]
    assert pages[0].items[1].version == 2


def test_list_adapters_exact_page_boundary_ends_with_none(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for name in ("a", "b"):
            await store.create_adapter(tenant.id, new_adapter(name))
        return await store.list_adapters(tenant.id, limit=2)

    page = backend.run(body)
    assert [a.name for a in page.items] == ["a", "b"]
    assert page.next_after is None


def test_list_versions_ascending(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for blob in (b"1", b"22", b"333"):
            await store.create_adapter(tenant.id, new_adapter("tone", blob))
        return await store.list_versions(tenant.id, "tone")

    versions = backend.run(body)
    assert [(v.version, v.bytes) for v in versions] == [(1, 1), (2, 2), (3, 3)]


def test_delete_all_versions_then_not_found(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        created = [await store.create_adapter(tenant.id, new_adapter("tone", blob)) for blob in (b"1", b"2")]
        deleted = await store.delete_adapter(tenant.id, "tone")
        with pytest.raises(NotFound, match="adapter 'tone' not found"):
            await store.get_adapter(tenant.id, "tone")
        with pytest.raises(NotFound):
            await store.get_blob(created[0].id)
        with pytest.raises(NotFound):
            await store.delete_adapter(tenant.id, "tone")
        return created, deleted, await store.count_usage(tenant.id)

    created, deleted, usage = backend.run(body)
    assert [d.id for d in deleted] == [c.id for c in created]
    assert usage == (0, 0)


def test_delete_one_version(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for blob in (b"1", b"2", b"3"):
            await store.create_adapter(tenant.id, new_adapter("tone", blob))
        deleted = await store.delete_adapter(tenant.id, "tone", 2)
        remaining = await store.list_versions(tenant.id, "tone")
        with pytest.raises(NotFound, match="version 2"):
            await store.delete_adapter(tenant.id, "tone", 2)
        return deleted, remaining

    deleted, remaining = backend.run(body)
    assert [d.version for d in deleted] == [2]
    assert [r.version for r in remaining] == [1, 3]


def test_blob_round_trip(backend: Backend) -> None:
    blob = bytes(range(256)) * 1000

    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        record = await store.create_adapter(tenant.id, new_adapter("big", blob))
        with pytest.raises(NotFound):
            await store.get_blob("ad_missing")
        return record, await store.get_blob(record.id)

    record, fetched = backend.run(body)
    assert fetched == blob
    assert record.bytes == len(blob) == 256_000


def test_concurrent_creates_get_distinct_versions(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        records = await asyncio.gather(
            *(store.create_adapter(tenant.id, new_adapter("hot", str(i).encode())) for i in range(20))
        )
        return records, await store.list_versions(tenant.id, "hot")

    records, versions = backend.run(body)
    assert sorted(r.version for r in records) == list(range(1, 21))
    assert [v.version for v in versions] == list(range(1, 21))


def test_count_usage(backend: Backend) -> None:
    async def body(store: Store):
        acme = await store.ensure_tenant("acme")
        other = await store.ensure_tenant("other")
        await store.create_adapter(acme.id, new_adapter("a", b"x" * 10))
        await store.create_adapter(acme.id, new_adapter("a", b"x" * 5))
        await store.create_adapter(acme.id, new_adapter("b", b"x" * 7))
        await store.create_adapter(other.id, new_adapter("a", b"x" * 100))
        return await store.count_usage(acme.id), await store.count_usage(other.id)

    acme_usage, other_usage = backend.run(body)
    assert acme_usage == (3, 22)
    assert other_usage == (1, 100)


def test_create_for_unknown_tenant_raises_not_found(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.create_adapter("ten_nobody", new_adapter("x"))

    with pytest.raises(NotFound, match="ten_nobody"):
        backend.run(body)


def test_list_orders_names_by_code_point(backend: Backend) -> None:
    # PostgreSQL's default collation would sort these "a", "B", "_x"; the
    # contract (and the pagination cursor) is plain code-point order.
    names = ["a", "B", "_x", "Zeta", "ä", "a-b", "a_b"]

    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        for name in names:
            await store.create_adapter(tenant.id, new_adapter(name))
        await store.ensure_tenant("Zed")
        await store.ensure_tenant("alpha")
        first = await store.list_adapters(tenant.id, limit=3)
        rest = await store.list_adapters(tenant.id, limit=100, after=first.next_after)
        return first, rest, await store.list_tenants()

    first, rest, tenants = backend.run(body)
    assert [a.name for a in first.items + rest.items] == sorted(names)
    assert first.next_after == sorted(names)[2]
    assert [t.name for t in tenants] == sorted(["acme", "Zed", "alpha"])


def test_public_name_resolves_to_earliest_publisher(backend: Backend) -> None:
    async def body(store: Store):
        first = await store.ensure_tenant("first")
        second = await store.ensure_tenant("second")
        reader = await store.ensure_tenant("reader")
        early = await store.create_adapter(first.id, new_adapter("tone", b"first"))
        await store.create_adapter(second.id, new_adapter("tone", b"second"))
        await store.set_public(second.id, "tone", True)
        only_second = await store.get_adapter(reader.id, "tone")
        await store.set_public(first.id, "tone", True)
        both = await store.get_adapter(reader.id, "tone")
        newer = await store.create_adapter(first.id, new_adapter("tone", b"first v2"))
        versions = await store.list_versions(reader.id, "tone")
        listed = await store.list_adapters(reader.id)
        return first, second, early, only_second, both, newer, versions, listed

    first, second, early, only_second, both, newer, versions, listed = backend.run(body)
    assert only_second.tenant_id == second.id
    assert both.id == early.id and both.tenant_id == first.id
    assert [v.id for v in versions] == [early.id, newer.id]
    assert [a.id for a in listed.items] == [newer.id]


def test_reopen_keeps_data(backend: Backend) -> None:
    async def first(store: Store):
        tenant = await store.ensure_tenant("acme")
        return tenant, await store.create_adapter(tenant.id, new_adapter("tone", b"kept"))

    tenant, record = backend.run(first)

    async def second(store: Store):
        again = await store.ensure_tenant("acme")
        return again, await store.get_adapter(tenant.id, "tone"), await store.get_blob(record.id)

    tenant_again, fetched, blob = backend.run(second)
    assert tenant_again == tenant
    assert fetched == record
    assert blob == b"kept"


def test_tenant_created_at_is_utc(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        return tenant, await store.get_tenant(tenant.id)

    tenant, fetched = backend.run(body)
    assert tenant == fetched
    assert fetched.created_at.utcoffset() == timedelta(0)


def test_empty_blob_round_trip(backend: Backend) -> None:
    async def body(store: Store):
        tenant = await store.ensure_tenant("acme")
        record = await store.create_adapter(tenant.id, new_adapter("empty", b""))
        return record, await store.get_blob(record.id), await store.count_usage(tenant.id)

    record, blob, usage = backend.run(body)
    assert (record.bytes, blob, usage) == (0, b"", (1, 0))


def test_use_before_open_raises_store_unavailable(backend: Backend) -> None:
    async def main() -> None:
        await backend.store().list_tenants()

    with pytest.raises(StoreUnavailable, match="not open"):
        asyncio.run(main())


def test_subscribe_before_open_raises_store_unavailable(backend: Backend) -> None:
    async def main() -> None:
        await backend.store().subscribe(lambda event: None)

    with pytest.raises(StoreUnavailable, match="not open"):
        asyncio.run(main())


# Change feed


def test_change_feed_reports_committed_writes(backend: Backend) -> None:
    async def body(store: Store):
        events: list[ChangeEvent] = []
        await store.subscribe(events.append)
        tenant = await store.ensure_tenant("acme")
        await store.create_adapter(tenant.id, new_adapter("tone", b"1"))
        await store.create_adapter(tenant.id, new_adapter("tone", b"2"))
        await store.create_adapter(tenant.id, new_adapter("other"))
        await store.set_public(tenant.id, "tone", True)
        await store.delete_adapter(tenant.id, "tone", 1)
        await store.delete_adapter(tenant.id, "tone")
        await wait_until(lambda: len(events) >= 6, what="six change events")
        await asyncio.sleep(0.1)  # nothing further may arrive
        return tenant, events

    tenant, events = backend.run(body)
    assert kinds(events) == [
        ("adapter_created", "tone", 1),
        ("adapter_created", "tone", 2),
        ("adapter_created", "other", 1),
        ("adapter_public", "tone", None),
        ("adapter_deleted", "tone", 1),
        ("adapter_deleted", "tone", None),
    ]
    assert {e.tenant_id for e in events} == {tenant.id}


def test_change_feed_skips_failed_writes(backend: Backend) -> None:
    async def body(store: Store):
        events: list[ChangeEvent] = []
        await store.subscribe(events.append)
        owner = await store.ensure_tenant("owner")
        other = await store.ensure_tenant("other")
        await store.create_adapter(owner.id, new_adapter("mine"))
        for failing in (
            store.create_adapter("ten_nobody", new_adapter("x")),
            store.delete_adapter(other.id, "mine"),
            store.delete_adapter(owner.id, "mine", 7),
            store.set_public(other.id, "mine", True),
        ):
            with pytest.raises(NotFound):
                await failing
        with pytest.raises(ValueError):
            await store.create_adapter(owner.id, NewAdapter("bad", b"a", 1, 1, "00" * 32, "m"))
        await store.create_adapter(owner.id, new_adapter("last"))
        await wait_until(lambda: len(events) >= 2, what="two change events")
        await asyncio.sleep(0.1)
        return events

    assert kinds(backend.run(body)) == [("adapter_created", "mine", 1), ("adapter_created", "last", 1)]


def test_change_feed_async_and_failing_subscribers(backend: Backend) -> None:
    async def body(store: Store):
        seen_async: list[ChangeEvent] = []
        seen_after_failure: list[ChangeEvent] = []

        async def slow(event: ChangeEvent) -> None:
            await asyncio.sleep(0.01)
            seen_async.append(event)

        def broken(event: ChangeEvent) -> None:
            raise RuntimeError("subscriber bug")

        await store.subscribe(slow)
        await store.subscribe(broken)
        await store.subscribe(seen_after_failure.append)
        tenant = await store.ensure_tenant("acme")
        record = await store.create_adapter(tenant.id, new_adapter("tone"))
        await wait_until(lambda: len(seen_async) == 1 and len(seen_after_failure) == 1, what="both subscribers")
        return record, seen_async, seen_after_failure

    record, seen_async, seen_after_failure = backend.run(body)
    expected = ChangeEvent("adapter_created", record.tenant_id, "tone", 1)
    assert seen_async == seen_after_failure == [expected]


def test_unsubscribe_and_close_stop_delivery(backend: Backend) -> None:
    async def main():
        kept: list[ChangeEvent] = []
        dropped: list[ChangeEvent] = []
        store = backend.store()
        await store.open()
        await store.subscribe(kept.append)
        await store.subscribe(dropped.append)
        tenant = await store.ensure_tenant("acme")
        await store.create_adapter(tenant.id, new_adapter("one"))
        await wait_until(lambda: len(dropped) == 1, what="first event")
        await store.unsubscribe(dropped.append)
        await store.unsubscribe(lambda event: None)  # never subscribed: ignored
        await store.create_adapter(tenant.id, new_adapter("two"))
        await wait_until(lambda: len(kept) == 2, what="second event")
        await asyncio.sleep(0.1)
        await store.close()
        await store.open()  # reopened: the old subscribers are gone
        await store.create_adapter(tenant.id, new_adapter("three"))
        await asyncio.sleep(0.2)
        await store.close()
        return kept, dropped

    kept, dropped = asyncio.run(main())
    assert [e.name for e in kept] == ["one", "two"]
    assert [e.name for e in dropped] == ["one"]
