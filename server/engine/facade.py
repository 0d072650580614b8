"""The engine as the API sees it: start/stop, adapter residency, and vLLM's serving objects.

The frontend owns adapter lifetimes, because the worker never sees request ids: a request `lease`s its
adapter's key (pinning it and loading it if needed) before it is submitted and releases it when its last
token has been streamed. Unpinned keys are evicted least-recently-used when the slot table is full.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine import placement
from server.engine.config import AlignerEngineConfig
from server.engine.plugin import aligner_architecture


class EngineError(Exception):
    """Root of the facade's errors."""


class EngineBusy(EngineError):
    """Every adapter slot is pinned by running requests; retry shortly."""


class EngineNotReady(EngineError):
    """The engine has not started, has stopped, or died."""


@dataclass(frozen=True)
class EngineOptions:
    model_path: str
    served_name: str  # the base model's identity; requests must name it
    architecture: str = "LlamaForCausalLM"  # the base architecture from config.json
    dtype: str = "auto"
    enforce_eager: bool = False
    max_model_len: int = 2048
    max_num_seqs: int = 256
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE: whole GiB
    seed: int = 0
    aligner: AlignerEngineConfig = field(default_factory=AlignerEngineConfig)
    routing: str = "auto"  # "v1" (logits-processor tracker), "v2" (ModelState), "auto" by platform
    extra_args: tuple[str, ...] = ()  # any further `vllm serve` flags
    aligner_enabled: bool = True  # False: the stock engine, for baselines and equivalence tests
    isolate_worker_cores: bool = True  # CPU: keep the API process and engine core off the workers' cores
    priority_scheduling: bool = False  # vLLM's priority policy: each request's `priority` orders the queue

    def argv(self) -> list[str]:
        from server.engine.vllm_glue import json_flag

        argv = [
            "--model", self.model_path,
            "--served-model-name", self.served_name,
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--seed", str(self.seed),
            "--disable-uvicorn-access-log",
        ]  # fmt: skip
        if self.aligner_enabled:
            argv += [
                "--hf-overrides", json_flag({"architectures": [aligner_architecture(self.architecture)]}),
                "--worker-extension-cls", "server.engine.worker_ext.AlignerWorkerExtension",
                "--additional-config", json_flag(self.aligner.to_additional_config()),
            ]  # fmt: skip
        if self.aligner_enabled and self._routing() == "v1":
            argv += ["--logits-processors", "server.engine.routing_v1:AlignerRoutingLP"]
        if self.priority_scheduling:
            argv += ["--scheduling-policy", "priority"]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        return argv + list(self.extra_args)

    def _routing(self) -> str:
        if self.routing != "auto":
            return self.routing
        from vllm.platforms import current_platform

        return "v1" if current_platform.is_cpu() or os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0" else "v2"


def cache_salt(tenant: str | None, key: str | None, user_salt: str | None = None) -> str:
    """The prefix-cache salt of a request, made only here, from what the server knows: the tenant (None:
    shared by every tenant), the adapter's content hash (None: the base model) and the client's own salt.

    vLLM reuses a KV block only under the same salt, so blocks are shared exactly within one (tenant,
    adapter content, client salt). The fields are hashed as one JSON array: a client's salt can split its
    own tenant's cache further, but no string it sends equals another tenant's or another adapter's salt.
    """
    fields = json.dumps([tenant, key or "base", user_salt], separators=(",", ":"))
    return "aligner-" + hashlib.sha256(fields.encode()).hexdigest()


@dataclass
class _Resident:
    pins: int = 0
    retired: bool = False  # unload as soon as the last pin goes


class EngineHooks:
    """What the engine reports; the server wires these to its metrics."""

    def adapter_loaded(self, seconds: float) -> None: ...
    def adapter_evicted(self) -> None: ...
    def resident_changed(self, count: int) -> None: ...
    def leases_changed(self, count: int) -> None: ...


