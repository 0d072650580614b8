"""`create_app(settings)`: the FastAPI app. The lifespan owns the engine and the store."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from adapters_store import open_store
from aligner_core.model_prep import prepare
from server.engine.config import AlignerEngineConfig
from server.engine.facade import AlignerEngine, EngineOptions
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.routes import adapters, ops, openai
from server.services import Services
from server.settings import Settings

OPEN_TENANT = "default"


def engine_options(settings: Settings, model_path: str, identity: str) -> EngineOptions:
    config = json.loads((Path(model_path) / "config.json").read_text())
    return EngineOptions(
        model_path=model_path,
        served_name=identity,
        architecture=(config.get("architectures") or ["LlamaForCausalLM"])[0],
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        kv_cache_gib=settings.kv_cache_gib,
        aligner=AlignerEngineConfig(max_slots=settings.max_resident_adapters, max_tokens=settings.max_adapter_tokens),
        extra_args=tuple(shlex.split(settings.engine_args)),
    )


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepared = await asyncio.to_thread(prepare, settings.model, cache_dir=settings.cache_dir)
        metrics = Metrics()
        store = open_store(settings.store)
        await store.open()
        engine = AlignerEngine(engine_options(settings, str(prepared.path), prepared.spec.identity), metrics)
        try:
            tenant = await store.ensure_tenant(OPEN_TENANT)
            await engine.start()
            app.state.services = Services(settings, prepared.spec, store, engine, metrics, tenant.id)
            yield
        finally:
            await engine.stop()
            await store.close()

    app = FastAPI(title="aligner-serve", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (openai, adapters, ops):
        app.include_router(module.router)
    return app
