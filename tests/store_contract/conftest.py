"""Fixtures: ``backend`` gives each contract test a fresh, empty store of each kind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from adapters_store import Store, open_store

from .support import empty_postgres_database, postgres_url_or_skip, throwaway_database

T = TypeVar("T")


@dataclass
class Backend:
    """One backend under test: a URL whose database is empty when the test starts."""

    kind: str
    url: str

    def store(self) -> Store:
        """A new, unopened store on this backend's database."""
        return open_store(self.url)

    def run(self, body: Callable[[Store], Awaitable[T]]) -> T:
        """Open a store, run ``body`` with it on a fresh event loop, and close it."""

        async def main() -> T:
            async with self.store() as store:
                return await body(store)

        return asyncio.run(main())


@pytest.fixture(scope="module")
def postgres_database() -> Iterator[str]:
    """A throwaway database for one test module (dropped afterwards)."""
    with throwaway_database(postgres_url_or_skip()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'store.db'}")
    url = request.getfixturevalue("postgres_database")
    empty_postgres_database(url)
    return Backend("postgresql", url)
