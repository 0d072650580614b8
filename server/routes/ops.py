"""Operations: health (engine and store) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import ServicesDep
from server.errors import ServiceUnavailable

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(svc: ServicesDep) -> JSONResponse:
    try:
        await svc.engine.check_health()
    except Exception as e:
        raise ServiceUnavailable(f"engine unhealthy: {e}", code="engine_not_ready") from e
    return JSONResponse({"status": "ok", "model": svc.spec.identity})


@router.get("/metrics")
async def metrics(svc: ServicesDep) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
