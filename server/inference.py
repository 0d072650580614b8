"""One generation request: pick the adapter, admit it against its tenant's fair share, run it in the engine,
answer it over HTTP.

What decides sharing is the engine's (`AlignerEngine.generate`): the routing key, the prefix-cache salt,
the model name. The API chooses what only it knows: the adapter the tenant may use, the salt's scope (the
tenant, or every tenant for the base model when `share_base_prefix_cache` is set) and the scheduling
priority from the tenant's load.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from adapters_store import Tenant
from server.deps import resolve_adapter
from server.engine.facade import EngineError, Generation
from server.errors import RateLimited, Unauthorized, error_event
from server.fair_share import Demand, Ticket
from server.services import Services
from server.stacking import request_stack, target

_background: set[asyncio.Task] = set()
REVOKED = "The API key of this request was revoked."


def demand_of(body: Any, endpoint: str, max_model_len: int, adapters: tuple[str, ...]) -> Demand:
    """What the request may occupy: n x prompts sequences, each charged an upper bound of its tokens.

    The prompt is charged its UTF-8 bytes (a byte-level BPE token is at least one byte; the JSON syntax
    around chat messages covers the template's few tokens), the completion its max_tokens (the model
    length when absent), each sequence at most the model length."""
    n = max(1, int(getattr(body, "n", None) or 1))  # the Responses API has no n
    out = (
        getattr(body, "max_completion_tokens", None)
        or getattr(body, "max_tokens", None)
        or getattr(body, "max_output_tokens", None)
        or max_model_len
    )
    if endpoint == "chat":
        prompts = [len(json.dumps([body.messages, body.tools], default=str).encode())]
    elif endpoint == "responses":
        prompts = [len(json.dumps([body.instructions, body.input, body.tools], default=str).encode())]
    else:
        p = body.prompt
        many = isinstance(p, list) and p and not isinstance(p[0], int)
        prompts = [len(x) if isinstance(x, list) else len(str(x).encode()) for x in (p if many else [p or ""])]
    tokens = sum(n * min(max_model_len, size + out) for size in prompts)
    return Demand(sequences=n * len(prompts), tokens=tokens, adapters=adapters)


async def generate(svc: Services, tenant: Tenant, body: Any, raw: Request, *, endpoint: str) -> Response:
    stack = await request_stack(svc, tenant, body)
    priority = svc.fair.priority(tenant.id) if svc.multi_tenant else 0  # the tenant's load before this request
    try:
        ticket = svc.fair.admit(
            tenant,
            demand_of(body, endpoint, svc.settings.max_model_len, stack.keys),
            api_key=getattr(raw.state, "api_key", None),
        )
    except RateLimited as e:
        svc.metrics.refused.labels(tenant.name, e.limit).inc()
        raise
    labels = (tenant.name, "adapter" if stack.uses else "base")
    svc.metrics.requests.labels(*labels, endpoint).inc()
    svc.metrics.stacked.labels(str(stack.named)).inc()
    shared = not stack.uses and svc.settings.share_base_prefix_cache
    try:
        gen = await _started(
            svc.engine.generate(
                endpoint,
                body,
                raw,
                adapter=stack.uses,
                priority=priority,
                salt_scope=None if shared else tenant.id,
                shown_model=getattr(body, "adapter", None) or body.model or None,  # the model the client named
            ),
            ticket,
        )
    except BaseException:
        ticket.release()
        raise
    if gen.streaming:
        return StreamingResponse(_stream(svc, gen, ticket, labels), media_type="text/event-stream")
    ticket.release()
    usage = gen.usage()
    if usage is not None:
        svc.metrics.usage(*labels, *usage)
    return JSONResponse(gen.response)


async def tokenization(svc: Services, tenant: Tenant, body: Any, raw: Request, *, endpoint: str) -> Response:
    """/tokenize and /detokenize: the base model's tokenizer (an adapter changes no token), once the adapter
    the body names is one the tenant may use (else the same 404 as generation)."""
    ref, via = target(svc, getattr(body, "adapter", None), body.model)
    if ref is not None:
        await resolve_adapter(svc, tenant, ref, via=via)
    return JSONResponse(await svc.engine.tokenization(endpoint, body, raw))


async def _started(starting: Awaitable[Generation], ticket: Ticket) -> Generation:
    """The engine's generation, unless the request's key was revoked meanwhile: the ticket cancelled this task,
    vLLM aborted the request (and may have answered the cancellation with its own error)."""
    try:
        gen = await starting
    except (asyncio.CancelledError, Exception):
        if not ticket.revoked:
            raise
        raise _revoked() from None
    if ticket.revoked:
        err = _revoked()
        await gen.close()
        raise err
    return gen


def _revoked() -> Unauthorized:
    """The 401 of a request whose key was revoked; the ticket's cancellation of this task is spent."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()
    return Unauthorized(REVOKED)


async def _stream(svc: Services, gen: Generation, ticket: Ticket, labels: tuple[str, str]) -> AsyncIterator[str]:
    ticket.follow()  # a revocation now cancels this task
    try:
        async for chunk in gen.events():
            yield chunk
    except asyncio.CancelledError:
        # The key was revoked while we waited for the engine: vLLM aborted the request when its generator
        # was cancelled; an error event ends the stream.
        if not ticket.revoked:
            raise
        yield error_event(_revoked())
        yield "data: [DONE]\n\n"
    except EngineError as exc:  # vLLM's error event mid-stream
        yield error_event(exc)
        yield "data: [DONE]\n\n"
    finally:
        # Runs on normal end, revocation and client disconnect: count what was streamed, and release
        # outside the cancelled scope.
        svc.metrics.usage(*labels, *(gen.usage() or (0, 0)))
        ticket.release()
        task = asyncio.get_running_loop().create_task(gen.close())
        _background.add(task)
        task.add_done_callback(_background.discard)
