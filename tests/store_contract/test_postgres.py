"""PostgreSQL-specific store tests: migrations across replicas, outages, the LISTEN/NOTIFY feed.

Needs ALIGNER_TEST_POSTGRES_URL (deploy/dev/postgres.sh prints it); skipped
without it, failed without it under CI=true. Each test that needs an empty
database creates a throwaway one (the role needs CREATEDB).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest

from adapters_store import (
    ChangeEvent,
    NotFound,
    PostgresStore,
    StoreConfigError,
    StoreUnavailable,
    open_store,
)
from adapters_store.postgres import POSTGRES_MIGRATIONS

from .support import (
    POSTGRES_URL_ENV,
    kinds,
    new_adapter,
    postgres_url_or_skip,
    throwaway_database,
    wait_until,
)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty database (no schema yet)."""
    with throwaway_database(postgres_url_or_skip()) as url:
        yield url


async def migration_rows(url: str) -> list[tuple[int, object]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        return [(r["version"], r["applied_at"]) for r in rows]
    finally:
        await conn.close()


def test_open_store_selects_postgres_for_both_schemes() -> None:
    for url in ("postgresql://u:hunter2@db:5432/x", "postgres://u:hunter2@db/x"):
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        assert "hunter2" not in repr(store)
    with pytest.raises(StoreConfigError, match="malformed") as caught:
        open_store("postgresql://u:hunter2@db:notaport/x")
    assert "hunter2" not in str(caught.value)


def test_reopen_keeps_data_and_does_not_reapply_migrations(pg_url: str) -> None:
    async def main():
        async with open_store(pg_url) as store:
            tenant = await store.ensure_tenant("acme")
            record = await store.create_adapter(tenant.id, new_adapter("tone", b"kept"))
        first = await migration_rows(pg_url)
        async with open_store(pg_url) as store:
            fetched = await store.get_adapter(tenant.id, "tone")
            blob = await store.get_blob(record.id)
        return record, fetched, blob, first, await migration_rows(pg_url)

    record, fetched, blob, first, second = asyncio.run(main())
    assert [v for v, _ in first] == [m.version for m in POSTGRES_MIGRATIONS]
    assert second == first
    assert fetched == record and blob == b"kept"


def test_concurrent_opens_migrate_once(pg_url: str) -> None:
    async def main():
        stores = [open_store(pg_url) for _ in range(5)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            tenants = await asyncio.gather(*(s.ensure_tenant("acme") for s in stores))
        finally:
            await asyncio.gather(*(s.close() for s in stores))
        return tenants, await migration_rows(pg_url)

    tenants, rows = asyncio.run(main())
    assert len({t.id for t in tenants}) == 1
    assert [v for v, _ in rows] == [m.version for m in POSTGRES_MIGRATIONS]


def test_newer_schema_version_is_refused(pg_url: str) -> None:
    async def main() -> None:
        async with open_store(pg_url):
            pass
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("INSERT INTO schema_migrations VALUES (99, now())")
        finally:
            await conn.close()
        await open_store(pg_url).open()

    with pytest.raises(StoreConfigError, match="newer"):
        asyncio.run(main())


def test_concurrent_creates_across_stores_get_distinct_versions(pg_url: str) -> None:
    async def main():
        async with open_store(pg_url) as a, open_store(pg_url) as b:
            tenant = await a.ensure_tenant("acme")
            records = await asyncio.gather(
                *((a if i % 2 else b).create_adapter(tenant.id, new_adapter("hot", bytes([i]))) for i in range(30))
            )
            return records, await b.list_versions(tenant.id, "hot")

    records, versions = asyncio.run(main())
    assert sorted(r.version for r in records) == list(range(1, 31))
    assert [v.version for v in versions] == list(range(1, 31))


def test_unreachable_server_raises_store_unavailable() -> None:
    async def main(url: str) -> None:
        await open_store(url).open()

    for url in (
        "postgresql://aligner:hunter2@127.0.0.1:1/aligner_test",
        "postgres://aligner:hunter2@127.0.0.1:1/aligner_test",
    ):
        with pytest.raises(StoreUnavailable) as caught:
            asyncio.run(main(url))
        assert isinstance(caught.value.__cause__, OSError)
        assert "hunter2" not in str(caught.value)
        assert "127.0.0.1:1" in str(caught.value)


def test_wrong_password_raises_config_error_without_echoing_it() -> None:
    base = postgres_url_or_skip()
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base)
    netloc = f"{parts.username}:wrong-hunter2@{parts.hostname}:{parts.port or 5432}"
    url = urlunsplit(parts._replace(netloc=netloc))

    async def main() -> None:
        await open_store(url).open()

    with pytest.raises(StoreConfigError) as caught:
        asyncio.run(main())
    assert isinstance(caught.value.__cause__, asyncpg.InvalidAuthorizationSpecificationError)
    assert "wrong-hunter2" not in str(caught.value)


def test_dropped_connection_raises_store_unavailable_then_recovers(pg_url: str) -> None:
    async def main():
        async with PostgresStore(pg_url, min_size=1, max_size=2) as store:
            tenant = await store.ensure_tenant("acme")
            blocker = await asyncpg.connect(pg_url)
            try:
                # Hold the per-name lock so the create waits inside its transaction.
                await blocker.execute("SELECT pg_advisory_lock(hashtext($1), hashtext($2))", tenant.id, "tone")
                create = asyncio.ensure_future(store.create_adapter(tenant.id, new_adapter("tone")))
                for _ in range(200):
                    waiting = await blocker.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'aligner-store' AND wait_event_type = 'Lock'"
                    )
                    if waiting:
                        break
                    await asyncio.sleep(0.01)
                assert waiting == 1
                await blocker.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'aligner-store'"
                )
                with pytest.raises(StoreUnavailable) as caught:
                    await create
            finally:
                await blocker.close()
            # The pool replaces the dead connections; the failed create left nothing behind.
            record = await store.create_adapter(tenant.id, new_adapter("tone", b"again"))
            return caught.value, record, await store.count_usage(tenant.id)

    error, record, usage = asyncio.run(main())
    assert isinstance(error.__cause__, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError))
    assert record.version == 1
    assert usage == (1, 5)


