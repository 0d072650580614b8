"""The API's namespaces, written once for both clients.

Each method builds a `Call` (or a multi-step generator) in the core and hands it to the client's
`_drive` / `_stream` / `_paginate`: with `Client` the result is the value, with `AsyncClient` an
awaitable of it (`list_all` gives an iterator / async iterator; `stream=True` a `Stream` / an awaitable
`AsyncStream`). The annotations are `Client`'s; `AsyncClient` types its namespaces `Any`, since each
of its calls returns an awaitable of the annotated value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aligner_client import _core as core
from aligner_client import models as m

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


class _Resource:
    def __init__(self, client: Any) -> None:
        self._c = client


class _AdapterWrites(_Resource):
    """Uploads and deletes, written once for `/v1/adapters` and (`_public`) the admin's `/admin/adapters`."""

    _public = False

    def upload(self, name: str, file: core.FileInput) -> m.Adapter:
        """Upload an aligner/v1 file (path, bytes or binary file object); an existing name gets version n+1."""
        return self._c._drive(core.upload_adapter(name, file, public=self._public))

    def upload_tensors(
        self,
        name: str,
        prefix: Any,
        gate: Any,
        *,
        start_layer: int = 2,
        gate_activation: str = "identity",
        base_model: str | None = None,
    ) -> m.Adapter:
        """Encode `prefix` [N, hidden] and `gate` [layers - start_layer, heads] as aligner/v1 and upload them.
        Without `base_model`, the server's base model id is asked for first."""
        return self._c._drive(
            core.upload_tensors(
                name,
                prefix,
                gate,
                start_layer=start_layer,
                gate_activation=gate_activation,
                base_model=base_model,
                public=self._public,
            )
        )

    def delete(self, name: str, version: int | None = None) -> m.AdapterDeleted:
        """Delete all versions, or one; requests already running finish first."""
        return self._c._drive(core.delete_adapter(name, version, public=self._public))


class Adapters(_AdapterWrites):
    """`/v1/adapters`: the calling tenant's adapters (plus, when reading, the public ones)."""

    def list(self, limit: int | None = None, after: str | None = None) -> m.AdapterList:
        """One page (newest version of each name); `next_after` is the cursor for the next."""
        return self._c._drive(core.list_adapters(limit, after))

    def list_all(self, page_size: int = 100) -> Iterator[m.Adapter]:
        """Every adapter, following the cursor page by page (async client: an async iterator)."""
        return self._c._paginate(core.Paginator(page_size))

    def get(self, name: str, version: int | None = None) -> m.Adapter:
        """The newest version, or `version` (also accepted as `name@n`)."""
        return self._c._drive(core.get_adapter(name, version))

    def versions(self, name: str) -> m.AdapterList:
        return self._c._drive(core.adapter_versions(name))


class Models(_Resource):
    def list(self) -> m.ModelList:
        """The base model first, then the adapters visible to the caller (`parent` = the base id)."""
        return self._c._drive(core.list_models())


class Chat(_Resource):
    def create(
        self,
        messages: list[dict[str, Any]] | str,
        *,
        adapter: str | None = None,
        adapters: Sequence[core.AdapterEntry] | None = None,
        model: str | None = None,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **extra: Any,
    ) -> Any:
        """`POST /v1/chat/completions`. `messages` may be a plain string (one user message); `adapter` is
        `"name"` or `"name@version"`; `adapters` a stack of them, each with a strength: entries `"name"`,
        `"name@2"`, `"name:0.5"` (scale 0.5), `{"name": ..., "scale": ...}`, `{"inline": base64, ...}` or
        `AdapterSpec`s; `adapter` and `adapters` together raise ValueError. Other OpenAI fields go in `extra`.
        Returns a `ChatCompletion`, or with `stream=True` a `Stream` of `ChatCompletionChunk` (async client:
        `AsyncStream`)."""
        call = core.chat(
            messages,
            adapter=adapter,
            adapters=adapters,
            model=model,
            stream=stream,
            max_tokens=max_tokens,
            temperature=temperature,
            extra=extra,
        )
        return self._c._stream(call) if stream else self._c._drive(call)


class Completions(_Resource):
    def create(
        self,
        prompt: str | list[Any],
        *,
        adapter: str | None = None,
        adapters: Sequence[core.AdapterEntry] | None = None,
        model: str | None = None,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **extra: Any,
    ) -> Any:
        """`POST /v1/completions`, like `Chat.create` with a prompt (`adapter` or `adapters` the same)."""
        call = core.completion(
            prompt,
            adapter=adapter,
            adapters=adapters,
            model=model,
            stream=stream,
            max_tokens=max_tokens,
            temperature=temperature,
            extra=extra,
        )
        return self._c._stream(call) if stream else self._c._drive(call)


class Tenants(_Resource):
    def create(self, name: str, **quotas: int | None) -> m.Tenant:
        """Quotas by name (`max_adapters`, `requests_per_minute`, ... see `Quotas`); those left out get the
        server's defaults."""
        return self._c._drive(core.create_tenant(name, **quotas))

    def list(self) -> m.TenantList:
        return self._c._drive(core.list_tenants())

    def set_quotas(self, tenant_id: str, **quotas: int | None) -> m.Tenant:
        """Change the quotas given; the others keep their values."""
        return self._c._drive(core.set_quotas(tenant_id, **quotas))


class Keys(_Resource):
    def create(self, tenant_id: str) -> m.ApiKey:
        """Issue a key; its secret is in `.key` of this answer only."""
        return self._c._drive(core.create_key(tenant_id))

    def list(self, tenant_id: str) -> m.ApiKeyList:
        return self._c._drive(core.list_keys(tenant_id))

    def revoke(self, key_id: str) -> m.ApiKey:
        return self._c._drive(core.revoke_key(key_id))


class PublicAdapters(_AdapterWrites):
    """`/admin/adapters`: adapters every tenant can list and use."""

    _public = True


class Admin(_Resource):
    """The admin API (multi-tenant servers); authenticated with the client's `admin_key`."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.tenants = Tenants(client)
        self.keys = Keys(client)
        self.adapters = PublicAdapters(client)


class Namespaces:
    """Mixed into both clients."""

    def _init_namespaces(self) -> None:
        self.adapters = Adapters(self)
        self.models = Models(self)
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.admin = Admin(self)

    def health(self) -> Any:
        """`GET /health`: `{"status": "ok", "model": ...}`; raises ServiceUnavailableError while starting."""
        return self._drive(core.Call("GET", "/health"))  # type: ignore[attr-defined]
