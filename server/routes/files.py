"""OpenAI's Files API, for fine-tuning data: upload (checked line by line), list, read, content, delete.

Files belong to one tenant: another tenant's file id answers exactly as an unknown one (404).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from adapters_store import NewFile, NotFound
from server.deps import ManagedTenantDep, ServicesDep
from server.errors import InvalidRequest, NotFoundError, PayloadTooLarge
from server.fine_tuning import file_object, page
from server.limits import declared_length
from server.training_files import parse

router = APIRouter(prefix="/v1/files", tags=["files"])

PURPOSES = ("fine-tune",)
_MULTIPART_OVERHEAD = 64 * 1024


def file_not_found(file_id: str, param: str | None = None) -> NotFoundError:
    """The one answer for an unknown file and another tenant's."""
    return NotFoundError(f"No such File object: {file_id[:80]}", param=param, code="file_not_found")


@router.post("")
async def upload_file(
    request: Request,
    svc: ServicesDep,
    tenant: ManagedTenantDep,
    file: Annotated[UploadFile, File(description="JSONL: chat examples (supervised) or preference pairs (dpo)")],
    purpose: Annotated[str, Form()],
) -> dict:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose[:40]!r} is not supported here; use 'fine-tune' (training data)", param="purpose"
        )
    limit = svc.settings.max_file_bytes
    declared = declared_length(request.scope)
    if declared is not None and declared > limit + _MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"file exceeds the limit of {limit} bytes (ALIGNER_MAX_FILE_BYTES)", param="file")
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"file exceeds the limit of {limit} bytes (ALIGNER_MAX_FILE_BYTES)", param="file")
    parsed = parse(data)
    name = (file.filename or "upload.jsonl")[:255]
    record = await svc.store.create_file(
        tenant.id, NewFile(filename=name, purpose=purpose, format=parsed.format, lines=len(parsed.rows), blob=data)
    )
    return file_object(record)


@router.get("")
async def list_files(
    svc: ServicesDep,
    tenant: ManagedTenantDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    if order != "desc":
        raise InvalidRequest("only order=desc (newest first) is supported", param="order")
    try:
        found = await svc.store.list_files(tenant.id, limit=limit, after=after, purpose=purpose)
    except NotFound:
        raise file_not_found(after or "", param="after") from None
    return page([file_object(f) for f in found.items], found.has_more)


@router.get("/{file_id}")
async def get_file(svc: ServicesDep, tenant: ManagedTenantDep, file_id: str) -> dict:
    try:
        return file_object(await svc.store.get_file(tenant.id, file_id))
    except NotFound:
        raise file_not_found(file_id) from None


@router.get("/{file_id}/content")
async def file_content(svc: ServicesDep, tenant: ManagedTenantDep, file_id: str) -> Response:
    try:
        data = await svc.store.get_file_content(tenant.id, file_id)
    except NotFound:
        raise file_not_found(file_id) from None
    return Response(data, media_type="application/jsonl")


@router.delete("/{file_id}")
async def delete_file(svc: ServicesDep, tenant: ManagedTenantDep, file_id: str) -> dict:
    try:
        deleted = await svc.store.delete_file(tenant.id, file_id)
    except NotFound:
        raise file_not_found(file_id) from None
    return {"id": deleted.id, "object": "file", "deleted": True}
