"""Typed return values. Unknown fields the server may add later are kept (`extra="allow"`)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class _List(_Model, Generic[T]):
    """A list answer: iterating it (and `len`) goes over its items, like a list."""

    object: str = "list"
    data: list[T]

    def __iter__(self) -> Iterator[T]:  # type: ignore[override]
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


class Adapter(_Model):
    id: str  # "name@version"
    object: str = "adapter"
    name: str
    version: int
    tokens: int
    params: int
    bytes: int
    sha256: str
    base_model: str
    public: bool = False
    created_at: datetime


class AdapterList(_List[Adapter]):
    has_more: bool = False
    next_after: str | None = None


class AdapterDeleted(_Model):
    id: str
    object: str = "adapter.deleted"
    deleted: bool = True
    versions: list[int]


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    root: str | None = None
    parent: str | None = None
    adapter: Adapter | None = None


class ModelList(_List[ModelCard]):
    @property
    def base(self) -> ModelCard:
        """The base model (the first card): its `id` is what adapter files must carry in `base_model`."""
        return next((m for m in self.data if m.parent is None), self.data[0])


class Quotas(_Model):
    """None means unlimited. A tenant created without a quota gets the server's default for it."""

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


class Tenant(_Model):
    id: str
    object: str = "tenant"
    name: str
    quotas: Quotas
    created_at: datetime


class TenantList(_List[Tenant]):
    pass


class ApiKey(_Model):
    id: str
    object: str = "api_key"
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked: bool = False
    key: str | None = None  # the secret, only in the answer that created it


class ApiKeyList(_List[ApiKey]):
    pass


class ChatCompletion(_Model):
    """A chat or text completion, OpenAI's shape; `choices` and `usage` are left as plain dicts."""

    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    _chat_part: ClassVar[str] = "message"  # the choice's field with the chat text (a chunk's: "delta")

    @property
    def text(self) -> str:
        """The first choice's text (chat: message.content, in a chunk delta.content; completions: text)."""
        if not self.choices:
            return ""
        c = self.choices[0]
        return (c.get(self._chat_part) or {}).get("content") or c.get("text") or ""


class ChatCompletionChunk(ChatCompletion):
    """One streamed event; `text` is the first choice's new text."""

    _chat_part: ClassVar[str] = "delta"


Completion = ChatCompletion
CompletionChunk = ChatCompletionChunk


# ------------------------------------------------------------------------------------------ fine-tuning
# OpenAI's shapes (`FileObject`, `FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`), times as
# Unix seconds as the server sends them (and as OpenAI's SDK keeps them).

#: a job in one of these will not change again
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Page(_List[T], Generic[T]):
    """OpenAI's cursor page: pass `last_id` as `after=` for the next one while `has_more`."""

    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FileObject(_Model):
    id: str  # "file-..."
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str | None = None
    status_details: str | None = None
    expires_at: int | None = None


class FileList(_Page[FileObject]):
    pass


class FileDeleted(_Model):
    id: str
    object: str = "file"
    deleted: bool = True


class JobError(_Model):
    """Why a job failed: `code` (e.g. "training_failed", "worker_lost"), `message`, `param`."""

    code: str | None = None
    message: str = ""
    param: str | None = None


class FineTuningJob(_Model):
    id: str  # "ftjob-..."
    object: str = "fine_tuning.job"
    created_at: int
    status: str  # validating_files, queued, running, succeeded, failed, cancelled
    model: str
    training_file: str
    validation_file: str | None = None
    fine_tuned_model: str | None = None  # the adapter a succeeded job stored: use it as `model=` or `adapter=`
    error: JobError | None = None
    finished_at: int | None = None
    started_at: int | None = None
    hyperparameters: dict[str, Any] = {}
    method: dict[str, Any] = {}  # {"type": "supervised" | "dpo", <type>: {"hyperparameters": {...}}}
    aligner: dict[str, Any] | None = None  # the adapter's shape: tokens, start_layer, gate_activation
    seed: int | None = None
    suffix: str | None = None
    trained_tokens: int | None = None
    organization_id: str | None = None
    result_files: list[str] = []
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    estimated_finish: int | None = None
    attempts: int | None = None

    @property
    def finished(self) -> bool:
        """succeeded, failed or cancelled: the status will not change again."""
        return self.status in FINISHED_STATUSES


class FineTuningJobList(_Page[FineTuningJob]):
    pass


class FineTuningJobEvent(_Model):
    """One line of a job's log. `type` "metrics" events carry `data` {"step", "total_steps", "train_loss",
    "learning_rate", "valid_loss"?}; the others (`type` "message") only `message`."""

    id: str
    object: str = "fine_tuning.job.event"
    created_at: int
    level: str = "info"  # info, warn, error
    message: str
    type: str = "message"
    data: dict[str, Any] = {}


class FineTuningJobEventList(_Page[FineTuningJobEvent]):
    """Newest first, as OpenAI lists them."""


class FineTuningJobCheckpoint(_Model):
    id: str
    object: str = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any] = {}
    step_number: int


class FineTuningJobCheckpointList(_Page[FineTuningJobCheckpoint]):
    pass
