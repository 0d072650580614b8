"""Operations: health (engine and store, always open) and Prometheus metrics (a credential in multi-tenant mode)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import MetricsReaderDep, ServicesDep

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(svc: ServicesDep) -> JSONResponse:
    await svc.engine.check_health()  # else EngineNotReady: a 503
    return JSONResponse({"status": "ok", "model": svc.spec.identity})


@router.get("/metrics", dependencies=[MetricsReaderDep])
async def metrics(svc: ServicesDep) -> Response:
    await svc.metrics.refresh(svc.engine)  # what only the engine's workers count
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
