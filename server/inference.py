"""One generation request: pick the adapter, pin it in the engine, hand the request to vLLM's serving code.

The tenant's request never chooses engine internals: a client-sent `vllm_xargs["aligner"]` is dropped,
and the prefix-cache salt always carries the adapter's content hash.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters_store import Tenant
from server.deps import resolve_adapter
from server.engine.facade import Lease, cache_salt
from server.engine.routing_v1 import EXTRA_ARGS_KEY
from server.engine.vllm_glue import ErrorResponse, StreamOptions
from server.errors import APIError, InvalidRequest, ModelNotFound, error_response
from server.schemas import AdapterRef
from server.services import Services

_background: set[asyncio.Task] = set()


def _target(svc: Services, adapter: str | None, model: str | None) -> tuple[AdapterRef | None, str]:
    """Which adapter the request names (via `adapter`, or via `model` for tools that only set a model)."""
    base_names = (None, "", svc.spec.identity, svc.spec.name)
    if adapter:
        if model not in base_names and model != adapter:
            raise InvalidRequest(f"model {model!r} and adapter {adapter!r} disagree; name the base model or omit it", param="model")
        return AdapterRef.parse(adapter, param="adapter"), "adapter"
    if model in base_names:
        return None, "model"
    return AdapterRef.parse(model, param="model"), "model"


async def generate(svc: Services, tenant: Tenant, body: Any, raw: Request, *, endpoint: str) -> Response:
    ref, via = _target(svc, getattr(body, "adapter", None), body.model)
    lease: Lease | None = None
    if ref is not None:
        try:
            record = await resolve_adapter(svc, tenant, ref)
        except APIError:
            if via == "model":
                raise ModelNotFound(f"The model '{ref}' does not exist or you do not have access to it.", param="model") from None
            raise
        lease = await svc.engine.lease(record.sha256, lambda: svc.store.get_blob(record.id))
    kind = "adapter" if lease else "base"
    svc.metrics.requests.labels(tenant.name, kind, endpoint).inc()
    xargs = {k: v for k, v in (body.vllm_xargs or {}).items() if k != EXTRA_ARGS_KEY}
    if lease:
        xargs[EXTRA_ARGS_KEY] = lease.key
        body.cache_salt = cache_salt(lease.key, body.cache_salt)
    body.vllm_xargs = xargs or None
    body.model = svc.spec.identity
    want_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream and not want_usage:  # ask for usage to count tokens; the extra chunk is dropped below
        body.stream_options = StreamOptions(include_usage=True)
    try:
        serving = svc.engine.serving
        handler = serving.openai_serving_chat.create_chat_completion if endpoint == "chat" else serving.openai_serving_completion.create_completion
        result = await handler(body, raw)
    except BaseException:
        await _release(lease)
        raise
    if isinstance(result, ErrorResponse):
        await _release(lease)
        err = APIError(result.error.message, param=result.error.param)
        err.status, err.type, err.code = result.error.code, result.error.type, None
        return error_response(err)
    if not isinstance(result, AsyncIterator):
        await _release(lease)
        if result.usage is not None:
            svc.metrics.usage(tenant.name, kind, result.usage.prompt_tokens, result.usage.completion_tokens or 0)
        return JSONResponse(result.model_dump())
    labels = (tenant.name, kind)
    return StreamingResponse(_stream(svc, result, lease, labels, want_usage), media_type="text/event-stream")


async def _stream(svc: Services, chunks: AsyncIterator[str], lease: Lease | None, labels: tuple[str, str],
                  want_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    try:
        async for chunk in chunks:
            if '"usage"' in chunk and chunk.startswith("data: {"):
                event = json.loads(chunk[len("data: ") :])
                usage = event.get("usage")
                if usage and not event.get("choices"):
                    svc.metrics.usage(*labels, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                    if not want_usage:
                        continue
            yield chunk
    finally:
        # Runs on normal end and on client disconnect (cancellation): release outside the cancelled scope.
        if lease is not None:
            task = asyncio.get_running_loop().create_task(lease.release())
            _background.add(task)
            task.add_done_callback(_background.discard)


async def _release(lease: Lease | None) -> None:
    if lease is not None:
        await lease.release()



