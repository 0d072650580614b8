"""Schema migrations on both backends: fresh databases and upgrades of older schemas.

An older release is simulated by opening a store with only the first
migration steps (the backend's tuple patched), writing rows with raw SQL as
that release would have, then opening with every step.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

import adapters_store.postgres as postgres_backend
import adapters_store.sqlite as sqlite_backend
from adapters_store import NewFile, NewJob, NotFound, QuotaExceeded, Quotas, open_store
from adapters_store.migrations import Migration

from .support import EVERY_QUOTA, new_adapter, postgres_url_or_skip, throwaway_database

SQLITE_STEPS = sqlite_backend.SQLITE_MIGRATIONS
POSTGRES_STEPS = postgres_backend.POSTGRES_MIGRATIONS
NEWEST = len(SQLITE_STEPS)


@dataclass
class Fresh:
    """A database with no schema at all, and raw access to it."""

    kind: str
    url: str

    def patch_steps(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        if self.kind == "sqlite":
            monkeypatch.setattr(sqlite_backend, "SQLITE_MIGRATIONS", SQLITE_STEPS[:count])
        else:
            monkeypatch.setattr(postgres_backend, "POSTGRES_MIGRATIONS", POSTGRES_STEPS[:count])

    def open_once(self) -> None:
        """Open a store on the database (applying the steps it knows) and close it again."""

        async def main() -> None:
            async with open_store(self.url):
                pass

        asyncio.run(main())

    def execute(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Run ``(sql with ? placeholders, args)`` pairs in one transaction."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
                for sql, args in statements:
                    conn.execute(sql, tuple(_sqlite_value(a) for a in args))
            return

        async def main() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url)
            try:
                async with conn.transaction():
                    for sql, args in statements:
                        await conn.execute(_numbered(sql), *args)
            finally:
                await conn.close()

        asyncio.run(main())

    def query(self, sql: str) -> list[tuple[object, ...]]:
        if self.kind == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
                return [tuple(r) for r in conn.execute(sql).fetchall()]

        async def main() -> list[tuple[object, ...]]:
            import asyncpg

            conn = await asyncpg.connect(self.url)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(main())


def _sqlite_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, bool):
        return int(value)
    return value


def _numbered(sql: str) -> str:
    parts = sql.split("?")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fresh]:
    if request.param == "sqlite":
        yield Fresh("sqlite", f"sqlite:///{tmp_path / 'store.db'}")
        return
    with throwaway_database(postgres_url_or_skip()) as url:
        yield Fresh("postgresql", url)


def test_both_backends_have_the_same_steps() -> None:
    assert [(m.version, m.description) for m in SQLITE_STEPS] == [(m.version, m.description) for m in POSTGRES_STEPS]
    assert NEWEST >= 3
    assert SQLITE_STEPS[1].description == "tenant quotas and hashed api keys"
    assert SQLITE_STEPS[2].description == "tenant quotas on generation requests"
    assert SQLITE_STEPS[3].description == "fine-tuning files, jobs, events and checkpoints; tenant quotas on them"
    assert all(isinstance(m, Migration) for m in SQLITE_STEPS + POSTGRES_STEPS)


def test_fresh_database_gets_every_step(fresh: Fresh) -> None:
    async def main():
        async with open_store(fresh.url) as store:
            tenant = await store.create_tenant("acme", Quotas(max_adapters=1))
            await store.create_adapter(tenant.id, new_adapter("one"))
            with pytest.raises(QuotaExceeded):
                await store.create_adapter(tenant.id, new_adapter("two"))
            key = await store.create_api_key(tenant.id, key_hash="h", prefix="sk-h")
            return tenant, key, await store.find_api_key("h")

    tenant, key, found = asyncio.run(main())
    assert found == (key, tenant)
    versions = [row[0] for row in fresh.query("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, NEWEST + 1))


def test_upgrade_from_version_1_keeps_data_and_defaults_quotas(fresh: Fresh, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1. The previous release creates its schema (step 1 only)...
    fresh.patch_steps(monkeypatch, 1)
    fresh.open_once()
    assert fresh.query("SELECT version FROM schema_migrations") == [(1,)]
    assert fresh.query(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'api_keys'"
        if fresh.kind == "postgresql"
        else "SELECT COUNT(*) FROM sqlite_master WHERE name = 'api_keys'"
    ) == [(0,)]

    # ...and writes rows the way it did.
    created = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    adapter = new_adapter("tone", b"old weights")
    fresh.execute(
        ("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)", ("ten_old", "acme", created)),
        ("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)", ("ten_two", "beta", created)),
        (
            "INSERT INTO adapters (id, tenant_id, name, version, tokens, params, bytes, sha256,"
            " base_model, public, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "ad_old",
                "ten_old",
                "tone",
                1,
                adapter.tokens,
                adapter.params,
                adapter.bytes,
                adapter.sha256,
                adapter.base_model,
                True,
                created,
            ),
        ),
        ("INSERT INTO adapter_blobs (adapter_id, blob) VALUES (?, ?)", ("ad_old", adapter.blob)),
    )

    # 2. This release opens the same database with every step.
    monkeypatch.undo()

    async def new_release():
        async with open_store(fresh.url) as store:
            tenants = await store.list_tenants()
            acme = await store.get_tenant("ten_old")
            record = await store.get_adapter("ten_two", "tone")  # public: visible to beta
            blob = await store.get_blob("ad_old")
            ensured = await store.ensure_tenant("acme")
            with pytest.raises(NotFound):
                await store.find_api_key("anything")
            limited = await store.set_quotas(acme.id, Quotas(max_adapters=1))
            with pytest.raises(QuotaExceeded) as caught:
                await store.create_adapter(acme.id, new_adapter("more"))
            key = await store.create_api_key(acme.id, key_hash="h", prefix="sk-h")
            return tenants, acme, record, blob, ensured, limited, caught.value, key

    tenants, acme, record, blob, ensured, limited, error, key = asyncio.run(new_release())
    assert [(t.id, t.name, t.created_at, t.quotas) for t in tenants] == [
        ("ten_old", "acme", created, Quotas(None, None, None)),
        ("ten_two", "beta", created, Quotas(None, None, None)),
    ]
    assert ensured == acme == tenants[0]
    assert (record.id, record.version, record.public, record.created_at) == ("ad_old", 1, True, created)
    assert blob == b"old weights"
    assert limited.quotas == Quotas(max_adapters=1)
    assert (error.limit_name, error.current) == ("max_adapters", 1)
    assert key.tenant_id == "ten_old"
    versions = [row[0] for row in fresh.query("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, NEWEST + 1))

    # 3. Opening again applies nothing more.
    before = fresh.query("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    fresh.open_once()
    assert fresh.query("SELECT version, applied_at FROM schema_migrations ORDER BY version") == before


GENERATION_QUOTAS = ("max_concurrent_requests", "max_n", "max_tokens_in_flight", "max_active_adapters")


def test_upgrade_from_version_2_keeps_quotas_and_adds_unlimited_generation_quotas(
    fresh: Fresh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. The previous release creates its schema (steps 1 and 2)...
    fresh.patch_steps(monkeypatch, 2)
    fresh.open_once()
    assert fresh.query("SELECT version FROM schema_migrations ORDER BY version") == [(1,), (2,)]
    columns_sql = (
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'tenants'"
        if fresh.kind == "postgresql"
        else "SELECT name FROM pragma_table_info('tenants')"
    )
    assert not set(GENERATION_QUOTAS) & {row[0] for row in fresh.query(columns_sql)}

    # ...and writes rows the way it did: one tenant with quotas and a key, one without.
    created = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
    fresh.execute(
        (
            "INSERT INTO tenants (id, name, created_at, max_adapters, max_adapter_bytes,"
            " requests_per_minute) VALUES (?, ?, ?, ?, ?, ?)",
            ("ten_old", "acme", created, 1, 2**63 - 1, 30),
        ),
        ("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)", ("ten_two", "beta", created)),
        (
            "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) VALUES (?, ?, ?, ?, ?)",
            ("key_old", "ten_old", "h-old", "sk-old", created),
        ),
    )
    old_quotas = Quotas(max_adapters=1, max_adapter_bytes=2**63 - 1, requests_per_minute=30)

    # 2. This release opens the same database with every step.
    monkeypatch.undo()

    async def new_release():
        async with open_store(fresh.url) as store:
            tenants = await store.list_tenants()
            acme = await store.get_tenant("ten_old")
            key, key_tenant = await store.find_api_key("h-old")
            await store.create_adapter(acme.id, new_adapter("one"))
            with pytest.raises(QuotaExceeded):  # the old limit still holds
                await store.create_adapter(acme.id, new_adapter("two"))
            limited = await store.set_quotas("ten_two", EVERY_QUOTA)
            return tenants, acme, key, key_tenant, limited, await store.get_tenant("ten_two")

    tenants, acme, key, key_tenant, limited, limited_read = asyncio.run(new_release())
    assert [(t.id, t.name, t.created_at, t.quotas) for t in tenants] == [
        ("ten_old", "acme", created, old_quotas),
        ("ten_two", "beta", created, Quotas()),
    ]
    assert all(getattr(t.quotas, name) is None for t in tenants for name in GENERATION_QUOTAS)
    assert acme == key_tenant == tenants[0]
    assert (key.id, key.tenant_id, key.prefix, key.created_at) == ("key_old", "ten_old", "sk-old", created)
    assert limited.quotas == limited_read.quotas == EVERY_QUOTA
    versions = [row[0] for row in fresh.query("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, NEWEST + 1))

    # 3. The new columns refuse negative values at the database too.
    for name in GENERATION_QUOTAS:
        with pytest.raises(Exception, match="(?i)check constraint"):
            fresh.execute((f"UPDATE tenants SET {name} = ? WHERE id = ?", (-1, "ten_two")))
    fresh.execute(("UPDATE tenants SET max_n = ? WHERE id = ?", (0, "ten_two")))
    assert fresh.query("SELECT max_n FROM tenants WHERE id = 'ten_two'") == [(0,)]


FINE_TUNING_QUOTAS = ("max_files", "max_file_bytes", "max_queued_jobs", "max_training_tokens")


def test_upgrade_from_version_3_adds_fine_tuning_with_unlimited_quotas(
    fresh: Fresh, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. The previous release creates its schema (steps 1 to 3) and a tenant with quotas.
    fresh.patch_steps(monkeypatch, 3)
    fresh.open_once()
    created = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    fresh.execute(
        (
            "INSERT INTO tenants (id, name, created_at, max_adapters, max_n) VALUES (?, ?, ?, ?, ?)",
            ("ten_old", "acme", created, 2, 4),
        ),
    )

    # 2. This release adds the fine-tuning tables; the tenant's new quotas are unlimited.
    monkeypatch.undo()

    async def new_release():
        async with open_store(fresh.url) as store:
            before = await store.get_tenant("ten_old")
            file = await store.create_file(
                "ten_old", NewFile(filename="t.jsonl", purpose="fine-tune", format="chat", lines=1, blob=b"{}\n")
            )
            job = await store.create_job(
                "ten_old",
                NewJob(model="m", training_file=file.id, validation_file=None, spec={}, training_tokens=1),
                [],
            )
            limited = await store.set_quotas("ten_old", Quotas(max_files=1))
            with pytest.raises(QuotaExceeded):
                await store.create_file(
                    "ten_old", NewFile(filename="u.jsonl", purpose="fine-tune", format="chat", lines=0, blob=b"")
                )
            return before, job, limited

    before, job, limited = asyncio.run(new_release())
    assert before.quotas == Quotas(max_adapters=2, max_n=4)
    assert all(getattr(before.quotas, name) is None for name in FINE_TUNING_QUOTAS)
    assert job.status == "queued"
    assert limited.quotas == Quotas(max_files=1)
    versions = [row[0] for row in fresh.query("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, NEWEST + 1))
    for name in FINE_TUNING_QUOTAS:
        with pytest.raises(Exception, match="(?i)check constraint"):
            fresh.execute((f"UPDATE tenants SET {name} = ? WHERE id = ?", (-1, "ten_old")))
