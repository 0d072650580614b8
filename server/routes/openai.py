"""OpenAI-compatible generation and model listing, with an optional `adapter` field."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.deps import GenerationTenantDep, ServicesDep, TenantDep
from server.engine.vllm_glue import ChatCompletionRequest, CompletionRequest
from server.inference import generate
from server.schemas import AdapterPublic, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])

_STARTED = int(time.time())


class ChatRequest(ChatCompletionRequest):
    adapter: str | None = None  # "name" or "name@version"; absent: the base model


class CompletionsRequest(CompletionRequest):
    adapter: str | None = None


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    return await generate(svc, tenant, body, raw, endpoint="chat")


@router.post("/completions")
async def completions(body: CompletionsRequest, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    return await generate(svc, tenant, body, raw, endpoint="completions")


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
