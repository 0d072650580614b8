"""Adapter and tenant store: async interface plus backends chosen by URL.

The server imports only from this package root; which database backs the
store is a deployment setting (``open_store(url)``), not a code change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import ChangeCallback, Store
from .errors import (
    Conflict,
    LeaseLost,
    NotFound,
    QuotaExceeded,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
)
from .models import (
    PUBLIC_TENANT_NAME,
    AdapterRecord,
    ApiKey,
    ChangeEvent,
    CheckpointRecord,
    FileFormat,
    FileRecord,
    JobEvent,
    JobRecord,
    ListPage,
    NewAdapter,
    NewCheckpoint,
    NewFile,
    NewJob,
    NewJobEvent,
    Page,
    Quotas,
    Tenant,
)
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = [
    "PUBLIC_TENANT_NAME",
    "AdapterRecord",
    "ApiKey",
    "ChangeCallback",
    "ChangeEvent",
    "CheckpointRecord",
    "Conflict",
    "FileFormat",
    "FileRecord",
    "JobEvent",
    "JobRecord",
    "LeaseLost",
    "ListPage",
    "NewAdapter",
    "NewCheckpoint",
    "NewFile",
    "NewJob",
    "NewJobEvent",
    "NotFound",
    "Page",
    "PostgresStore",
    "QuotaExceeded",
    "Quotas",
    "SQLiteStore",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "Tenant",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")
_SUPPORTED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:, "
    "postgresql://user:password@host:port/database (or postgres://)"
)


def __getattr__(name: str) -> Any:
    # PostgresStore imports asyncpg, which SQLite-only use does not need.
    if name == "PostgresStore":
        return _postgres_store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _postgres_store_class() -> type[PostgresStore]:
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StoreConfigError("the postgresql store needs the 'asyncpg' package; install it") from exc
    return PostgresStore


def open_store(url: str) -> Store:
    """Build the store for ``url``; it is not connected until ``open()``.

    Only the scheme is echoed in errors, never the URL, which may hold a password.
    """
    if url.startswith(_SQLITE_PREFIX):
        path = url[len(_SQLITE_PREFIX) :]
        if not path or "?" in path:
            raise StoreConfigError(f"sqlite store URL needs a plain path (no query string); supported: {_SUPPORTED}")
        return SQLiteStore(path)
    if url.startswith(_POSTGRES_PREFIXES):
        return _postgres_store_class()(url)
    scheme = url.split("://", 1)[0] if "://" in url else "(none)"
    raise StoreConfigError(f"unsupported store URL scheme {scheme!r}; supported: {_SUPPORTED}")