class AlignerEngine:
    def __init__(self, options: EngineOptions, hooks: EngineHooks | None = None) -> None:
        self.options = options
        self.hooks = hooks or EngineHooks()
        self.client: Any = None
        self.serving: Any = None  # vLLM's State with openai_serving_chat / openai_serving_completion
        self._stack: Any = None
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self._lock = asyncio.Lock()
        self.leases = 0  # requests currently holding an adapter (in flight, preempted ones included)
        self._cores: set[int] | None = None  # this process's cores before the workers got theirs alone

    # ---- lifecycle ----
    async def start(self) -> None:
        from contextlib import AsyncExitStack

        from server.engine import vllm_glue

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gib))
        args = vllm_glue.engine_args(self.options.argv())
        self._stack = AsyncExitStack()
        try:
            self.client = await self._stack.enter_async_context(vllm_glue.open_engine(args))
            self.serving = await vllm_glue.serving_state(self.client, args)
            if self.options.isolate_worker_cores:
                self._cores = os.sched_getaffinity(0)
                placement.isolate_worker_cores()
        except BaseException:
            await self._stack.aclose()
            raise

    async def stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack, self.client, self.serving = None, None, None
        if self._cores is not None:
            placement.restore_cores(self._cores)
            self._cores = None

    async def check_health(self) -> None:
        if self.client is None:
            raise EngineNotReady("engine is not running")
        if self.client.errored:
            raise EngineNotReady(f"engine failed: {self.client.dead_error}")
        await self.client.check_health()

    # ---- adapters ----
    async def lease(self, key: str, load: Callable[[], Awaitable[bytes]]) -> Lease:
        """Pin `key` and make sure it is resident; the caller must `release()` the lease."""
        async with self._lock:
            entry = self._resident.get(key)
            if entry is not None:
                self._resident.move_to_end(key)
                entry.pins += 1
                entry.retired = False
                return self._new_lease(key)
            data = await load()
            await self._make_room()
            started = time.perf_counter()
            await self._rpc("aligner_load", key, data)
            self.hooks.adapter_loaded(time.perf_counter() - started)
            self._resident[key] = _Resident(pins=1)
            self.hooks.resident_changed(len(self._resident))
            return self._new_lease(key)

    def _new_lease(self, key: str) -> Lease:
        self.leases += 1
        self.hooks.leases_changed(self.leases)
        return Lease(self, key)

    async def retire(self, key: str) -> None:
        """The adapter was deleted: unload it once no running request holds it."""
        async with self._lock:
            entry = self._resident.get(key)
            if entry is None:
                return
            entry.retired = True
            if entry.pins == 0:
                await self._try_unload(key)

    async def _release(self, key: str) -> None:
        self.leases -= 1
        self.hooks.leases_changed(self.leases)
        async with self._lock:
            entry = self._resident.get(key)
            if entry is None:
                return
            entry.pins -= 1
            if entry.pins == 0 and entry.retired:
                await self._try_unload(key)

    async def load_many(self, items: list[tuple[str, bytes]], batch: int = 2048) -> None:
        """Make many adapters resident, unpinned (warming a replica, benchmarks); they must all fit."""
        async with self._lock:
            items = [(k, d) for k, d in items if k not in self._resident]
            if len(self._resident) + len(items) > self.capacity:
                raise EngineBusy(f"{len(items)} more adapters do not fit beside {len(self._resident)} ({self.capacity})")
            for i in range(0, len(items), batch):
                chunk = items[i : i + batch]
                await self._rpc("aligner_load_many", chunk)
                for key, _ in chunk:
                    self._resident[key] = _Resident()
            self.hooks.resident_changed(len(self._resident))

    @property
    def capacity(self) -> int:
        """Adapters resident at once: hot slots plus the cold tier."""
        return self.options.aligner.max_slots + self.options.aligner.cold_slots

    async def _make_room(self) -> None:
        if len(self._resident) < self.capacity:
            return
        for key in [k for k, e in self._resident.items() if e.pins == 0]:  # least recently used first
            if await self._try_unload(key):
                return
        raise EngineBusy(f"all {self.capacity} adapter slots are held by running requests")

    async def _try_unload(self, key: str) -> bool:
        # Only called with no pins: no in-flight request (preempted ones included) uses the key.
        if not all(await self._rpc("aligner_unload", key, True)):
            return False
        del self._resident[key]
        self.hooks.adapter_evicted()
        self.hooks.resident_changed(len(self._resident))
        return True

    async def stats(self) -> dict:
        (first, *_) = await self._rpc("aligner_stats")
        return first

    async def counters(self) -> dict[str, int]:
        """Counters summed over the workers (unknown_key_events: rows that met a key no slot held)."""
        total: dict[str, int] = {}
        for part in await self._rpc("aligner_counters"):
            for k, v in part.items():
                total[k] = total.get(k, 0) + int(v)
        return total

    async def _rpc(self, method: str, *args: Any) -> list[Any]:
        if self.client is None:
            raise EngineNotReady("engine is not running")
        return await self.client.collective_rpc(method, args=args)

    def resident_keys(self) -> list[str]:
        return list(self._resident)


class Lease:
    """A pin on one resident adapter; release exactly once (idempotent)."""

    def __init__(self, engine: AlignerEngine, key: str) -> None:
        self.engine, self.key, self._released = engine, key, False

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self.engine._release(self.key)
