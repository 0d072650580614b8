"""Exceptions raised by the adapter store.

Callers catch one root and map each branch to a transport-level answer
(404, 409, 503, startup failure) without knowing which backend is in use::

    StoreError
    ├── NotFound            the tenant or adapter does not exist, or is not visible
    ├── Conflict            a write collided with existing data (uniqueness)
    ├── QuotaExceeded       the write would take a tenant past one of its quotas
    ├── LeaseLost           a worker wrote to a fine-tuning job it no longer holds
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


class QuotaExceeded(StoreError):
    """A write would take the tenant past a quota; nothing was written.

    ``limit_name`` is the ``Quotas`` field (``"max_adapters"`` or
    ``"max_adapter_bytes"``), ``limit`` its value, and ``current`` the usage
    before the refused write (adapter versions, or stored bytes).
    """

    def __init__(self, limit_name: str, limit: int, current: int, message: str) -> None:
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit
        self.current = current

    def __reduce__(self):  # keep it picklable despite the keyword-less signature
        return (type(self), (self.limit_name, self.limit, self.current, str(self)))


class LeaseLost(StoreError):
    """A worker reported on a job that is no longer running under it (its lease expired and the
    job was queued again, or it was finished): the worker must stop the job and write nothing."""


class StoreUnavailable(StoreError):
    """The backend failed (locked, disk I/O, not open); retrying later may help."""


class StoreConfigError(StoreError):
    """The store is misconfigured: unknown URL scheme, bad path, newer schema."""
