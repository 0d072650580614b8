"""OpenAI-compatible generation and model listing, with an optional `adapter` field."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from adapters_store import AdapterRecord
from server.deps import GenerationTenantDep, ManagedTenantDep, ServicesDep, resolve_adapter
from server.engine.facade import constraint_field, output_constraint
from server.errors import InvalidRequest, ModelNotFound
from server.inference import generate
from server.requests import ChatRequest, CompletionsRequest, ResponsesBody
from server.schemas import AdapterPublic, AdapterRef, ModelCard, ModelList
from server.services import Services
from server.settings import tools_refusal

router = APIRouter(prefix="/v1", tags=["openai"])

_STARTED = int(time.time())


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    _check_tools(svc, body.tools, body.tool_choice)
    _check_json_schema(body)
    return await generate(svc, tenant, body, raw, endpoint="chat")


@router.post("/completions")
async def completions(
    body: CompletionsRequest, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep
) -> Response:
    _check_json_schema(body)
    return await generate(svc, tenant, body, raw, endpoint="completions")


@router.post("/responses")
async def responses(body: ResponsesBody, raw: Request, svc: ServicesDep, tenant: GenerationTenantDep) -> Response:
    """OpenAI's Responses API (vLLM's, without its response store: each response stands alone)."""
    if body.previous_response_id is not None:
        raise InvalidRequest(
            "previous_response_id is not supported: responses are not stored; send the conversation in `input`",
            param="previous_response_id",
        )
    _check_tools(svc, body.tools, body.tool_choice)
    return await generate(svc, tenant, body, raw, endpoint="responses")


def _check_tools(svc: Services, tools: list[Any] | None, tool_choice: Any) -> None:
    """`tools` on a server without tool calling: a 400 in this server's settings (vLLM's names its own flags)."""
    refusal = tools_refusal(svc.settings, tools, tool_choice)
    if refusal is not None:
        raise InvalidRequest(refusal, param="tool_choice")


# --- structured outputs: a JSON schema that admits no finite value ---


def _check_json_schema(body: ChatRequest | CompletionsRequest) -> None:
    """Refuse a JSON schema whose recursion has no base case ({"$ref": "#"}, a required property or a non-empty
    array of itself): the grammar compiler accepts it, then the engine either rejects the first token (a failed
    request) or never lets the output end. Every other check is the grammar compiler's."""
    param = constraint_field(body)
    constraint = output_constraint(body)
    schema = constraint.json if constraint is not None else None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            return  # vLLM reports it
    pointer = unsatisfiable_ref(schema) if isinstance(schema, dict) else None
    if pointer is not None:
        raise InvalidRequest(
            f"{param}: the JSON schema admits no finite value: the $ref at '{pointer}' can only be satisfied by "
            "a value that contains itself. Give the recursion a way out (an optional property, an anyOf branch, "
            "an array that may be empty).",
            param=param,
        )


