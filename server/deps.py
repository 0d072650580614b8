"""FastAPI dependencies: services, the calling tenant, the admin, and adapters the tenant may use.

Tenant scoping lives here, not in the routes: every adapter a route sees came through `AdapterDep` or
`resolve_adapter`, which answer another tenant's adapter exactly like a missing one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from adapters_store import AdapterRecord, NotFound, Tenant
from server.auth import bearer_token, hash_key, same_secret
from server.errors import AdapterNotFound, ModelNotFound, PermissionDenied, RateLimited, Unauthorized
from server.schemas import AdapterRef
from server.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_tenant(request: Request, svc: ServicesDep) -> Tenant:
    """The calling tenant: from `Authorization: Bearer <key>` in multi-tenant mode, implicit in open mode."""
    if svc.open_tenant is not None:
        return svc.open_tenant
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    try:
        api_key, tenant = await svc.store.find_api_key(hash_key(token))
    except NotFound:
        raise Unauthorized("Incorrect API key provided.") from None
    request.state.api_key = (api_key.id, hash_key(token))  # requests in flight end when this key is revoked
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


async def rate_limited_tenant(svc: ServicesDep, tenant: TenantDep) -> Tenant:
    """The tenant, counted against its requests-per-minute quota (generation endpoints)."""
    wait = svc.limiter.retry_after(tenant.id, tenant.quotas.requests_per_minute)
    if wait is not None:
        raise RateLimited(
            f"Rate limit of {tenant.quotas.requests_per_minute} requests per minute reached.", retry_after=wait
        )
    return tenant


GenerationTenantDep = Annotated[Tenant, Depends(rate_limited_tenant)]


async def management_tenant(svc: ServicesDep, tenant: TenantDep) -> Tenant:
    """The tenant, counted against the per-minute limit of adapter uploads, deletes and listings
    (`ALIGNER_TENANT_MANAGEMENT_PER_MINUTE`, multi-tenant mode)."""
    limit = svc.settings.tenant_management_per_minute if svc.multi_tenant else None
    wait = svc.management_limiter.retry_after(tenant.id, limit)
    if wait is not None:
        raise RateLimited(
            f"Rate limit of {limit} adapter uploads, deletes and listings per minute reached "
            "(ALIGNER_TENANT_MANAGEMENT_PER_MINUTE).",
            retry_after=wait,
        )
    return tenant


ManagedTenantDep = Annotated[Tenant, Depends(management_tenant)]


async def require_admin(request: Request, svc: ServicesDep) -> None:
    admin_key = svc.settings.admin_key
    if admin_key is None:
        raise PermissionDenied("The admin API is disabled in open mode; set ALIGNER_ADMIN_KEY to enable it.")
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Missing admin key: send 'Authorization: Bearer <admin key>'.")
    if not same_secret(token, admin_key.get_secret_value()):
        raise Unauthorized("Incorrect admin key provided.")


AdminDep = Depends(require_admin)


async def resolve_adapter(svc: Services, tenant: Tenant, ref: AdapterRef, *, via: str = "adapter") -> AdapterRecord:
    """The adapter `ref` names, if `tenant` may use it; anything else is the same 404 (OpenAI's
    `model_not_found` when it was named `via` the `model` field)."""
    try:
        return await svc.resolver.resolve(tenant.id, ref.name, ref.version)
    except NotFound:
        if via == "model":
            raise ModelNotFound.named(str(ref)) from None
        raise AdapterNotFound.named(str(ref)) from None


async def path_adapter(svc: ServicesDep, tenant: ManagedTenantDep, name: Annotated[str, Path()]) -> AdapterRecord:
    return await resolve_adapter(svc, tenant, AdapterRef.parse(name, param="name"))


AdapterDep = Annotated[AdapterRecord, Depends(path_adapter)]


async def require_metrics_reader(request: Request, svc: ServicesDep) -> None:
    """/metrics: open in open mode; in multi-tenant mode the admin key or ALIGNER_METRICS_TOKEN (Prometheus's).

    Tenant keys never read it: the metrics are labelled by tenant, so they would show every tenant's traffic.
    """
    admin_key = svc.settings.admin_key
    if admin_key is None:
        return
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Missing credential: send 'Authorization: Bearer <admin key or metrics token>'.")
    readers = [s.get_secret_value() for s in (admin_key, svc.settings.metrics_token) if s is not None]
    if not any([same_secret(token, secret) for secret in readers]):  # a list: both compared, whichever matches
        raise Unauthorized("Incorrect metrics credential provided.")


MetricsReaderDep = Depends(require_metrics_reader)
