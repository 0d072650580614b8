"""The adapters a generation request runs on: `adapter` (or an adapter named as `model`), or `adapters`, a
stack of adapters each at a scale, by name or inline.

    "adapters": [{"name": "pirate", "scale": 0.5}, {"name": "json"}, {"inline": "<base64>", "scale": 2}]

The engine adds each adapter's term, with its own softmax, times its scale (`AdapterUse.scale`): scale 0
leaves the entry out (exactly the base model's term), a stack of one at scale 1 is exactly the plain adapter.
Named entries are resolved as `adapter` is (another tenant's answers like a missing one). An inline entry is
validated exactly like an upload, never stored, and held by the engine under a key of its content and the
tenant (`inline_key`), so a repeat is cheap and no other tenant's request shares it. The prefix-cache salt
covers the whole composition: the engine salts with the stack's routing key (each entry's key and scale).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from adapters_store import Tenant
from aligner_core.adapter_format import check_fits, decode, encode
from aligner_core.errors import AdapterFormatError, AdapterMismatch
from server.deps import resolve_adapter
from server.engine.facade import AdapterUse
from server.errors import AdapterNotFound, InvalidAdapter, InvalidRequest, PayloadTooLarge
from server.schemas import AdapterRef
from server.services import Services


@dataclass(frozen=True)
class Stack:
    """What a request runs on: the engine's adapters in lane order (scale-0 entries left out; none: the base
    model) and how many entries the request named (the metrics count requests by it)."""

    uses: list[AdapterUse]
    named: int

    @property
    def keys(self) -> tuple[str, ...]:
        """The engine keys the request holds while it runs (each a hot slot: the tenant's adapter limit)."""
        return tuple(u.engine_key for u in self.uses)


BASE = Stack([], 0)


async def request_stack(svc: Services, tenant: Tenant, body: Any) -> Stack:
    """The stack `body` asks for, every entry checked and resolved for `tenant`; errors name the entry."""
    entries = getattr(body, "adapters", None)
    adapter = getattr(body, "adapter", None)
    if entries is None:
        ref, via = target(svc, adapter, body.model)
        if ref is None:
            return BASE
        record = await resolve_adapter(svc, tenant, ref, via=via)
        return Stack([AdapterUse(record.sha256, _blob(svc, record.id))], 1)
    if adapter:
        raise InvalidRequest("give `adapter` or `adapters`, not both", param="adapters")
    if body.model not in _base_names(svc):
        raise InvalidRequest(
            f"model {body.model!r} with `adapters`: name the base model in `model` (or omit it) and every adapter "
            "in `adapters`",
            param="model",
        )
    s = svc.settings
    if len(entries) > s.max_adapters_per_request:
        raise InvalidRequest(
            f"{len(entries)} adapters in one request; the limit is {s.max_adapters_per_request} "
            "(ALIGNER_MAX_ADAPTERS_PER_REQUEST)",
            param="adapters",
        )
    for i, e in enumerate(entries):  # every entry's form first: no store read for a request refused anyway
        if (e.name is None) == (e.inline is None):
            raise InvalidRequest(f"adapters[{i}] needs exactly one of `name` or `inline`", param=f"adapters[{i}]")
        if not (math.isfinite(e.scale) and s.adapter_scale_min <= e.scale <= s.adapter_scale_max):
            raise InvalidRequest(
                f"adapters[{i}].scale is {e.scale}; it must be finite, from {s.adapter_scale_min} to "
                f"{s.adapter_scale_max} (ALIGNER_ADAPTER_SCALE_MIN / ALIGNER_ADAPTER_SCALE_MAX)",
                param=f"adapters[{i}].scale",
            )
    refs = [
        AdapterRef.parse(e.name, param=f"adapters[{i}].name") if e.name is not None else None
        for i, e in enumerate(entries)
    ]
    uses: list[AdapterUse] = []
    for i, (e, ref) in enumerate(zip(entries, refs)):
        if ref is not None:
            try:
                record = await resolve_adapter(svc, tenant, ref)
            except AdapterNotFound as missing:  # the same 404 as `adapter`, naming the entry
                missing.param = f"adapters[{i}].name"
                raise
            use = AdapterUse(record.sha256, _blob(svc, record.id), e.scale)
        else:
            use = _inline(svc, tenant, e.inline, e.scale, param=f"adapters[{i}].inline")
        if e.scale != 0:
            uses.append(use)
    return Stack(uses, len(entries))


def _base_names(svc: Services) -> tuple[str | None, ...]:
    return (None, "", svc.spec.identity, svc.spec.name)


def target(svc: Services, adapter: str | None, model: str | None) -> tuple[AdapterRef | None, str]:
    """Which adapter a plain request names (via `adapter`, or via `model` for tools that only set a model)."""
    base_names = _base_names(svc)
    if adapter:
        if model not in base_names and model != adapter:
            raise InvalidRequest(
                f"model {model!r} and adapter {adapter!r} disagree; name the base model or omit it", param="model"
            )
        return AdapterRef.parse(adapter, param="adapter"), "adapter"
    if model is None or model in base_names:
        return None, "model"
    return AdapterRef.parse(model, param="model"), "model"


def _blob(svc: Services, record_id: str) -> Callable[[], Awaitable[bytes]]:
    """How the engine reads a stored adapter's bytes, if it is not resident."""
    return lambda: svc.store.get_blob(record_id)


def inline_key(tenant_id: str, sha256: str) -> str:
    """The engine key of a tenant's inline adapter: its content and the tenant, so no other tenant's request
    (which could learn from its load time that someone sent these bytes) ever shares its entry."""
    return hashlib.sha256(f"inline\0{tenant_id}\0{sha256}".encode()).hexdigest()


def _inline(svc: Services, tenant: Tenant, text: str | None, scale: float, *, param: str) -> AdapterUse:
    """An inline entry, validated exactly like an upload (`routes.adapters.store_upload`)."""
    limit = svc.settings.max_adapter_bytes
    assert text is not None
    if len(text) > 4 * (limit // 3 + 1) + 4:
        raise PayloadTooLarge(f"{param} exceeds the adapter limit of {limit} bytes", param=param)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} is not base64 (of an aligner/v1 safetensors file)", param=param) from None
    if len(data) > limit:
        raise PayloadTooLarge(f"{param} exceeds the adapter limit of {limit} bytes", param=param)
    try:
        adapter = decode(data, max_bytes=limit)
        check_fits(adapter, svc.spec, max_tokens=svc.settings.max_adapter_tokens)
    except AdapterFormatError as e:  # the upload's 422, naming the entry
        code = "base_model_mismatch" if isinstance(e, AdapterMismatch) else None
        raise InvalidAdapter(f"{param}: {e.message}", param=param, code=code) from None
    blob = encode(adapter)

    async def load() -> bytes:
        return blob

    return AdapterUse(inline_key(tenant.id, adapter.sha256()), load, scale)
