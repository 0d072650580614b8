"""One generation request: pick the adapter, admit it against its tenant's fair share, pin the adapter in the
engine, hand the request to vLLM's serving code.

The server owns every value that decides sharing: a client-sent `vllm_xargs["aligner"]` is dropped, the
prefix-cache salt is always made here from the tenant, the adapter's content hash and (only to split
further) the client's own salt, and the scheduling priority comes from the tenant's load.
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
from server.errors import APIError, InvalidRequest, ModelNotFound, RateLimited, Unauthorized
from server.fair_share import Demand, Ticket
from server.schemas import AdapterRef
from server.services import Services

_background: set[asyncio.Task] = set()
REVOKED = "The API key of this request was revoked."


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


def demand_of(body: Any, endpoint: str, max_model_len: int, adapter: str | None) -> Demand:
    """What the request may occupy: n x prompts sequences, each charged an upper bound of its tokens.

    The prompt is charged its UTF-8 bytes (a byte-level BPE token is at least one byte; the JSON syntax
    around chat messages covers the template's few tokens), the completion its max_tokens (the model
    length when absent), each sequence at most the model length."""
    n = max(1, int(body.n or 1))
    out = getattr(body, "max_completion_tokens", None) or body.max_tokens or max_model_len
    if endpoint == "chat":
        prompts = [len(json.dumps([body.messages, body.tools], default=str).encode())]
    else:
        p = body.prompt
        many = isinstance(p, list) and p and not isinstance(p[0], int)
        prompts = [len(x) if isinstance(x, list) else len(str(x).encode()) for x in (p if many else [p or ""])]
    tokens = sum(n * min(max_model_len, size + out) for size in prompts)
    return Demand(sequences=n * len(prompts), tokens=tokens, adapter=adapter)


async def generate(svc: Services, tenant: Tenant, body: Any, raw: Request, *, endpoint: str) -> Response:
    ref, via = _target(svc, getattr(body, "adapter", None), body.model)
    record = None
    if ref is not None:
        try:
            record = await resolve_adapter(svc, tenant, ref)
        except APIError:
            if via == "model":
                raise ModelNotFound(f"The model '{ref}' does not exist or you do not have access to it.", param="model") from None
            raise
    key = record.sha256 if record else None
    priority = svc.fair.priority(tenant.id)  # the tenant's load before this request
    try:
        ticket = svc.fair.admit(tenant, demand_of(body, endpoint, svc.settings.max_model_len, key),
                                api_key=getattr(raw.state, "api_key", None))  # fmt: skip
    except RateLimited as e:
        svc.metrics.refused.labels(tenant.name, e.limit).inc()
        raise
    lease: Lease | None = None
    try:
        if record is not None:
            lease = await svc.engine.lease(record.sha256, lambda: svc.store.get_blob(record.id))
        return await _submit(svc, tenant, body, raw, endpoint, ticket, lease, priority)
    except BaseException:
        ticket.release()
        await _release(lease)
        raise


async def _submit(svc: Services, tenant: Tenant, body: Any, raw: Request, endpoint: str, ticket: Ticket,
                  lease: Lease | None, priority: int) -> Response:  # fmt: skip
    kind = "adapter" if lease else "base"
    svc.metrics.requests.labels(tenant.name, kind, endpoint).inc()
    xargs = {k: v for k, v in (body.vllm_xargs or {}).items() if k != EXTRA_ARGS_KEY}
    if lease:
        xargs[EXTRA_ARGS_KEY] = lease.key
    body.vllm_xargs = xargs or None
    shared = lease is None and svc.settings.share_base_prefix_cache
    body.cache_salt = cache_salt(None if shared else tenant.id, lease.key if lease else None, body.cache_salt)
    body.priority = priority if svc.settings.fair_priority and svc.multi_tenant else 0  # one tenant: arrival order
    body.model = svc.spec.identity
    want = _usage_wanted(body)
    if body.stream:  # usage on every chunk, so what was streamed is counted even if the client leaves early
        body.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=True)
    serving = svc.engine.serving
    handler = serving.openai_serving_chat.create_chat_completion if endpoint == "chat" else serving.openai_serving_completion.create_completion
    try:
        result = await handler(body, raw)
        # A stream's first event: vLLM reports some refusals (a constraint its grammar compiler refuses)
        # only there, as an error event after a 200; it comes with the first token.
        first = await anext(result, None) if isinstance(result, AsyncIterator) else None
    except asyncio.CancelledError:
        if not ticket.revoked:
            raise
        result = first = None
    if ticket.revoked:  # vLLM aborted the request (it may answer the cancellation with its own error)
        if asyncio.current_task().cancelling():
            asyncio.current_task().uncancel()
        raise Unauthorized(REVOKED)
    if isinstance(result, ErrorResponse):
        err = APIError(result.error.message, param=result.error.param)
        err.status, err.type, err.code = result.error.code, result.error.type, None
        raise err
    labels = (tenant.name, kind)
    if not isinstance(result, AsyncIterator):
        ticket.release()
        await _release(lease)
        if result.usage is not None:
            svc.metrics.usage(*labels, result.usage.prompt_tokens, result.usage.completion_tokens or 0)
        return JSONResponse(result.model_dump())
    refused = _refusal(first)
    if refused is not None:
        await result.aclose()
        raise refused
    meter = _Meter(max(1, int(body.n or 1)))
    chunks = _after(first, result)
    return StreamingResponse(_stream(svc, chunks, ticket, lease, labels, want, meter), media_type="text/event-stream")


def _refusal(first: str | None) -> InvalidRequest | None:
    """The 400 for a stream whose first event is vLLM's error about the request itself, else None."""
    if first is None or not first.startswith('data: {"error"'):
        return None
    error = json.loads(first[len("data: ") :]).get("error") or {}
    if error.get("code") != 400:
        return None
    return InvalidRequest(str(error.get("message"))[:2000], param=error.get("param"))


