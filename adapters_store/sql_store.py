"""``SQLStore``: the ``Store`` interface over the jobs of ``jobs.py``, for both SQL drivers.

Each method checks its input, runs one job through a driver hook and shapes the answer
(``NotFound`` for no version, the page of a listing). What a driver adds is only how a job
reaches its database (``sqlite.SQLiteStore``, ``postgres.PostgresStore``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from . import jobs
from .base import Store
from .common import (
    adapter_not_found,
    validate_api_key,
    validate_events,
    validate_finish,
    validate_limit,
    validate_new_adapter,
    validate_new_file,
    validate_new_job,
    validate_quotas,
    validate_tenant_name,
    validate_trained_tokens,
    validate_worker,
)
from .errors import NotFound
from .models import (
    PUBLIC_TENANT_NAME,
    AdapterRecord,
    ApiKey,
    CheckpointRecord,
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

T = TypeVar("T")
R = TypeVar("R")

#: A job of ``jobs.py``: ``job(connection, *args)``.
Job = Callable[..., Coroutine[Any, Any, T]]


class SQLStore(Store):
    """``Store`` over a SQL database: each method checks its input and runs one job.

    A driver says how a job reaches its database; each hook runs ``job(connection, *args)`` on
    one of its connections (``jobs.Connection``):

    * ``_read``: a job that only reads.
    * ``_point_read``: a read by key on the request path (by default, ``_read``).
    * ``_write``: a job in one write transaction; its announcements are delivered on commit.
    """

    @abstractmethod
    async def _read(self, job: Job[T], *args: object) -> T: ...

    @abstractmethod
    async def _write(self, job: Job[T], *args: object) -> T: ...

    async def _point_read(self, job: Job[T], *args: object) -> T:
        return await self._read(job, *args)

    # Tenants

    async def ensure_tenant(self, name: str) -> Tenant:
        validate_tenant_name(name)
        return await self._write(jobs.ensure_tenant, name)

    async def create_tenant(self, name: str, quotas: Quotas | None = None) -> Tenant:
        validate_tenant_name(name)
        quotas = Quotas() if quotas is None else quotas
        validate_quotas(quotas)
        return await self._write(jobs.create_tenant, name, quotas)

    async def set_quotas(self, tenant_id: str, quotas: Quotas) -> Tenant:
        validate_quotas(quotas)
        return await self._write(jobs.set_quotas, tenant_id, quotas)

    async def ensure_public_tenant(self) -> Tenant:
        return await self._write(jobs.ensure_tenant, PUBLIC_TENANT_NAME)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        return await self._read(jobs.get_tenant, tenant_id)

    async def list_tenants(self) -> list[Tenant]:
        return await self._read(jobs.list_tenants)

    # API keys

    async def create_api_key(self, tenant_id: str, *, key_hash: str, prefix: str) -> ApiKey:
        validate_api_key(key_hash, prefix)
        return await self._write(jobs.create_api_key, tenant_id, key_hash, prefix)

    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, Tenant]:
        return await self._point_read(jobs.find_api_key, key_hash)

    async def list_api_keys(self, tenant_id: str) -> list[ApiKey]:
        return await self._read(jobs.list_api_keys, tenant_id)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        return await self._write(jobs.revoke_api_key, key_id)

    # Adapters

    async def create_adapter(self, tenant_id: str, new: NewAdapter) -> AdapterRecord:
        validate_new_adapter(new)
        return await self._write(jobs.create_adapter, tenant_id, new)

    async def get_adapter(self, tenant_id: str, name: str, version: int | None = None) -> AdapterRecord:
        records = await self._point_read(jobs.resolved_versions, tenant_id, name, version)
        if not records:
            raise NotFound(adapter_not_found(name, version))
        return records[-1]

    async def get_blob(self, adapter_id: str) -> bytes:
        return await self._read(jobs.get_blob, adapter_id)

    async def list_adapters(self, tenant_id: str, *, limit: int = 100, after: str | None = None) -> Page:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        # One extra row tells whether another page exists without a COUNT.
        records = await self._read(jobs.list_newest, tenant_id, after, limit + 1)
        items = records[:limit]
        return Page(items=items, next_after=items[-1].name if len(records) > limit else None)

    async def list_versions(self, tenant_id: str, name: str) -> list[AdapterRecord]:
        records = await self._read(jobs.resolved_versions, tenant_id, name, None)
        if not records:
            raise NotFound(adapter_not_found(name, None))
        return records

    async def delete_adapter(self, tenant_id: str, name: str, version: int | None = None) -> list[AdapterRecord]:
        return await self._write(jobs.delete_adapter, tenant_id, name, version)

    async def set_public(self, adapter_tenant_id: str, name: str, public: bool) -> None:
        await self._write(jobs.set_public, adapter_tenant_id, name, public)

    async def count_usage(self, tenant_id: str) -> tuple[int, int]:
        return await self._read(jobs.count_usage, tenant_id)

    # Fine-tuning files. Listings are newest first; ``after`` is the last id of the previous page,
    # and an ``after`` that names no item of the listing (absent, or another tenant's) gives an
    # empty page rather than ``NotFound``: a page past a deleted item is simply over.

    async def create_file(self, tenant_id: str, new: NewFile) -> FileRecord:
        validate_new_file(new)
        return await self._write(jobs.create_file, tenant_id, new)

    async def get_file(self, tenant_id: str, file_id: str) -> FileRecord:
        return await self._point_read(jobs.get_file, tenant_id, file_id)

    async def get_file_content(self, tenant_id: str, file_id: str) -> bytes:
        return await self._read(jobs.get_file_content, tenant_id, file_id)

    async def list_files(
        self, tenant_id: str, *, limit: int = 100, after: str | None = None, purpose: str | None = None
    ) -> ListPage[FileRecord]:
        validate_limit(limit)
        return _page(await self._read(jobs.list_files, tenant_id, after, purpose, limit + 1), limit)

    async def delete_file(self, tenant_id: str, file_id: str) -> FileRecord:
        return await self._write(jobs.delete_file, tenant_id, file_id)

    # Fine-tuning jobs

    async def create_job(self, tenant_id: str, new: NewJob, events: list[NewJobEvent]) -> JobRecord:
        validate_new_job(new)
        validate_events(events)
        return await self._write(jobs.create_job, tenant_id, new, list(events))

    async def get_job(self, tenant_id: str, job_id: str) -> JobRecord:
        return await self._point_read(jobs.get_job, tenant_id, job_id)

    async def list_jobs(self, tenant_id: str, *, limit: int = 20, after: str | None = None) -> ListPage[JobRecord]:
        validate_limit(limit)
        return _page(await self._read(jobs.list_jobs, tenant_id, after, limit + 1), limit)

    async def list_job_events(
        self, tenant_id: str, job_id: str, *, limit: int = 20, after: str | None = None
    ) -> ListPage[JobEvent]:
        validate_limit(limit)
        return _page(await self._read(jobs.list_job_events, tenant_id, job_id, after, limit + 1), limit)

    async def list_checkpoints(
        self, tenant_id: str, job_id: str, *, limit: int = 10, after: str | None = None
    ) -> ListPage[CheckpointRecord]:
        validate_limit(limit)
        return _page(await self._read(jobs.list_checkpoints, tenant_id, job_id, after, limit + 1), limit)

    async def cancel_job(self, tenant_id: str, job_id: str) -> JobRecord:
        return await self._write(jobs.cancel_job, tenant_id, job_id)

    async def claim_job(self, worker_id: str, *, lease_s: float, max_attempts: int) -> JobRecord | None:
        validate_worker(worker_id)
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
        return await self._write(jobs.claim_job, worker_id, lease_s, max_attempts)

    async def heartbeat(
        self, job_id: str, worker_id: str, events: list[NewJobEvent], *, trained_tokens: int | None = None
    ) -> JobRecord:
        validate_worker(worker_id)
        validate_events(events)
        validate_trained_tokens(trained_tokens)
        return await self._write(jobs.heartbeat, job_id, worker_id, list(events), trained_tokens)

    async def finish_job(
        self,
        job_id: str,
        worker_id: str,
        *,
        status: str,
        events: list[NewJobEvent],
        adapter: NewAdapter | None = None,
        checkpoint: NewCheckpoint | None = None,
        error: dict | None = None,
        trained_tokens: int | None = None,
    ) -> JobRecord:
        validate_worker(worker_id)
        validate_events(events)
        validate_trained_tokens(trained_tokens)
        validate_finish(status, adapter, checkpoint, error)
        return await self._write(
            jobs.finish_job, job_id, worker_id, status, list(events), adapter, checkpoint, error, trained_tokens
        )

    async def release_job(self, job_id: str, worker_id: str, event: NewJobEvent) -> None:
        validate_worker(worker_id)
        validate_events([event])
        await self._write(jobs.release_job, job_id, worker_id, event)

    async def job_counts(self) -> dict[str, int]:
        return await self._read(jobs.job_counts)

    async def training_steps_since(self, since: datetime) -> int:
        return await self._read(jobs.training_steps_since, since)


def _page(rows: list[R], limit: int) -> ListPage[R]:
    """A page from ``limit + 1`` rows: the extra one only says that another page exists."""
    return ListPage(items=rows[:limit], has_more=len(rows) > limit)
