"""Backend-independent helpers shared by the store backends (no SQL here)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timezone

from .models import NewAdapter


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
