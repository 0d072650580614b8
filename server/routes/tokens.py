"""vLLM's `/tokenize` and `/detokenize`, behind the same tenancy as generation: `adapter` (or `model` naming
one) must be an adapter the tenant may use, and the answer is the base model's tokenizer's."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.deps import GenerationTenantDep, ServicesDep
from server.inference import tokenization
from server.requests import Detokenize, TokenizeChat, TokenizeCompletion

router = APIRouter(tags=["tokens"])


@router.post("/tokenize")
async def tokenize(
    body: TokenizeCompletion | TokenizeChat, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep
) -> Response:
    return await tokenization(svc, tenant, body, raw, endpoint="tokenize")


@router.post("/detokenize")
async def detokenize(body: Detokenize, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    return await tokenization(svc, tenant, body, raw, endpoint="detokenize")
