"""Adapter management: upload (a new version per upload), list, read, versions, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from adapters_store import NewAdapter, NotFound
from aligner_core.adapter_format import check_fits, decode, encode
from server.deps import AdapterDep, ManagedTenantDep, ServicesDep
from server.errors import AdapterNotFound, PayloadTooLarge
from server.limits import declared_length
from server.schemas import AdapterDeleted, AdapterList, AdapterPublic, AdapterRef, check_name
from server.services import Services

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

_MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around the file

FileField = Annotated[UploadFile, File(description="an aligner/v1 safetensors file")]
NameField = Annotated[str, Form(description="1-64 letters, digits, '.', '_' or '-'")]


async def store_upload(svc: Services, request: Request, owner_id: str, name: str, file: UploadFile) -> AdapterPublic:
    """Validate an uploaded file against the served model and store it as the next version of `name`."""
    limit = svc.settings.max_adapter_bytes
    declared = declared_length(request.scope)
    if declared is not None and declared > limit + _MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"request of {declared} bytes exceeds the adapter limit of {limit} bytes", param="file")
    check_name(name)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"adapter file exceeds the limit of {limit} bytes", param="file")
    try:
        adapter = decode(data, max_bytes=limit)
        check_fits(adapter, svc.spec, max_tokens=svc.settings.max_adapter_tokens)
    except Exception:
        svc.metrics.uploads.labels("rejected").inc()
        raise
    blob = encode(adapter)  # canonical bytes: their sha256 is the adapter's identity in the engine
    record = await svc.store.create_adapter(
        owner_id,
        NewAdapter(
            name=name,
            blob=blob,
            tokens=adapter.tokens,
            params=adapter.params,
            sha256=adapter.sha256(),
            base_model=adapter.base_model,
        ),
    )
    svc.metrics.uploads.labels("stored").inc()
    return AdapterPublic.of(record)


async def delete_owned(svc: Services, owner_id: str, name: str) -> AdapterDeleted:
    """Delete `owner_id`'s adapter (all versions, or `name@n`); running requests finish first."""
    ref = AdapterRef.parse(name, param="name")
    try:
        deleted = await svc.store.delete_adapter(owner_id, ref.name, ref.version)
    except NotFound:
        raise AdapterNotFound.named(str(ref)) from None
    for key in {r.sha256 for r in deleted}:
        await svc.engine.retire(key)
    return AdapterDeleted(id=str(ref), versions=sorted(r.version for r in deleted))


@router.post("", status_code=201)
async def upload_adapter(
    request: Request, svc: ServicesDep, tenant: ManagedTenantDep, file: FileField, name: NameField
) -> AdapterPublic:
    return await store_upload(svc, request, tenant.id, name, file)


@router.get("")
async def list_adapters(
    svc: ServicesDep,
    tenant: ManagedTenantDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: str | None = None,
) -> AdapterList:
    page = await svc.store.list_adapters(tenant.id, limit=limit, after=after)
    return AdapterList(
        data=[AdapterPublic.of(r) for r in page.items], has_more=page.next_after is not None, next_after=page.next_after
    )


@router.get("/{name}")
async def get_adapter(record: AdapterDep) -> AdapterPublic:
    return AdapterPublic.of(record)


@router.get("/{name}/content")
async def adapter_content(svc: ServicesDep, record: AdapterDep) -> Response:
    """The aligner/v1 file of a visible adapter (`name` or `name@n`): e.g. to keep a fine-tuned one."""
    data = await svc.store.get_blob(record.id)
    filename = f"{record.name}-v{record.version}.safetensors"
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/{name}/versions")
async def list_versions(svc: ServicesDep, tenant: ManagedTenantDep, record: AdapterDep) -> AdapterList:
    versions = await svc.store.list_versions(tenant.id, record.name)
    return AdapterList(data=[AdapterPublic.of(r) for r in versions], has_more=False)


@router.delete("/{name}")
async def delete_adapter(svc: ServicesDep, tenant: ManagedTenantDep, name: str) -> AdapterDeleted:
    return await delete_owned(svc, tenant.id, name)
