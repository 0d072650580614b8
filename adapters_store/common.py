"""Backend-independent helpers shared by the store backends.

The only SQL here is what both dialects spell alike: the column lists and the
tenant statements, for which a backend passes its mark for numbered arguments
(``?`` or ``$``).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone
from typing import Any, Protocol

from dataclasses import fields

from .errors import QuotaExceeded
from .models import PUBLIC_TENANT_NAME, NewAdapter, Quotas


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def adapter_not_found(name: str, version: int | None) -> str:
    """The one message for absent and invisible adapters alike."""
    if version is None:
        return f"adapter {name!r} not found"
    return f"adapter {name!r} version {version} not found"


def validate_new_adapter(new: NewAdapter) -> None:
    """Reject malformed input before it reaches the database.

    The digest is checked here because the store is what later serves the
    blob: a record whose sha256 does not describe its bytes would defeat
    every integrity check downstream.
    """
    if not new.name:
        raise ValueError("adapter name must not be empty")
    if new.tokens < 0 or new.params < 0:
        raise ValueError("tokens and params must not be negative")
    actual = hashlib.sha256(new.blob).hexdigest()
    if new.sha256.lower() != actual:
        raise ValueError(f"sha256 {new.sha256!r} does not match the blob ({actual})")


def validate_tenant_name(name: str) -> None:
    """Reject names no caller may create; the public tenant has its own method."""
    if not name:
        raise ValueError("tenant name must not be empty")
    if name == PUBLIC_TENANT_NAME:
        raise ValueError(
            f"tenant name {name!r} is reserved; use ensure_public_tenant()"
        )


def validate_quotas(quotas: Quotas) -> None:
    """Each limit is None (unlimited) or a non-negative int (0 forbids any use)."""
    if not isinstance(quotas, Quotas):
        raise TypeError(f"quotas must be a Quotas, got {type(quotas).__name__}")
    for f in fields(Quotas):
        value = getattr(quotas, f.name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"quota {f.name} must be an int or None, got {value!r}")
        if value < 0:
            raise ValueError(f"quota {f.name} must not be negative, got {value}")
        if value > 2**63 - 1:
            raise ValueError(f"quota {f.name} is too large: {value}")


def validate_api_key(key_hash: str, prefix: str) -> None:
    if not isinstance(key_hash, str) or not key_hash:
        raise ValueError("api key hash must be a non-empty string")
    if not isinstance(prefix, str):
        raise ValueError("api key prefix must be a string")


API_KEY_NOT_FOUND = "api key not found"


# Columns read back, the same in both schemas. Each quota is stored in a column
# named after its ``Quotas`` field, so a new quota is a field plus one
# migration step per backend.
ADAPTER_COLUMNS = (
    "id, tenant_id, name, version, tokens, params, bytes, sha256, base_model, public, created_at"
)
API_KEY_COLUMNS = "id, tenant_id, prefix, created_at, revoked_at"
QUOTA_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Quotas))
_TENANT_COLUMN_NAMES = ("id", "name", "created_at", *QUOTA_COLUMNS)
TENANT_COLUMNS = ", ".join(_TENANT_COLUMN_NAMES)


class Row(Protocol):
    """A result row read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def quota_values(quotas: Quotas) -> tuple[int | None, ...]:
    """The quota columns' values, in ``QUOTA_COLUMNS`` order."""
    return tuple(getattr(quotas, column) for column in QUOTA_COLUMNS)


def quotas_from_row(row: Row) -> Quotas:
    """The ``Quotas`` of a row that holds the tenant columns."""
    return Quotas(**{column: row[column] for column in QUOTA_COLUMNS})


def insert_tenant_sql(mark: str) -> str:
    """Insert a tenant with every quota, arguments ``(id, name, created_at, *quota_values)``.

    Returns the row, or nothing when the name is taken. ``mark`` numbers the
    arguments: ``?`` gives ``?1, ?2, ...`` (SQLite), ``$`` gives ``$1, $2, ...``.
    """
    values = ", ".join(f"{mark}{i}" for i in range(1, len(_TENANT_COLUMN_NAMES) + 1))
    return (
        f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES ({values})"
        f" ON CONFLICT (name) DO NOTHING RETURNING {TENANT_COLUMNS}"
    )


def set_quotas_sql(mark: str) -> str:
    """Replace every quota of a tenant, arguments ``(*quota_values, tenant_id)``; returns the row."""
    sets = ", ".join(f"{column} = {mark}{i}" for i, column in enumerate(QUOTA_COLUMNS, 1))
    tenant_id = f"{mark}{len(QUOTA_COLUMNS) + 1}"
    return f"UPDATE tenants SET {sets} WHERE id = {tenant_id} RETURNING {TENANT_COLUMNS}"


def find_api_key_sql(mark: str) -> str:
    """The live key of hash ``{mark}1`` joined with its tenant's row (key columns renamed)."""
    tenant = ", ".join(f"t.{column}" for column in _TENANT_COLUMN_NAMES)
    return (
        "SELECT k.id AS key_id, k.tenant_id, k.prefix, k.created_at AS key_created_at,"
        f" k.revoked_at, {tenant}"
        " FROM api_keys AS k JOIN tenants AS t ON t.id = k.tenant_id"
        f" WHERE k.key_hash = {mark}1 AND k.revoked_at IS NULL"
    )


def check_quotas(quotas: Quotas, count: int, total_bytes: int, new_bytes: int) -> None:
    """Raise ``QuotaExceeded`` if one more adapter of ``new_bytes`` breaks a limit.

    ``count`` and ``total_bytes`` are the tenant's usage before the write; the
    caller must hold the lock that keeps them true until its insert commits.
    """
    if quotas.max_adapters is not None and count + 1 > quotas.max_adapters:
        raise QuotaExceeded(
            "max_adapters",
            quotas.max_adapters,
            count,
            f"quota max_adapters exceeded: the tenant has {count} adapter versions"
            f" and the limit is {quotas.max_adapters}",
        )
    if quotas.max_adapter_bytes is not None and total_bytes + new_bytes > quotas.max_adapter_bytes:
        raise QuotaExceeded(
            "max_adapter_bytes",
            quotas.max_adapter_bytes,
            total_bytes,
            f"quota max_adapter_bytes exceeded: the tenant stores {total_bytes} bytes,"
            f" {new_bytes} more would pass the limit of {quotas.max_adapter_bytes}",
        )
