"""Plain records exchanged with the store.

They are frozen dataclasses so that a record handed to one request cannot be
mutated under another, and they carry no backend types (no sqlite rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, TypeVar

T = TypeVar("T")

#: Name of the reserved tenant whose adapters every tenant sees (see
#: ``Store.ensure_public_tenant``). ``list_tenants`` leaves it out, and
#: ``ensure_tenant``/``create_tenant`` refuse the name.
PUBLIC_TENANT_NAME = "__public__"


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; ``None`` means unlimited, 0 forbids any use.

    ``max_adapters`` counts owned adapter versions and ``max_adapter_bytes``
    their total blob size; the store enforces both in ``create_adapter``.

    The rest are only stored: the server enforces them on generation requests.

    * ``requests_per_minute``: requests admitted per minute (rate limiting).
    * ``max_concurrent_requests``: requests the tenant may have in flight at once.
    * ``max_n``: the largest ``n`` (and ``best_of``) of one request.
    * ``max_tokens_in_flight``: the sum over the tenant's in-flight requests of
      ``n * (prompt tokens + max_tokens)``.
    * ``max_active_adapters``: distinct adapters the tenant's in-flight requests
      may use at once (its share of the engine's hot adapter slots).

    Fine-tuning, enforced by the store under the same lock as the insert:

    * ``max_files`` and ``max_file_bytes``: stored files and their total bytes
      (``create_file``).
    * ``max_queued_jobs``: jobs queued or running at once (``create_job``).
    * ``max_training_tokens``: the sum of ``training_tokens`` over the tenant's
      jobs that did not fail or get cancelled (``create_job``).

    Each field is a column of the same name in the backends' ``tenants`` table.
    """

    max_adapters: int | None = None
    max_adapter_bytes: int | None = None
    requests_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_n: int | None = None
    max_tokens_in_flight: int | None = None
    max_active_adapters: int | None = None
    max_files: int | None = None
    max_file_bytes: int | None = None
    max_queued_jobs: int | None = None
    max_training_tokens: int | None = None


@dataclass(frozen=True)
class Tenant:
    """A customer namespace; adapters belong to exactly one tenant."""

    id: str
    name: str
    created_at: datetime
    quotas: Quotas = field(default_factory=Quotas)


@dataclass(frozen=True)
class ApiKey:
    """One API key of a tenant. Only its hash is stored; ``prefix`` is for display."""

    id: str
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked: bool


@dataclass(frozen=True)
class AdapterRecord:
    """Metadata of one stored adapter version.

    The blob is deliberately absent: listings must stay cheap, and the weights
    are fetched separately with ``Store.get_blob`` only when a model is loaded.
    """

    id: str
    tenant_id: str
    name: str
    version: int
    tokens: int
    params: int
    bytes: int
    sha256: str
    base_model: str
    public: bool
    created_at: datetime


@dataclass(frozen=True)
class NewAdapter:
    """What the server hands in to create a version; the store assigns id and version."""

    name: str
    blob: bytes
    tokens: int
    params: int
    sha256: str
    base_model: str

    @property
    def bytes(self) -> int:
        """Size of the blob, recorded for quotas."""
        return len(self.blob)


@dataclass(frozen=True)
class Page:
    """One page of a cursor-paginated listing.

    ``next_after`` is the value to pass as ``after`` for the next page, or
    None when this page is the last one.
    """

    items: list[AdapterRecord]
    next_after: str | None


ChangeKind = Literal["adapter_created", "adapter_deleted", "adapter_public", "resync"]
CHANGE_KINDS: tuple[str, ...] = ("adapter_created", "adapter_deleted", "adapter_public", "resync")


