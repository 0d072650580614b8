"""Adapter and tenant store: async interface plus backends chosen by URL.

The server imports only from this package root; which database backs the
store is a deployment setting (``open_store(url)``), not a code change.
"""

from __future__ import annotations

from .base import Store
from .errors import Conflict, NotFound, StoreConfigError, StoreError, StoreUnavailable
from .models import AdapterRecord, NewAdapter, Page, Tenant
from .sqlite import SQLiteStore

__all__ = [
    "AdapterRecord",
    "Conflict",
    "NewAdapter",
    "NotFound",
    "Page",
    "SQLiteStore",
    "Store",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "Tenant",
    "open_store",
]

_SQLITE_PREFIX = "sqlite:///"
_SUPPORTED = "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:///:memory:"


def open_store(url: str) -> Store:
    """Build the store for ``url``; it is not connected until ``open()``.

    Only the scheme is echoed in errors, never the URL, which may hold a password.
    """
    if url.startswith(_SQLITE_PREFIX):
        path = url[len(_SQLITE_PREFIX):]
        if not path or "?" in path:
            raise StoreConfigError(
                f"sqlite store URL needs a plain path (no query string); supported: {_SUPPORTED}"
            )
        return SQLiteStore(path)
    scheme = url.split("://", 1)[0] if "://" in url else "(none)"
    raise StoreConfigError(
        f"unsupported store URL scheme {scheme!r}; supported: {_SUPPORTED}"
    )
