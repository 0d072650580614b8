"""Helpers for the store tests: adapters, event waits, throwaway PostgreSQL databases."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from adapters_store import ChangeEvent, NewAdapter, Quotas

T = TypeVar("T")

POSTGRES_URL_ENV = "ALIGNER_TEST_POSTGRES_URL"

#: Every quota set, each to its own value (so swapped columns show), one at the largest allowed.
EVERY_QUOTA = Quotas(
    max_adapters=3,
    max_adapter_bytes=5_000_000_000,
    requests_per_minute=60,
    max_concurrent_requests=8,
    max_n=4,
    max_tokens_in_flight=2**63 - 1,
    max_active_adapters=2,
    max_files=5,
    max_file_bytes=6_000_000_000,
    max_queued_jobs=7,
    max_training_tokens=9_000_000_000,
)
#: Every quota set again, to values unlike ``EVERY_QUOTA``'s (110, 100, ..., 10 in field order).
OTHER_QUOTAS = Quotas(*range(10 * len(fields(Quotas)), 0, -10))


def new_adapter(name: str, blob: bytes = b"weights", *, tokens: int = 4) -> NewAdapter:
    return NewAdapter(
        name=name,
        blob=blob,
        tokens=tokens,
        params=tokens * 8,
        sha256=hashlib.sha256(blob).hexdigest(),
        base_model="tiny-base",
    )


def postgres_url_or_skip() -> str:
    """The test server's URL; skip without one, but fail under CI (never skip silently)."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if url:
        return url
    reason = (
        f"{POSTGRES_URL_ENV} is not set; run deploy/dev/postgres.sh (as root) and export "
        f"{POSTGRES_URL_ENV} to the URL it prints to test the PostgreSQL backend"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _create_database(base_url: str, name: str) -> None:
    """Prefer a natural-language (ICU en-US) default collation, where "a" < "B".

    A C-collated server would hide any query that forgets the store's
    code-point ordering; fall back to the server default where ICU is absent.
    """
    import asyncpg

    try:
        await _admin(
            base_url,
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'",
        )
    except (asyncpg.PostgresSyntaxError, asyncpg.FeatureNotSupportedError, asyncpg.InvalidParameterValueError):
        await _admin(base_url, f'CREATE DATABASE "{name}"')


@contextmanager
def throwaway_database(base_url: str) -> Iterator[str]:
    """Create an empty database next to ``base_url``'s (needs CREATEDB); drop it afterwards."""
    name = f"aligner_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(base_url, name))
    try:
        yield with_database(base_url, name)
    finally:
        asyncio.run(_drop_database(base_url, name))


async def _drop_database(base_url: str, name: str, attempts: int = 20) -> None:
    """DROP ... WITH (FORCE) ends our own sessions, but not another role's: an autovacuum worker still in
    the database makes it fail with InsufficientPrivilege for a moment. Retry until it has gone."""
    import asyncpg

    for attempt in range(attempts):
        try:
            await _admin(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectInUseError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.25)


def empty_postgres_database(url: str) -> None:
    """Delete every row of every table but ``schema_migrations`` (schema is kept)."""

    async def main() -> None:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=10)
        try:
            tables = [
                row["tablename"]
                for row in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                    " AND tablename <> 'schema_migrations'"
                )
            ]
            if tables:
                names = ", ".join(f'"{t}"' for t in tables)
                await conn.execute(f"TRUNCATE {names} CASCADE")
        finally:
            await conn.close()

    asyncio.run(main())


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 1.0, what: str = "condition") -> float:
    """Poll ``predicate`` until true; return the seconds it took; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return loop.time() - start


def kinds(events: list[ChangeEvent]) -> list[tuple[str, str, int | None]]:
    return [(e.kind, e.name, e.version) for e in events]


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(body())