_SCHEMA_KEYS = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_SCHEMA_LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _subschemas(node: dict, pointer: str) -> Iterator[tuple[Any, str]]:
    for key in _SCHEMA_KEYS:
        if isinstance(node.get(key), (dict, bool)):
            yield node[key], f"{pointer}/{_escape(key)}"
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(node.get(key), list):
            yield from ((v, f"{pointer}/{_escape(key)}/{i}") for i, v in enumerate(node[key]))
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(node.get(key), dict):
            yield from ((v, f"{pointer}/{_escape(key)}/{_escape(k)}") for k, v in node[key].items())


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def unsatisfiable_ref(schema: dict) -> str | None:
    """The pointer of a `$ref` that only a value containing itself satisfies, if the root schema needs one.

    Satisfiability as a least fixed point (Horn propagation, linear in the schema): a schema needs its `$ref`
    target, all of `allOf`, one of `anyOf` / `oneOf`, and, when its `type` is only "object" and/or "array",
    its required properties or its first `minItems` items. Everything else counts as satisfiable."""
    nodes: dict[Any, tuple[str, list[Any]]] = {}  # key -> ("all" | "any", the keys it needs)
    refs: list[str] = []  # schema pointers holding a $ref, in document order
    stack: list[tuple[Any, str]] = [(schema, "#")]
    while stack:
        node, pointer = stack.pop()
        if pointer in nodes:
            continue
        if not isinstance(node, dict):  # `false` too: unsatisfiable without recursion, the compiler's to report
            nodes[pointer] = ("all", [])
            continue
        needs: list[Any] = []
        ref = node.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            needs.append(unquote(ref))
            refs.append(pointer)
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key]:
                nodes[(pointer, key)] = ("any", [f"{pointer}/{key}/{i}" for i in range(len(node[key]))])
                needs.append((pointer, key))
        if isinstance(node.get("allOf"), list):
            needs += [f"{pointer}/allOf/{i}" for i in range(len(node["allOf"]))]
        types = node.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
        if types and types <= {"object", "array"}:
            nodes[(pointer, "type")] = ("any", [(pointer, t) for t in sorted(types)])
            nodes[(pointer, "object")] = ("all", _needed_properties(node, pointer))
            nodes[(pointer, "array")] = ("all", _needed_items(node, pointer))
            needs.append((pointer, "type"))
        nodes[pointer] = ("all", needs)
        stack += reversed(list(_subschemas(node, pointer)))
    parents: dict[Any, list[Any]] = {}
    missing: dict[Any, int] = {}
    ready = []
    for key, (kind, needs) in nodes.items():
        needs = [n for n in needs if n in nodes]  # a $ref to nothing we know: the compiler's to judge
        nodes[key] = (kind, needs)
        missing[key] = 1 if kind == "any" else len(needs)
        for n in needs:
            parents.setdefault(n, []).append(key)
        if kind == "all" and not needs:
            ready.append(key)
    satisfiable = set(ready)
    while ready:
        for parent in parents.get(ready.pop(), ()):
            missing[parent] -= 1
            if missing[parent] <= 0 and parent not in satisfiable:
                satisfiable.add(parent)
                ready.append(parent)
    return None if "#" in satisfiable else next((p for p in refs if p not in satisfiable), None)


def _needed_properties(node: dict, pointer: str) -> list[str]:
    """The property schemas every object of `node` must contain (its required ones)."""
    props, required = node.get("properties"), node.get("required")
    if not isinstance(props, dict) or not isinstance(required, list):
        return []
    return [f"{pointer}/properties/{_escape(name)}" for name in required if isinstance(name, str) and name in props]


def _needed_items(node: dict, pointer: str) -> list[str]:
    """The item schemas every array of `node` must contain (its first `minItems`)."""
    at_least = node.get("minItems")
    if not isinstance(at_least, int) or isinstance(at_least, bool) or at_least < 1:
        return []
    prefix_key = (
        "prefixItems" if isinstance(node.get("prefixItems"), list) else "items"
    )  # "items": [...] before 2020-12
    prefix = node[prefix_key] if isinstance(node.get(prefix_key), list) else []
    needed = [f"{pointer}/{prefix_key}/{i}" for i in range(min(at_least, len(prefix)))]
    if at_least > len(prefix) and isinstance(node.get("items"), (dict, bool)):
        needed.append(f"{pointer}/items")
    return needed


@router.get("/models")
async def list_models(svc: ServicesDep, tenant: ManagedTenantDep) -> ModelList:
    """The base model, then every adapter the tenant may use (its own and the public ones), by name."""
    cards = [_base_card(svc)]
    after = None
    while True:
        page = await svc.store.list_adapters(tenant.id, limit=1000, after=after)
        cards += [_adapter_card(svc, r) for r in page.items]
        if page.next_after is None:
            return ModelList(data=cards)
        after = page.next_after


@router.get("/models/{model:path}")
async def retrieve_model(model: str, svc: ServicesDep, tenant: ManagedTenantDep) -> ModelCard:
    """The base model, or an adapter the tenant may use (`name` or `name@version`); anything else, another
    tenant's adapter included, is the same 404 `model_not_found`."""
    if model in (svc.spec.identity, svc.spec.name):
        return _base_card(svc)
    try:
        ref = AdapterRef.parse(model, param="model")
    except InvalidRequest:  # no adapter can have that name
        raise ModelNotFound.named(model[:80]) from None
    return _adapter_card(svc, await resolve_adapter(svc, tenant, ref, via="model"), shown=model)


def _base_card(svc: Services) -> ModelCard:
    base = svc.spec.identity
    return ModelCard(id=base, created=_STARTED, owned_by="aligner-serve", root=base)


def _adapter_card(svc: Services, r: AdapterRecord, shown: str | None = None) -> ModelCard:
    base = svc.spec.identity
    return ModelCard(
        id=shown or r.name,
        created=int(r.created_at.timestamp()),
        owned_by="public" if r.public else "tenant",
        root=base,
        parent=base,
        adapter=AdapterPublic.of(r),
    )
