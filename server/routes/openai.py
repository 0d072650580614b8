"""OpenAI-compatible generation and model listing, with an optional `adapter` field."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ModelWrapValidatorHandler, model_validator

from adapters_store import Tenant
from server.deps import GenerationTenantDep, ServicesDep, TenantDep
from server.engine.vllm_glue import ChatCompletionRequest, CompletionRequest
from server.errors import APIError, bad_request_from_vllm, is_vllm_client_error
from server.inference import generate
from server.schemas import AdapterPublic, ModelCard, ModelList
from server.services import Services

router = APIRouter(prefix="/v1", tags=["openai"])

_STARTED = int(time.time())


def _malformed_is_invalid(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
    """vLLM's own request validators raise TypeError ("messages": null) or its VLLMValidationError on some
    malformed bodies; pydantic turns only ValueError into a validation error, so re-raise as one: a 400."""
    try:
        return handler(data)
    except (TypeError, AttributeError, KeyError, IndexError) as e:
        raise ValueError(f"malformed request: {e}") from None
    except Exception as e:
        if is_vllm_client_error(e):
            raise ValueError(str(e)) from None
        raise


class ChatRequest(ChatCompletionRequest):
    adapter: str | None = None  # "name" or "name@version"; absent: the base model

    malformed_is_invalid = model_validator(mode="wrap")(classmethod(_malformed_is_invalid))


class CompletionsRequest(CompletionRequest):
    adapter: str | None = None

    malformed_is_invalid = model_validator(mode="wrap")(classmethod(_malformed_is_invalid))


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    return await _generate(svc, tenant, body, raw, endpoint="chat")


@router.post("/completions")
async def completions(body: CompletionsRequest, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    return await _generate(svc, tenant, body, raw, endpoint="completions")


async def _generate(svc: Services, tenant: Tenant, body: ChatRequest | CompletionsRequest, raw: Request, *,
                    endpoint: str) -> Response:  # fmt: skip
    """vLLM's serving code reports some bad requests by raising (not by an ErrorResponse): those are 400s."""
    try:
        return await generate(svc, tenant, body, raw, endpoint=endpoint)
    except APIError:
        raise
    except Exception as exc:
        bad = bad_request_from_vllm(exc)
        if bad is None:
            raise
        raise bad from exc


@router.get("/models")
async def list_models(svc: ServicesDep, tenant: TenantDep) -> ModelList:
    base = svc.spec.identity
    cards = [ModelCard(id=base, created=_STARTED, owned_by="aligner-serve", root=base)]
    after = None
    while True:
        page = await svc.store.list_adapters(tenant.id, limit=1000, after=after)
        for r in page.items:
            cards.append(ModelCard(id=r.name, created=int(r.created_at.timestamp()), owned_by="public" if r.public else "tenant",
                                   root=base, parent=base, adapter=AdapterPublic.of(r)))  # fmt: skip
        if page.next_after is None:
            return ModelList(data=cards)
        after = page.next_after