async def _after(first: str | None, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


def _usage_wanted(body: Any) -> str:
    """What the client asked of usage in a stream: "none", "final" or "continuous"."""
    opts = body.stream_options
    if not (opts and opts.include_usage):
        return "none"
    return "continuous" if opts.continuous_usage_stats else "final"


class _Meter:
    """Usage seen so far in a stream with continuous usage: per choice its completion tokens, per prompt
    its prompt tokens (choice index = prompt index x n + i)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}
        self.final: tuple[int, int] | None = None

    def see(self, event: dict) -> None:
        usage = event.get("usage")
        if not usage:
            return
        choices = event.get("choices")
        if not choices:
            self.final = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            return
        for c in choices:
            i = int(c.get("index", 0))
            self.prompt[i // self.n] = usage.get("prompt_tokens", 0)
            self.completion[i] = max(self.completion.get(i, 0), usage.get("completion_tokens", 0))

    def totals(self) -> tuple[int, int]:
        return self.final or (sum(self.prompt.values()), sum(self.completion.values()))


async def _stream(svc: Services, chunks: AsyncIterator[str], ticket: Ticket, lease: Lease | None,
                  labels: tuple[str, str], want: str, meter: _Meter) -> AsyncIterator[str]:  # fmt: skip
    ticket.follow()  # a revocation now cancels this task
    try:
        async for chunk in chunks:
            if not chunk.startswith("data: {") or '"usage"' not in chunk:
                yield chunk
                continue
            event = json.loads(chunk[len("data: ") :])
            meter.see(event)
            if want == "continuous":
                yield chunk
            elif not event.get("choices"):  # the final usage chunk
                if want == "final":
                    yield chunk
            else:
                event.pop("usage", None)
                yield "data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n\n"
    except asyncio.CancelledError:
        # The key was revoked while we waited for the engine: vLLM aborted the request when its generator
        # was cancelled; an error event ends the stream.
        if not ticket.revoked:
            raise
        asyncio.current_task().uncancel()
        yield "data: " + json.dumps(Unauthorized(REVOKED).body()) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Runs on normal end, revocation and client disconnect: count what was streamed, and release
        # outside the cancelled scope.
        svc.metrics.usage(*labels, *meter.totals())
        ticket.release()
        task = asyncio.get_running_loop().create_task(_finish(chunks, lease))
        _background.add(task)
        task.add_done_callback(_background.discard)


async def _finish(chunks: AsyncIterator[str], lease: Lease | None) -> None:
    """Close vLLM's stream (which aborts the request if it is still running) and release the lease."""
    try:
        await chunks.aclose()
    finally:
        await _release(lease)


async def _release(lease: Lease | None) -> None:
    if lease is not None:
        await lease.release()
