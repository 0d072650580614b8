"""FastAPI dependencies: services, the calling tenant, and adapters the tenant may use.

Tenant scoping lives here, not in the routes: every adapter a route sees came through `AdapterDep`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from adapters_store import AdapterRecord, NotFound
from server.errors import AdapterNotFound
from server.schemas import AdapterRef
from server.services import Services


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def current_tenant(svc: ServicesDep) -> str:
    """The calling tenant's id. Open mode: the one implicit tenant."""
    return svc.open_tenant_id


TenantDep = Annotated[str, Depends(current_tenant)]


async def resolve_adapter(svc: Services, tenant: str, ref: AdapterRef) -> AdapterRecord:
    """The adapter `ref` names, if `tenant` may use it; anything else is the same 404."""
    try:
        return await svc.store.get_adapter(tenant, ref.name, ref.version)
    except NotFound:
        raise AdapterNotFound.named(str(ref)) from None


async def path_adapter(svc: ServicesDep, tenant: TenantDep, name: Annotated[str, Path()]) -> AdapterRecord:
    return await resolve_adapter(svc, tenant, AdapterRef.parse(name, param="name"))


AdapterDep = Annotated[AdapterRecord, Depends(path_adapter)]
