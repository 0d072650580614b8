"""OpenAI's fine-tuning jobs API: create (queued in the store), list, retrieve, events, checkpoints, cancel.

The API process only checks and queues a job; a training worker (server/finetune_worker.py, its own
process) runs it. A succeeded job's adapter is the tenant's own, named in `fine_tuned_model`, and serves at
once through `model=` or `adapter`. Another tenant's job id answers exactly as an unknown one (404).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Annotated

from fastapi import APIRouter, Query

from adapters_store import ChangeEvent, FileRecord, JobRecord, NewJob, NewJobEvent, NotFound, Tenant
from server.deps import ManagedTenantDep, ServicesDep
from server.errors import NotFoundError
from server.fine_tuning import (
    JobCreate,
    checkpoint_object,
    event_object,
    job_object,
    page,
    plan_job,
)
from server.routes.files import file_not_found
from server.services import Services
from server.training_files import count_tokens, parse

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def job_not_found(job_id: str) -> NotFoundError:
    return NotFoundError(
        f"Fine-tuning job {job_id[:80]!r} not found.", param="fine_tuning_job_id", code="job_not_found"
    )


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def _file(svc: Services, tenant: Tenant, file_id: str, param: str) -> FileRecord:
    try:
        return await svc.store.get_file(tenant.id, file_id)
    except NotFound:
        raise file_not_found(file_id, param=param) from None


async def _job(svc: Services, tenant: Tenant, job_id: str) -> JobRecord:
    try:
        job = await svc.store.get_job(tenant.id, job_id)
    except NotFound:
        raise job_not_found(job_id) from None
    if job.fine_tuned_model is not None:
        # The worker stored the adapter from its own process: a SQLite store's change feed does not
        # reach this one, so a name cached as missing (asked for before the job succeeded) is dropped.
        await svc.resolver.on_change(ChangeEvent("adapter_created", job.tenant_id, job.fine_tuned_model))
    return job


@router.post("")
async def create_job(svc: ServicesDep, tenant: ManagedTenantDep, body: JobCreate) -> dict:
    training = await _file(svc, tenant, body.training_file, "training_file")
    validation = await _file(svc, tenant, body.validation_file, "validation_file") if body.validation_file else None
    spec = plan_job(
        body,
        spec=svc.spec,
        served={svc.spec.identity, svc.spec.name, svc.settings.model},
        training=training,
        validation=validation,
        max_tokens=svc.settings.max_adapter_tokens,
        max_steps=svc.settings.finetune_max_steps,
    )
    data = await svc.store.get_file_content(tenant.id, training.id)
    tokens = await asyncio.to_thread(lambda: count_tokens(_tokenizer(svc.model_path), parse(data)))
    events = [
        NewJobEvent(f"Created fine-tuning job: {spec['method']}, {spec['steps']} steps"),
        NewJobEvent(f"Validated training file: {training.lines} examples, {tokens} tokens"),
        NewJobEvent("Job queued"),
    ]
    new = NewJob(
        model=svc.spec.identity,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        spec=spec,
        training_tokens=tokens * spec["n_epochs"],
    )
    job = await svc.store.create_job(tenant.id, new, events)
    svc.metrics.finetune_created.inc()
    return job_object(job)


@router.get("")
async def list_jobs(
    svc: ServicesDep,
    tenant: ManagedTenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict:
    try:
        found = await svc.store.list_jobs(tenant.id, limit=limit, after=after)
    except NotFound:
        raise job_not_found(after or "") from None
    return page([job_object(j) for j in found.items], found.has_more)


@router.get("/{job_id}")
async def retrieve_job(svc: ServicesDep, tenant: ManagedTenantDep, job_id: str) -> dict:
    return job_object(await _job(svc, tenant, job_id))


@router.get("/{job_id}/events")
async def list_events(
    svc: ServicesDep,
    tenant: ManagedTenantDep,
    job_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: str | None = None,
) -> dict:
    try:
        found = await svc.store.list_job_events(tenant.id, job_id, limit=limit, after=after)
    except NotFound:
        raise job_not_found(job_id) from None
    return page([event_object(e) for e in found.items], found.has_more)


@router.get("/{job_id}/checkpoints")
async def list_checkpoints(
    svc: ServicesDep,
    tenant: ManagedTenantDep,
    job_id: str,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    after: str | None = None,
) -> dict:
    try:
        found = await svc.store.list_checkpoints(tenant.id, job_id, limit=limit, after=after)
    except NotFound:
        raise job_not_found(job_id) from None
    return page([checkpoint_object(c) for c in found.items], found.has_more)


@router.post("/{job_id}/cancel")
async def cancel_job(svc: ServicesDep, tenant: ManagedTenantDep, job_id: str) -> dict:
    try:
        return job_object(await svc.store.cancel_job(tenant.id, job_id))
    except NotFound:
        raise job_not_found(job_id) from None
