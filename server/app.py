"""`create_app(settings)`: the FastAPI app. The lifespan owns the engine and the store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI

from adapters_store import NewAdapter, NotFound, Store, Tenant, open_store
from aligner_core.adapter_format import check_fits, encode, load
from aligner_core.model_prep import prepare
from aligner_core.model_spec import ModelSpec
from server.engine.config import AlignerEngineConfig
from server.engine.facade import AlignerEngine, EngineOptions
from server.errors import install_error_handlers
from server.fair_share import default_quotas, watch_revocations
from server.finetune_worker import WorkerProcesses
from server.limits import BodyLimitMiddleware
from server.metrics import Metrics
from server.resolver import AdapterResolver
from server.routes import adapters, admin, files, fine_tuning, openai, ops, tokens, ui
from server.services import Services
from server.settings import Settings, chat_template, fit_max_model_len, tool_call_parser

OPEN_TENANT = "default"
log = logging.getLogger("aligner.server")


def engine_options(settings: Settings, model_path: str, identity: str) -> EngineOptions:
    """The engine's options from the settings (`aligner serve` has already merged its flags and
    ALIGNER_ENGINE_ARGS into them); max_model_len fitted to the model (SettingError if it cannot be)."""
    config_path = Path(model_path) / "config.json"
    config = json.loads(config_path.read_text())
    return EngineOptions(
        model_path=model_path,
        served_name=identity,
        architecture=(config.get("architectures") or ["LlamaForCausalLM"])[0],
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        max_model_len=fit_max_model_len(settings, config, str(config_path)),
        max_num_seqs=settings.max_num_seqs,
        kv_cache_gib=settings.kv_cache_gib,
        aligner=AlignerEngineConfig(
            max_slots=settings.max_resident_adapters,
            max_tokens=settings.max_adapter_tokens,
            cold_slots=settings.cold_resident_adapters,
            max_stack=settings.max_adapters_per_request,
            path=settings.kernel_path,
        ),
        extra_args=tuple(shlex.split(settings.engine_args)),
        isolate_worker_cores=settings.isolate_worker_cores,
        priority_scheduling=settings.fair_priority,
        tool_call_parser=tool_call_parser(settings),
        chat_template=chat_template(settings),
        tool_strict_level=settings.tool_strict_level,
    )


async def seed_public_adapters(
    store: Store, owner: Tenant, folder: Path, spec: ModelSpec, max_tokens: int
) -> list[str]:
    """Publish every adapter file in `folder` (name = file stem) unless its newest version is identical."""
    seeded = []
    for path in sorted(folder.glob("*.safetensors")):
        adapter = load(path)
        check_fits(adapter, spec, max_tokens=max_tokens)
        try:
            if (await store.get_adapter(owner.id, path.stem)).sha256 == adapter.sha256():
                continue
        except NotFound:
            pass
        new = NewAdapter(
            name=path.stem,
            blob=encode(adapter),
            tokens=adapter.tokens,
            params=adapter.params,
            sha256=adapter.sha256(),
            base_model=adapter.base_model,
        )
        await store.create_adapter(owner.id, new)
        seeded.append(path.stem)
    return seeded


async def exit_when_engine_dies(engine: AlignerEngine, interval_s: float = 0.5) -> None:
    """A dead engine core must not leave a process that accepts connections and hangs: exit non-zero so the
    supervisor (systemd, Docker, Kubernetes) restarts it. /health already fails from the first moment."""
    while True:
        await asyncio.sleep(interval_s)
        if engine.client is not None and engine.client.errored:
            log.critical(
                "the engine core died (%s); exiting so the supervisor restarts the server", engine.client.dead_error
            )
            logging.shutdown()
            os._exit(3)


async def open_mode_tenant(store: Store, settings: Settings) -> Tenant:
    """The one tenant of open mode; its fine-tuning limits that are unset get the server's defaults
    (ALIGNER_TENANT_MAX_FILES and the rest), so that open mode has bounded training too."""
    tenant = await store.ensure_tenant(OPEN_TENANT)
    defaults = default_quotas(settings)
    fill = {
        k: getattr(defaults, k)
        for k in ("max_files", "max_file_bytes", "max_queued_jobs", "max_training_tokens")
        if getattr(tenant.quotas, k) is None
    }
    return await store.set_quotas(tenant.id, replace(tenant.quotas, **fill)) if fill else tenant


def key_is_valid(store: Store):
    async def valid(key_hash: str) -> bool:
        try:
            await store.find_api_key(key_hash)
        except NotFound:
            return False
        return True

    return valid


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepared = await asyncio.to_thread(prepare, settings.model, cache_dir=settings.cache_dir)
        metrics = Metrics()
        store = open_store(settings.store)
        await store.open()
        engine = AlignerEngine(engine_options(settings, str(prepared.path), prepared.spec.identity), metrics)
        resolver = AdapterResolver(store, on_deleted=engine.retire)
        trainers = WorkerProcesses(settings)
        try:
            open_tenant = None if settings.admin_key else await open_mode_tenant(store, settings)
            public = await store.ensure_public_tenant()
            if settings.seed_adapters:
                seeded = await seed_public_adapters(
                    store, public, settings.seed_adapters, prepared.spec, settings.max_adapter_tokens
                )
                log.info("published example adapters: %s", ", ".join(seeded) or "(already there)")
            await store.subscribe(resolver.on_change)
            await engine.start()
            app.state.services = Services(
                settings,
                prepared.spec,
                store,
                engine,
                metrics,
                resolver,
                open_tenant,
                public,
                model_path=str(prepared.path),
            )
            await trainers.start()
            services = app.state.services
            watchers = [
                asyncio.create_task(exit_when_engine_dies(engine)),
                asyncio.create_task(watch_revocations(services.fair, key_is_valid(store))),
            ]
            yield
            for task in watchers:
                task.cancel()
        finally:
            await trainers.stop()
            await engine.stop()
            await store.close()

    app = FastAPI(title="aligner-serve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=max(settings.max_request_bytes, settings.max_adapter_bytes + (64 << 10)),
        uploads={"/v1/files": (settings.max_file_bytes + (64 << 10), "ALIGNER_MAX_FILE_BYTES")},
    )
    for module in (openai, tokens, adapters, files, fine_tuning, admin, ops, ui):
        app.include_router(module.router)
    return app
