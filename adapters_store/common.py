"""Backend-independent helpers of the store: ids, the clock, messages, input and quota checks.

No SQL here: the statements and row mappers are in ``sql.py``, the operations in ``jobs.py``.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import fields
from datetime import UTC, datetime

from .errors import QuotaExceeded
from .models import PUBLIC_TENANT_NAME, NewAdapter, Quotas


def now() -> datetime:
    return datetime.now(UTC)


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
        raise ValueError(f"tenant name {name!r} is reserved; use ensure_public_tenant()")


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
