"""Backend-independent helpers of the store: ids, the clock, messages, input and quota checks.

No SQL here: the statements and row mappers are in ``sql.py``, the operations in ``jobs.py``.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import fields
from datetime import UTC, datetime

from .errors import QuotaExceeded
from .models import PUBLIC_TENANT_NAME, NewAdapter, NewCheckpoint, NewFile, NewJob, NewJobEvent, Quotas

#: Id prefixes of the fine-tuning records (OpenAI's, so ids read the same on the wire).
FILE_PREFIX = "file-"
JOB_PREFIX = "ftjob-"
EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"


def now() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def adapter_not_found(name: str, version: int | None) -> str:
    """The one message for absent and invisible adapters alike."""
    if version is None:
        return f"adapter {name!r} not found"
    return f"adapter {name!r} version {version} not found"


def file_not_found(file_id: str) -> str:
    """The one message for absent files and other tenants' files alike."""
    return f"file {file_id!r} not found"


def job_not_found(job_id: str) -> str:
    """The one message for absent jobs and other tenants' jobs alike."""
    return f"fine-tuning job {job_id!r} not found"


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

FILE_FORMATS = ("chat", "preference")
EVENT_LEVELS = ("info", "warn", "error")
EVENT_TYPES = ("message", "metrics")
#: The statuses ``finish_job`` ends a job in.
FINISH_STATUSES = ("succeeded", "failed", "cancelled")


def validate_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")


def validate_new_file(new: NewFile) -> None:
    if not new.filename:
        raise ValueError("file name must not be empty")
    if not new.purpose:
        raise ValueError("file purpose must not be empty")
    if new.format not in FILE_FORMATS:
        raise ValueError(f"file format must be one of {FILE_FORMATS}, got {new.format!r}")
    if new.lines < 0:
        raise ValueError("file lines must not be negative")
    if not isinstance(new.blob, bytes):
        raise TypeError(f"file blob must be bytes, got {type(new.blob).__name__}")


def validate_new_job(new: NewJob) -> None:
    if not new.model:
        raise ValueError("job model must not be empty")
    if not new.training_file:
        raise ValueError("job training_file must not be empty")
    if not isinstance(new.spec, dict):
        raise TypeError(f"job spec must be a dict, got {type(new.spec).__name__}")
    if isinstance(new.training_tokens, bool) or not isinstance(new.training_tokens, int) or new.training_tokens < 0:
        raise ValueError(f"job training_tokens must be a non-negative int, got {new.training_tokens!r}")


def validate_events(events: list[NewJobEvent]) -> None:
    for event in events:
        if event.level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {EVENT_LEVELS}, got {event.level!r}")
        if event.type not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {EVENT_TYPES}, got {event.type!r}")
        if event.data is not None and not isinstance(event.data, dict):
            raise TypeError(f"event data must be a dict or None, got {type(event.data).__name__}")


def validate_worker(worker_id: str) -> None:
    if not isinstance(worker_id, str) or not worker_id:
        raise ValueError("worker_id must be a non-empty string")


def validate_trained_tokens(trained_tokens: int | None) -> None:
    if trained_tokens is not None and (isinstance(trained_tokens, bool) or trained_tokens < 0):
        raise ValueError(f"trained_tokens must be a non-negative int or None, got {trained_tokens!r}")


def validate_finish(
    status: str, adapter: NewAdapter | None, checkpoint: NewCheckpoint | None, error: dict | None
) -> None:
    """A succeeded job names the adapter it stored (and its checkpoint is that adapter); a failed
    one says why. Refused here, before any write, so a worker's bug cannot half-finish a job."""
    if status not in FINISH_STATUSES:
        raise ValueError(f"a job finishes as one of {FINISH_STATUSES}, got {status!r}")
    if status == "succeeded":
        if adapter is None:
            raise ValueError("a succeeded job needs its adapter")
        validate_new_adapter(adapter)
    elif adapter is not None or checkpoint is not None:
        raise ValueError(f"only a succeeded job stores an adapter or a checkpoint, not a {status} one")
    if status == "failed" and not isinstance(error, dict):
        raise ValueError("a failed job needs its error ({'code', 'message', 'param'})")
    if error is not None and not isinstance(error, dict):
        raise TypeError(f"job error must be a dict or None, got {type(error).__name__}")


def _count_limit(quotas: Quotas, field: str, count: int, things: str) -> None:
    """One more of ``count`` ``things`` must stay within ``quotas.<field>``."""
    limit = getattr(quotas, field)
    if limit is not None and count + 1 > limit:
        message = f"quota {field} exceeded: the tenant has {count} {things} and the limit is {limit}"
        raise QuotaExceeded(field, limit, count, message)


def _sum_limit(quotas: Quotas, field: str, total: int, more: int, holds: str) -> None:
    """``total`` plus ``more`` must stay within ``quotas.<field>``; ``holds`` says what ``total`` is."""
    limit = getattr(quotas, field)
    if limit is not None and total + more > limit:
        message = f"quota {field} exceeded: {holds.format(total)}, {more} more would pass the limit of {limit}"
        raise QuotaExceeded(field, limit, total, message)


def check_quotas(quotas: Quotas, count: int, total_bytes: int, new_bytes: int) -> None:
    """Raise ``QuotaExceeded`` if one more adapter of ``new_bytes`` breaks a limit.

    ``count`` and ``total_bytes`` are the tenant's usage before the write; the
    caller must hold the lock that keeps them true until its insert commits.
    """
    _count_limit(quotas, "max_adapters", count, "adapter versions")
    _sum_limit(quotas, "max_adapter_bytes", total_bytes, new_bytes, "the tenant stores {} bytes")


def check_file_quotas(quotas: Quotas, count: int, total_bytes: int, new_bytes: int) -> None:
    """Raise ``QuotaExceeded`` if one more file of ``new_bytes`` breaks a limit (as ``check_quotas``)."""
    _count_limit(quotas, "max_files", count, "files")
    _sum_limit(quotas, "max_file_bytes", total_bytes, new_bytes, "the tenant stores {} bytes of files")


def check_job_quotas(quotas: Quotas, active: int, tokens: int, new_tokens: int) -> None:
    """Raise ``QuotaExceeded`` if one more job training on ``new_tokens`` breaks a limit.

    ``active`` counts the tenant's jobs on the queue (queued, running, validating files) and
    ``tokens`` the training tokens of its jobs that did not fail or get cancelled; the caller holds
    the tenant's lock, as for ``check_quotas``.
    """
    _count_limit(quotas, "max_queued_jobs", active, "jobs queued or running")
    _sum_limit(quotas, "max_training_tokens", tokens, new_tokens, "the tenant's jobs train on {} tokens")