def test_subscriber_sees_writes_of_another_store_within_a_second(pg_url: str) -> None:
    async def main():
        events: list[ChangeEvent] = []
        visible: list[bool] = []  # could the reader see the adapter when told?
        async with open_store(pg_url) as writer, open_store(pg_url) as reader:

            async def on_change(event: ChangeEvent) -> None:
                try:
                    await reader.get_adapter(event.tenant_id, event.name)
                    visible.append(True)
                except NotFound:
                    visible.append(False)
                events.append(event)

            await reader.subscribe(on_change)
            tenant = await writer.ensure_tenant("acme")
            created = await writer.create_adapter(tenant.id, new_adapter("tone"))
            create_delay = await wait_until(lambda: len(events) == 1, what="create event")
            await writer.set_public(tenant.id, "tone", True)
            await wait_until(lambda: len(events) == 2, what="publish event")
            await writer.delete_adapter(tenant.id, "tone")
            delete_delay = await wait_until(lambda: len(events) == 3, what="delete event")
        return tenant, created, events, visible, create_delay, delete_delay

    tenant, created, events, visible, create_delay, delete_delay = asyncio.run(main())
    assert events[0] == ChangeEvent("adapter_created", tenant.id, "tone", created.version)
    assert kinds(events) == [
        ("adapter_created", "tone", 1),
        ("adapter_public", "tone", None),
        ("adapter_deleted", "tone", None),
    ]
    # Events arrive only after commit: the reader already sees each change.
    assert visible == [True, True, False]
    assert create_delay < 1.0 and delete_delay < 1.0


def test_notification_is_sent_only_on_commit(pg_url: str) -> None:
    async def main():
        events: list[ChangeEvent] = []
        async with open_store(pg_url) as store:
            await store.subscribe(events.append)
            tenant = await store.ensure_tenant("acme")
            # A blob the database rejects fails the transaction after the
            # row insert: neither the row nor the notification may survive.
            conn = await asyncpg.connect(pg_url)
            try:
                await conn.execute("ALTER TABLE adapter_blobs ADD CONSTRAINT test_small CHECK (length(blob) < 4)")
            finally:
                await conn.close()
            with pytest.raises(Exception):  # noqa: B017  (whatever the driver makes of a CHECK violation)
                await store.create_adapter(tenant.id, new_adapter("big", b"too long"))
            await store.create_adapter(tenant.id, new_adapter("ok", b"ok"))
            await wait_until(lambda: len(events) >= 1, what="event")
            await asyncio.sleep(0.2)
            usage = await store.count_usage(tenant.id)
        return events, usage

    events, usage = asyncio.run(main())
    assert kinds(events) == [("adapter_created", "ok", 1)]
    assert usage == (1, 2)


def test_listener_reconnects_after_being_dropped(pg_url: str) -> None:
    async def main():
        events: list[ChangeEvent] = []
        async with open_store(pg_url) as writer, PostgresStore(pg_url, keepalive_s=0.5) as reader:
            await reader.subscribe(events.append)
            tenant = await writer.ensure_tenant("acme")
            conn = await asyncpg.connect(pg_url)
            try:
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND application_name = 'aligner-store-listener'"
                )
            finally:
                await conn.close()
            await wait_until(lambda: any(e.kind == "resync" for e in events), timeout=5, what="resync event")
            await writer.create_adapter(tenant.id, new_adapter("after"))
            await wait_until(lambda: len(events) >= 2, what="event after reconnect")
        return killed, events

    killed, events = asyncio.run(main())
    assert killed == 1
    assert kinds(events) == [("resync", "", None), ("adapter_created", "after", 1)]


def test_missing_url_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        postgres_url_or_skip()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=POSTGRES_URL_ENV):
        postgres_url_or_skip()


def test_find_api_key_uses_the_hash_index(pg_url: str) -> None:
    from adapters_store.postgres import FIND_API_KEY_SQL

    async def main():
        async with open_store(pg_url) as store:
            tenant = await store.create_tenant("acme")
            await store.create_api_key(tenant.id, key_hash="h", prefix="sk-")
        conn = await asyncpg.connect(pg_url)
        try:
            # Tiny tables make a sequential scan cheapest; forbid it to see
            # whether an index can serve the lookup at all.
            await conn.execute("SET enable_seqscan = off")
            rows = await conn.fetch(f"EXPLAIN {FIND_API_KEY_SQL}", "h")
        finally:
            await conn.close()
        return "\n".join(r[0] for r in rows)

    plan = asyncio.run(main())
    assert "api_keys_by_hash" in plan, plan
    assert "Seq Scan on api_keys" not in plan, plan
