"""Operations: health and version (always open) and Prometheus metrics (a credential in multi-tenant mode)."""

from __future__ import annotations

from importlib.metadata import version as installed_version

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import MetricsReaderDep, ServicesDep
from server.engine.vllm_glue import VLLM_VERSION

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(svc: ServicesDep) -> JSONResponse:
    await svc.engine.check_health()  # else EngineNotReady: a 503
    return JSONResponse({"status": "ok", "model": svc.spec.identity})


@router.get("/version")
async def version() -> JSONResponse:
    """vLLM's `/version` (the engine's version), and ours."""
    return JSONResponse({"version": VLLM_VERSION, "aligner_serve": installed_version("aligner-serve")})


@router.get("/metrics", dependencies=[MetricsReaderDep])
async def metrics(svc: ServicesDep) -> Response:
    await svc.metrics.refresh(svc.engine)  # what only the engine's workers count
    await svc.metrics.refresh_store(svc.store)  # the fine-tuning queue, shared by every replica
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
