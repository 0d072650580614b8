"""The admin API (multi-tenant mode): tenants, quotas, API keys, public adapters. Admin key only."""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from adapters_store import ApiKey, Quotas, Tenant
from server.auth import issue_key
from server.deps import AdminDep, ServicesDep
from server.fair_share import default_quotas
from server.routes.adapters import FileField, NameField, delete_owned, store_upload
from server.schemas import AdapterDeleted, AdapterPublic

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


_MAX_QUOTA = 2**63 - 1  # what the stores hold (a signed 64-bit integer); beyond it the store refuses


QuotaValue = int | None
_QUOTA = Field(default=None, ge=0, le=_MAX_QUOTA)


class QuotasBody(BaseModel):
    """Per-tenant limits; null means unlimited. On create, a limit left out gets the server's default
    (`ALIGNER_TENANT_*`); on PATCH, a limit left out keeps its value."""

    max_adapters: QuotaValue = _QUOTA
    max_adapter_bytes: QuotaValue = _QUOTA
    requests_per_minute: QuotaValue = _QUOTA
    max_concurrent_requests: QuotaValue = _QUOTA
    max_n: QuotaValue = _QUOTA
    max_tokens_in_flight: QuotaValue = _QUOTA
    max_active_adapters: QuotaValue = _QUOTA
    max_files: QuotaValue = _QUOTA
    max_file_bytes: QuotaValue = _QUOTA
    max_queued_jobs: QuotaValue = _QUOTA
    max_training_tokens: QuotaValue = _QUOTA

    def over(self, base: Quotas) -> Quotas:
        """`base` with the limits this body names replaced."""
        return replace(base, **self.model_dump(include=self.model_fields_set))

    @classmethod
    def of(cls, q: Quotas) -> QuotasBody:
        return cls(**asdict(q))


class TenantCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    quotas: QuotasBody = Field(default_factory=QuotasBody)


class TenantPublic(BaseModel):
    id: str
    object: str = "tenant"
    name: str
    quotas: QuotasBody
    created_at: datetime

    @classmethod
    def of(cls, t: Tenant) -> TenantPublic:
        return cls(id=t.id, name=t.name, quotas=QuotasBody.of(t.quotas), created_at=t.created_at)


class TenantList(BaseModel):
    object: str = "list"
    data: list[TenantPublic]


class KeyPublic(BaseModel):
    id: str
    object: str = "api_key"
    tenant_id: str
    prefix: str
    created_at: datetime
    revoked: bool
    key: str | None = None  # only in the response that created it

    @classmethod
    def of(cls, k: ApiKey, key: str | None = None) -> KeyPublic:
        return cls(id=k.id, tenant_id=k.tenant_id, prefix=k.prefix, created_at=k.created_at, revoked=k.revoked, key=key)


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyPublic]


@router.post("/tenants", status_code=201)
async def create_tenant(svc: ServicesDep, body: TenantCreate) -> TenantPublic:
    return TenantPublic.of(await svc.store.create_tenant(body.name, body.quotas.over(default_quotas(svc.settings))))


@router.get("/tenants")
async def list_tenants(svc: ServicesDep) -> TenantList:
    return TenantList(data=[TenantPublic.of(t) for t in await svc.store.list_tenants()])


@router.patch("/tenants/{tenant_id}")
async def set_quotas(svc: ServicesDep, tenant_id: str, body: QuotasBody) -> TenantPublic:
    tenant = await svc.store.get_tenant(tenant_id)
    return TenantPublic.of(await svc.store.set_quotas(tenant_id, body.over(tenant.quotas)))


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(svc: ServicesDep, tenant_id: str) -> KeyPublic:
    issued = issue_key()
    record = await svc.store.create_api_key(tenant_id, key_hash=issued.key_hash, prefix=issued.prefix)
    return KeyPublic.of(record, key=issued.key)


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(svc: ServicesDep, tenant_id: str) -> KeyList:
    await svc.store.get_tenant(tenant_id)
    return KeyList(data=[KeyPublic.of(k) for k in await svc.store.list_api_keys(tenant_id)])


@router.delete("/keys/{key_id}")
async def revoke_key(svc: ServicesDep, key_id: str) -> KeyPublic:
    revoked = await svc.store.revoke_api_key(key_id)
    svc.fair.revoke(key_id=revoked.id)  # this replica's requests end now; other replicas' at their next poll
    return KeyPublic.of(revoked)


@router.post("/adapters", status_code=201)
async def upload_public_adapter(request: Request, svc: ServicesDep, file: FileField, name: NameField) -> AdapterPublic:
    """A public adapter: usable and listed by every tenant, writable only here."""
    return await store_upload(svc, request, svc.public_tenant.id, name, file)


@router.delete("/adapters/{name}")
async def delete_public_adapter(svc: ServicesDep, name: str) -> AdapterDeleted:
    return await delete_owned(svc, svc.public_tenant.id, name)
