"""``SQLStore``: the ``Store`` interface over the jobs of ``jobs.py``, for both SQL drivers.

Each method checks its input, runs one job through a driver hook and shapes the answer
(``NotFound`` for no version, the page of a listing). What a driver adds is only how a job
reaches its database (``sqlite.SQLiteStore``, ``postgres.PostgresStore``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import jobs
from .base import Store
from .common import (
    adapter_not_found,
    validate_api_key,
    validate_new_adapter,
    validate_quotas,
    validate_tenant_name,
)
from .errors import NotFound
from .models import PUBLIC_TENANT_NAME, AdapterRecord, ApiKey, NewAdapter, Page, Quotas, Tenant

T = TypeVar("T")

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
