"""Exceptions raised by the adapter store.

Callers catch one root and map each branch to a transport-level answer
(404, 409, 503, startup failure) without knowing which backend is in use::

    StoreError
    ├── NotFound            the tenant or adapter does not exist, or is not visible
    ├── Conflict            a write collided with existing data (uniqueness)
    ├── StoreUnavailable    the database could not be opened or a query failed
    └── StoreConfigError    the store URL or on-disk schema cannot be used
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error the store raises on purpose."""


class NotFound(StoreError):
    """The object is absent, or exists but the caller may not see it.

    The two cases share one message so that a tenant cannot probe for
    other tenants' private adapter names.
    """


class Conflict(StoreError):
    """A write would break a uniqueness rule."""


class StoreUnavailable(StoreError):
    """The backend failed (locked, disk I/O, not open); retrying later may help."""


class StoreConfigError(StoreError):
    """The store is misconfigured: unknown URL scheme, bad path, newer schema."""
