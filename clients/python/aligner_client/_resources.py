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
    from collections.abc import Callable, Iterator, Mapping, Sequence


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


class Files(_Resource):
    """`/v1/files`: the calling tenant's training files (OpenAI's Files API, purpose "fine-tune")."""

    def create(self, file: core.FileInput, purpose: str = "fine-tune") -> m.FileObject:
        """Upload JSONL (path, bytes or binary file object): chat examples (`{"messages": [...]}`) to train with
        method "supervised", or preference pairs (`{"input", "preferred_output", "non_preferred_output"}`)
        for "dpo". A bad line is refused (400) with its number."""
        return self._c._drive(core.upload_file(file, purpose))

    def list(self, limit: int | None = None, after: str | None = None, purpose: str | None = None) -> m.FileList:
        """One page, newest first; `after=page.last_id` gives the next while `has_more`."""
        return self._c._drive(core.list_files(limit, after, purpose))

    def retrieve(self, file_id: str) -> m.FileObject:
        return self._c._drive(core.get_file(file_id))

    def content(self, file_id: str) -> bytes:
        """The file's bytes, as uploaded."""
        return self._c._drive(core.file_content(file_id))

    def delete(self, file_id: str) -> m.FileDeleted:
        return self._c._drive(core.delete_file(file_id))


class Jobs(_Resource):
    """`/v1/fine_tuning/jobs`: train an adapter on an uploaded file; a succeeded job names it in
    `fine_tuned_model`, usable at once as `model=` or `adapter=`."""

    def create(
        self,
        training_file: str,
        *,
        model: str | None = None,
        method: str | Mapping[str, Any] = "supervised",
        n_epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate_multiplier: float | None = None,
        beta: float | None = None,
        validation_file: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        aligner: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> m.FineTuningJob:
        """`POST /v1/fine_tuning/jobs`. `method` "supervised" or "dpo", with the hyperparameters given (None:
        the server's "auto"; `beta` is dpo's), or OpenAI's whole `method` object. `model` defaults to the
        server's base model (asked for first). `aligner`: the adapter's shape, `{"tokens": N, "start_layer": L,
        "gate_activation": "identity" | "tanh"}`. `suffix` goes into the adapter's name. Other fields
        (`metadata`, ...) in `extra`."""
        hp = {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": learning_rate_multiplier}
        return self._c._drive(
            core.create_job(
                training_file,
                model=model,
                method=method,
                hyperparameters=hp | {"beta": beta},
                validation_file=validation_file,
                suffix=suffix,
                seed=seed,
                aligner=aligner,
                extra=extra,
            )
        )

    def list(self, limit: int | None = None, after: str | None = None) -> m.FineTuningJobList:
        """One page, newest first; `after=page.last_id` gives the next while `has_more`."""
        return self._c._drive(core.list_jobs(limit, after))

    def retrieve(self, job_id: str) -> m.FineTuningJob:
        return self._c._drive(core.get_job(job_id))

    def list_events(self, job_id: str, limit: int | None = None, after: str | None = None) -> m.FineTuningJobEventList:
        """One page of the job's log, newest first; `type == "metrics"` events hold each step's losses in `data`."""
        return self._c._drive(core.list_events(job_id, limit, after))

    def checkpoints(
        self, job_id: str, limit: int | None = None, after: str | None = None
    ) -> m.FineTuningJobCheckpointList:
        return self._c._drive(core.list_checkpoints(job_id, limit, after))

    def cancel(self, job_id: str) -> m.FineTuningJob:
        """Cancel a queued or running job (a running one stops at its next step); a finished one is 409."""
        return self._c._drive(core.cancel_job(job_id))

    def wait(
        self,
        job_id: str,
        poll_s: float = 2.0,
        timeout: float | None = 3600.0,
        *,
        on_event: Callable[[m.FineTuningJobEvent], Any] | None = None,
    ) -> m.FineTuningJob:
        """Poll every `poll_s` seconds until the job is succeeded, failed or cancelled, and return it (a failed
        job is returned, not raised: see `.error`). `on_event(event)` is called for each event, oldest first, as
        they appear. WaitTimeoutError after `timeout` seconds (None: no limit); the job runs on."""
        return self._c._drive(core.wait_job(job_id, poll_s=poll_s, timeout=timeout, on_event=on_event))


class FineTuning(_Resource):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.jobs = Jobs(client)


class Namespaces:
    """Mixed into both clients."""

    def _init_namespaces(self) -> None:
        self.adapters = Adapters(self)
        self.models = Models(self)
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.files = Files(self)
        self.fine_tuning = FineTuning(self)
        self.admin = Admin(self)

    def health(self) -> Any:
        """`GET /health`: `{"status": "ok", "model": ...}`; raises ServiceUnavailableError while starting."""
        return self._drive(core.Call("GET", "/health"))  # type: ignore[attr-defined]