@dataclass(frozen=True)
class ChangeEvent:
    """A committed write, as seen by ``Store.subscribe`` callbacks (possibly on another replica).

    * ``adapter_created``: ``version`` is the new version.
    * ``adapter_deleted``: ``version`` is the deleted version, or None when
      every version of the name was deleted at once.
    * ``adapter_public``: the name was published or unpublished (re-read it);
      ``version`` is None.
    * ``resync``: the feed may have missed events (its connection dropped and
      was re-established); ``tenant_id`` and ``name`` are empty and a
      subscriber should drop or reload everything it cached. Subscribers
      should ignore kinds they do not know.

    Events carry no data beyond the key: a subscriber re-reads the store.
    """

    kind: ChangeKind
    tenant_id: str
    name: str
    version: int | None = None


# Fine-tuning: uploaded training files, jobs on a queue, their events and checkpoints.

FileFormat = Literal["chat", "preference"]
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
#: A job in one of these statuses is finished: it never changes again.
FINISHED_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class NewFile:
    """An uploaded file the server has already validated line by line; the store assigns the id."""

    filename: str
    purpose: str  # "fine-tune"
    format: FileFormat  # chat JSONL (supervised) or preference JSONL (dpo)
    lines: int  # examples in the file
    blob: bytes

    @property
    def bytes(self) -> int:
        return len(self.blob)


@dataclass(frozen=True)
class FileRecord:
    """Metadata of one stored file of a tenant (the content is fetched with ``Store.get_file_content``)."""

    id: str  # "file-..."
    tenant_id: str
    filename: str
    purpose: str
    format: FileFormat
    lines: int
    bytes: int
    created_at: datetime


@dataclass(frozen=True)
class NewJob:
    """A fine-tuning job as the server validated it; the store assigns the id and queues it.

    ``spec`` is the request as the server normalised it (method, hyperparameters, the aligner
    shape, suffix, seed), kept as JSON and handed back unchanged; ``training_tokens`` is the
    server's count of the tokens the job trains on (file tokens x epochs), for the quota.
    """

    model: str
    training_file: str
    validation_file: str | None
    spec: dict
    training_tokens: int


@dataclass(frozen=True)
class JobRecord:
    """One fine-tuning job.

    * ``status``: ``queued`` until a worker claims it (``running``), then one of the finished
      statuses. A running job whose worker stopped heartbeating is queued again (``attempts``
      counts the claims) or, past the attempts allowed, failed.
    * ``error``: ``{"code", "message", "param"}`` of a failed job, else None.
    * ``fine_tuned_model``: the name of the adapter a succeeded job stored for its tenant.
    """

    id: str  # "ftjob-..."
    tenant_id: str
    status: JobStatus
    model: str
    training_file: str
    validation_file: str | None
    spec: dict
    training_tokens: int
    trained_tokens: int | None
    fine_tuned_model: str | None
    error: dict | None
    attempts: int
    cancel_requested: bool
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class NewJobEvent:
    """What a worker (or the server) reports about a job."""

    message: str
    level: Literal["info", "warn", "error"] = "info"
    type: Literal["message", "metrics"] = "message"
    data: dict | None = None  # metrics events: {"step", "train_loss", "valid_loss", ...}


@dataclass(frozen=True)
class JobEvent:
    id: str  # "ftevent-..."
    job_id: str
    seq: int  # increasing per job, in the order the events were written
    message: str
    level: str
    type: str
    data: dict | None
    created_at: datetime


@dataclass(frozen=True)
class NewCheckpoint:
    step: int
    metrics: dict  # {"step", "train_loss", "valid_loss", ...}


@dataclass(frozen=True)
class CheckpointRecord:
    id: str  # "ftckpt-..."
    job_id: str
    step: int
    metrics: dict
    fine_tuned_model_checkpoint: str  # the adapter name the checkpoint was stored as
    created_at: datetime


@dataclass(frozen=True)
class ListPage(Generic[T]):
    """A page of a newest-first listing (files, jobs, events, checkpoints); ``has_more`` says
    whether passing the last item's id as ``after`` gives another page."""

    items: list[T]
    has_more: bool
