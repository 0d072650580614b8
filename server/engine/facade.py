"""The engine as the API sees it: start/stop, adapter residency, and one operation per generation.

The frontend owns adapter lifetimes, because the worker never sees request ids: a request `lease`s its
adapter's key (pinning it and loading it if needed) before it is submitted and releases it when its last
token has been streamed. Unpinned keys are evicted least-recently-used when the slot table is full.

`generate` is the whole protocol of one request with vLLM's serving code: it leases the adapter, stamps
the routing key, the prefix-cache salt, the model name and the priority on vLLM's request, asks for usage
on a stream, and turns vLLM's refusals into `RequestRejected`. The API never touches vLLM's request
fields or serving objects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from server.engine import placement
from server.engine.config import EXTRA_ARGS_KEY, SCALE_SEP, AlignerEngineConfig, scaled_key, stack_key
from server.engine.plugin import aligner_architecture

log = logging.getLogger(__name__)


class EngineError(Exception):
    """Root of the facade's errors."""


class EngineBusy(EngineError):
    """Every adapter slot is pinned by running requests; retry shortly."""


class EngineNotReady(EngineError):
    """The engine has not started, has stopped, or died."""


class RequestRejected(EngineError):
    """vLLM refused a request: its `ErrorResponse`, a stream's error event, or an error its serving code raised
    about the request. `status` is the HTTP status vLLM chose, `param` the request field at fault if known."""

    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


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
    # tool calling: vLLM's parser of the model's tool calls (None: none, `tools` are refused), the chat template
    # that teaches the model its tools (a file or the template; None: the model's own), --tool-strict-level
    tool_call_parser: str | None = None
    chat_template: str | None = None
    tool_strict_level: str | None = None  # None: vLLM's default

    def argv(self) -> list[str]:
        from server.engine.vllm_glue import json_flag

        argv = [
            "--model",
            self.model_path,
            "--served-model-name",
            self.served_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--seed",
            str(self.seed),
            "--disable-uvicorn-access-log",
        ]
        if self.aligner_enabled:
            aligner = dataclasses.replace(self.aligner, routing=self._routing())
            argv += [
                "--hf-overrides",
                json_flag({"architectures": [aligner_architecture(self.architecture)]}),
                "--worker-extension-cls",
                "server.engine.worker_ext.AlignerWorkerExtension",
                "--additional-config",
                json_flag(aligner.to_additional_config()),
                *self.cuda_graphs()[1],
            ]
        if self.aligner_enabled and self._routing() == "v1":
            argv += ["--logits-processors", "server.engine.routing_v1:AlignerRoutingLP"]
        if self.priority_scheduling:
            argv += ["--scheduling-policy", "priority"]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        if self.chat_template is not None:
            argv += ["--chat-template", self.chat_template]
        if self.tool_call_parser is not None:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.tool_strict_level is not None:
            argv += ["--tool-strict-level", self.tool_strict_level]
        return argv + list(self.extra_args)

    def _routing(self) -> str:
        if self.routing != "auto":
            return self.routing
        return "v1" if _on_cpu() or os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0" else "v2"

    def cuda_graphs(self) -> tuple[str, list[str]]:
        """How vLLM's CUDA graphs and the Aligner op go together: (what the start-up log says, the flags that
        make it so). A captured graph replays without running Python, so the op is either graph-safe or kept
        out of every graph:
        - CPU, --enforce-eager or the stock engine: no graphs;
        - the V2 runner with the Triton kernel: graph-safe (routing in persistent buffers filled before each
          forward, one launch per layer of a fixed geometry: `op.WorkerState.graph_safe`), vLLM's own modes;
        - otherwise (the V1 runner, whose routing is read in Python during the forward; no Triton): the op
          is a splitting op under piecewise graphs, so it runs eagerly between the captured pieces, and a
          --compilation-config of the user's is refused (it could capture the op)."""
        if not self.aligner_enabled or self.enforce_eager or _on_cpu():
            return "no CUDA graphs (CPU or --enforce-eager): the Aligner op runs eagerly", []
        if self._routing() == "v2" and self.aligner.path in ("auto", "triton") and _triton_available():
            return "CUDA graphs as vLLM configures them: the Aligner op is graph-safe (V2 runner, Triton kernel)", []
        given = [a for a in self.extra_args if a.startswith(_COMPILATION_FLAGS)]
        if given:
            raise EngineError(
                f"{given[0]} cannot be combined with the Aligner op on this runner: it is graph-safe only on vLLM's "
                "V2 model runner with the Triton kernel, so here it runs as a splitting op under piecewise CUDA "
                "graphs, which aligner-serve configures itself; drop the flag, or pass --enforce-eager"
            )
        from server.engine.vllm_glue import CompilationConfig, json_flag

        splitting = [*CompilationConfig._attention_ops, *KV_CACHE_UPDATE_OPS, ALIGNER_OP]
        flags = ["--compilation-config", json_flag({"cudagraph_mode": "PIECEWISE", "splitting_ops": splitting})]
        why = "V1 runner" if self._routing() == "v1" else "no Triton kernel"
        return f"piecewise CUDA graphs with {ALIGNER_OP} as a splitting op ({why}): the op runs eagerly", flags


# The Aligner op's name as vLLM's splitting_ops have it; vLLM's own kv-cache updates, which it splits at when it
# picks the splitting ops itself (CompilationConfig.set_splitting_ops_for_v1), and no longer does once we do.
ALIGNER_OP = "aligner::apply_"
# vLLM's flags that set the compilation config, CUDA graph modes included (`-cc.cudagraph_mode=FULL`, `-O3`)
_COMPILATION_FLAGS = ("--compilation-config", "--compilation_config", "-cc", "-O", "--optimization-level")
KV_CACHE_UPDATE_OPS = ("vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update")


def _on_cpu() -> bool:
    from server.engine.vllm_glue import current_platform

    return bool(current_platform.is_cpu())


def _triton_available() -> bool:
    from server.engine.kernels.triton import triton_available

    return triton_available()


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


_HANDLERS = {  # endpoint -> vLLM's serving object (on its State) and method
    "chat": ("openai_serving_chat", "create_chat_completion"),
    "completions": ("openai_serving_completion", "create_completion"),
    "responses": ("openai_serving_responses", "create_responses"),
}


class AlignerEngine:
    def __init__(self, options: EngineOptions, hooks: EngineHooks | None = None) -> None:
        self.options = options
        self.hooks = hooks or EngineHooks()
        self.client: Any = None
        self._serving: Any = None  # vLLM's State with openai_serving_chat / openai_serving_completion
        self._stack: Any = None
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first
        self._lock = asyncio.Lock()
        self.leases = 0  # requests currently holding an adapter (in flight, preempted ones included)
        self._cores: set[int] | None = None  # this process's cores before the workers got theirs alone

    # ---- lifecycle ----
    async def start(self) -> None:
        from server.engine import vllm_glue

        if os.environ.get("VLLM_ENABLE_RESPONSES_API_STORE", "0") not in ("", "0"):
            raise EngineError(
                "VLLM_ENABLE_RESPONSES_API_STORE is set: vLLM's response store is one for every tenant (a key could "
                "read or continue another tenant's response by its id), so aligner-serve does not run with it; unset it"
            )
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gib))
        log.info("Aligner: %s", self.options.cuda_graphs()[0])
        args = vllm_glue.engine_args(self.options.argv())
        self._stack = AsyncExitStack()
        try:
            self.client = await self._stack.enter_async_context(vllm_glue.open_engine(args))
            self._serving = await vllm_glue.serving_state(self.client, args)
            if self.options.isolate_worker_cores:
                self._cores = os.sched_getaffinity(0)
                placement.isolate_worker_cores()
        except BaseException:
            await self._stack.aclose()
            raise

    async def stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack, self.client, self._serving = None, None, None
        if self._cores is not None:
            placement.restore_cores(self._cores)
            self._cores = None

    async def check_health(self) -> None:
        """Raise EngineNotReady unless the engine runs and answers."""
        if self.client is None:
            raise EngineNotReady("engine is not running")
        if self.client.errored:
            raise EngineNotReady(f"engine failed: {self.client.dead_error}")
        try:
            await self.client.check_health()
        except Exception as e:
            raise EngineNotReady(f"engine unhealthy: {e}") from e

    # ---- generation ----
    async def generate(
        self,
        endpoint: str,
        request: Any,
        raw_request: Any,
        *,
        adapter: AdapterUse | list[AdapterUse] | None,
        salt_scope: str | None,
        priority: int = 0,
        shown_model: str | None = None,
    ) -> Generation:
        """Run one chat ("chat"), completion ("completions") or Responses API ("responses") request, on
        `adapter` (None: the base model; a list: a stack, each at its scale, those at scale 0 left out),
        in the prefix cache of `salt_scope` (a tenant id; None: shared by every tenant), at `priority` (used
        under vLLM's priority policy only). The answer's `model` is `shown_model` (what the client named;
        None: the base model's name), and its JSON is OpenAI's (`openai_shape`).

        Every value that decides sharing is set here: a client-sent `vllm_xargs["aligner"]` is dropped, the
        salt is made from the scope, the adapter's content hash and the client's own salt. A stream is read
        up to its first event, where vLLM reports some refusals (a constraint its grammar compiler refuses).
        vLLM's refusals raise `RequestRejected`. The lease is held until `Generation.close()`; a complete
        answer's, and a refused request's, is released before this returns."""
        from server.engine.vllm_glue import ErrorResponse, StreamOptions

        uses = [u for u in (adapter if isinstance(adapter, list) else [adapter] if adapter else []) if u.scale != 0]
        lease = await self.lease_stack(uses) if uses else None
        try:
            key = lease.key if lease is not None else None
            xargs = {k: v for k, v in (request.vllm_xargs or {}).items() if k != EXTRA_ARGS_KEY}
            if key is not None:
                xargs[EXTRA_ARGS_KEY] = key
            request.vllm_xargs = xargs or None
            request.cache_salt = cache_salt(salt_scope, key, request.cache_salt)
            request.priority = priority if self.options.priority_scheduling else 0  # vLLM refuses it otherwise
            request.model = self.options.served_name
            shown = shown_model or self.options.served_name
            wanted = _usage_wanted(request) if endpoint != "responses" else "final"
            if request.stream and endpoint != "responses":
                # usage on every chunk, so what was streamed is counted even if the client leaves early
                request.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=True)
            result, first = await self._serve(endpoint, request, raw_request)
            if isinstance(result, ErrorResponse):
                raise RequestRejected(result.error.message, status=result.error.code, param=result.error.param)
            if not isinstance(result, AsyncGenerator):
                if lease is not None:
                    await lease.release()
                answer = (
                    result.model_dump(mode="json", by_alias=True) if endpoint == "responses" else result.model_dump()
                )
                return Generation(None, response=openai_shape(answer, shown), usage=_usage_of(result.usage))
            refused = _error_event(first)
            if refused is not None and refused.status == 400:
                await result.aclose()
                raise refused
            n = max(1, int(getattr(request, "n", None) or 1))  # the Responses API has no n
            return Generation(lease, source=result, first=first, wanted=wanted, n=n, model=shown)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise

    async def tokenization(self, endpoint: str, request: Any, raw_request: Any) -> dict:
        """vLLM's answer to a "tokenize" or "detokenize" request, as JSON (the base model's tokenizer: an
        adapter changes no token); its refusals raise `RequestRejected`."""
        from server.engine.vllm_glue import ErrorResponse

        if self._serving is None:
            raise EngineNotReady("engine is not running")
        serving = self._serving.serving_tokenization
        handler = serving.create_tokenize if endpoint == "tokenize" else serving.create_detokenize
        request.model = self.options.served_name
        with _rejecting(request):
            result = await handler(request, raw_request)
        if isinstance(result, ErrorResponse):
            raise RequestRejected(result.error.message, status=result.error.code, param=result.error.param)
        return result.model_dump()

    async def _serve(self, endpoint: str, request: Any, raw_request: Any) -> tuple[Any, str | None]:
        """vLLM's answer to `request`: a response, an ErrorResponse or a stream, with the stream's first event."""
        if self._serving is None:
            raise EngineNotReady("engine is not running")
        serving, method = _HANDLERS[endpoint]
        handler = getattr(getattr(self._serving, serving), method)
        with _rejecting(request):
            result = await handler(request, raw_request)
            if isinstance(result, AsyncGenerator) and endpoint == "responses":
                result = _sse_events(result)
            first = await anext(result, None) if isinstance(result, AsyncGenerator) else None
        return result, first

    # ---- adapters ----
    async def lease(self, key: str, load: Callable[[], Awaitable[bytes]], scale: float = 1.0) -> Lease:
        """Pin `key` at `scale` and make sure it is resident; the caller must `release()` the lease."""
        return await self.lease_stack([AdapterUse(key, load, scale)])

    async def lease_stack(self, uses: list[AdapterUse]) -> Lease:
        """Pin each adapter of a stack at its scale, in order, loading those not resident; the caller must
        `release()` the lease. If one cannot be had, the others are unpinned before this raises."""
        keys: list[str] = []
        try:
            for use in uses:
                keys.append(await self._pin(use.engine_key, use.load, use.scale))
        except BaseException:
            for key in keys:
                await self._unpin(key)
            raise
        self.leases += 1
        self.hooks.leases_changed(self.leases)
        return Lease(self, keys)

    async def _pin(self, key: str, load: Callable[[], Awaitable[bytes]], scale: float) -> str:
        async with self._lock:
            entry = self._resident.get(key)
            if entry is not None:
                self._resident.move_to_end(key)
                entry.pins += 1
                entry.retired = False
                return key
            data = await load()
            await self._make_room()
            started = time.perf_counter()
            await self._rpc("aligner_load", key, data, scale)
            self.hooks.adapter_loaded(time.perf_counter() - started)
            self._resident[key] = _Resident(pins=1)
            self.hooks.resident_changed(len(self._resident))
            return key

    async def retire(self, key: str) -> None:
        """The adapter was deleted: unload it, and each scale of it, once no running request holds it."""
        async with self._lock:
            for k in [k for k in self._resident if k == key or k.startswith(key + SCALE_SEP)]:
                entry = self._resident[k]
                entry.retired = True
                if entry.pins == 0:
                    await self._try_unload(k)

    async def _release(self, keys: list[str]) -> None:
        self.leases -= 1
        self.hooks.leases_changed(self.leases)
        for key in keys:
            await self._unpin(key)

    async def _unpin(self, key: str) -> None:
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
                raise EngineBusy(
                    f"{len(items)} more adapters do not fit beside {len(self._resident)} ({self.capacity})"
                )
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
    """Pins on resident adapters (one, or a stack's in lane order); release exactly once (idempotent)."""

    def __init__(self, engine: AlignerEngine, keys: list[str]) -> None:
        self.engine, self.keys, self._released = engine, keys, False

    @property
    def key(self) -> str:
        """The routing key: the adapter's engine key, or the stack's (`config.stack_key`)."""
        return stack_key(self.keys)

    async def release(self) -> None:
        if not self._released:
            self._released = True
            await self.engine._release(self.keys)


@dataclass(frozen=True)
class AdapterUse:
    """An adapter a request runs on: its content hash, how to read it if not resident, and its scale (a
    stack's entry; 1.0: the adapter as trained)."""

    key: str
    load: Callable[[], Awaitable[bytes]]
    scale: float = 1.0

    @property
    def engine_key(self) -> str:
        """The key the engine holds it under: each scale its own entry (`config.scaled_key`)."""
        return scaled_key(self.key, self.scale)


class Generation:
    """One request run by the engine: a complete answer (`response`, its JSON) or a stream (`events()`), and
    its token `usage`. It holds the adapter's lease until `close()`, which also aborts a running stream."""

    def __init__(
        self,
        lease: Lease | None,
        *,
        response: dict | None = None,
        usage: tuple[int, int] | None = None,
        source: AsyncGenerator[str, None] | None = None,
        first: str | None = None,
        wanted: str = "none",
        n: int = 1,
        model: str = "",
    ) -> None:
        self.response = response
        self._lease, self._usage = lease, usage
        self._source, self._first, self._wanted, self._model = source, first, wanted, model
        self._meter = _Meter(n)
        self._events: AsyncGenerator[str, None] | None = None

    @property
    def streaming(self) -> bool:
        return self._source is not None

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens: a complete answer's (None: vLLM reported none), or a stream's so far."""
        return self._meter.totals() if self._source is not None else self._usage

    def events(self) -> AsyncGenerator[str, None]:
        """The stream's SSE events, with usage as the client asked for it; vLLM's error event raises
        RequestRejected (the caller ends the stream with its own error event)."""
        if self._source is None:
            raise RuntimeError("a complete answer has no events")
        self._events = self._relay(self._source)
        return self._events

    async def _relay(self, source: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        try:
            chunk = self._first
            while chunk is not None:
                shown = self._shown(chunk)
                if shown is not None:
                    yield shown
                chunk = await anext(source, None)
        finally:
            await source.aclose()

    def _shown(self, chunk: str) -> str | None:
        """`chunk` as the client sees it (None: a usage chunk it did not ask for), its usage counted, in
        OpenAI's shape.

        vLLM's serving code yields SSE text, so usage is read back out of it here, where its format is known."""
        error = _error_event(chunk)
        if error is not None:
            raise error
        if chunk.startswith("event: "):
            return self._shown_response_event(chunk)
        if not chunk.startswith("data: {"):
            return chunk
        event = json.loads(chunk[len("data: ") :])
        if "usage" in event:
            self._meter.see(event)
            if not event.get("choices"):  # the final usage chunk
                if self._wanted == "none":
                    return None
            elif self._wanted != "continuous":
                del event["usage"]
        return (
            "data: " + json.dumps(openai_shape(event, self._model), separators=(",", ":"), ensure_ascii=False) + "\n\n"
        )

    def _shown_response_event(self, chunk: str) -> str:
        """A Responses API event (`event: <type>` then its JSON) as the client sees it: the response's `model`
        as the client named it; the tokens counted (each text delta is one step's output: a token, until the
        final event's usage)."""
        head, _, data = chunk.partition("\ndata: ")
        event = json.loads(data)
        response = event.get("response")
        if isinstance(response, dict):
            response["model"] = self._model
            if event.get("type") in ("response.completed", "response.incomplete") and response.get("usage"):
                usage = response["usage"]
                self._meter.final = (usage.get("input_tokens", 0), usage.get("output_tokens", 0))
        elif event.get("type") == "response.output_text.delta":
            self._meter.completion[0] = self._meter.completion.get(0, 0) + 1
        return f"{head}\ndata: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n"

    async def close(self) -> None:
        """Close vLLM's stream (which aborts the request if it is still running) and release the lease; idempotent."""
        try:
            if self._events is not None:
                await self._events.aclose()
            if self._source is not None:
                await self._source.aclose()
        finally:
            if self._lease is not None:
                await self._lease.release()


def openai_shape(answer: dict, model: str) -> dict:
    """vLLM's answer (a response or a stream chunk, as JSON) as OpenAI's schemas have it, in place: `model` as
    the client named it, no null where the schema wants an object or an array (dropped: each is optional),
    and chat logprobs' `refusal` beside their `content`."""
    answer["model"] = model
    usage = answer.get("usage")
    if isinstance(usage, dict):
        _drop_nulls(usage, ("prompt_tokens_details", "completion_tokens_details"))
    for choice in answer.get("choices") or ():
        for part in (choice.get("message"), choice.get("delta")):
            if isinstance(part, dict):
                _drop_nulls(part, ("annotations", "function_call", "tool_calls"))
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and "content" in logprobs:  # chat's (completions' have `tokens`)
            logprobs.setdefault("refusal", None)
    return answer


def _drop_nulls(obj: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in obj and obj[key] is None:
            del obj[key]


def _usage_of(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of vLLM's usage object (chat and completions', or the Responses API's)."""
    if usage is None:
        return None
    if hasattr(usage, "input_tokens"):
        return usage.input_tokens, usage.output_tokens or 0
    return usage.prompt_tokens, usage.completion_tokens or 0


async def _sse_events(events: AsyncGenerator[Any, None]) -> AsyncGenerator[str, None]:
    """The Responses API's event objects as SSE text, as vLLM's own route writes them."""
    try:
        async for event in events:
            yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
    finally:
        await events.aclose()


def _usage_wanted(request: Any) -> str:
    """What the client asked of usage in a stream: "none", "final" or "continuous"."""
    opts = request.stream_options
    if not (opts and opts.include_usage):
        return "none"
    return "continuous" if opts.continuous_usage_stats else "final"


class _Meter:
    """Usage seen so far in a stream with continuous usage: per choice its completion tokens, per prompt
    its prompt tokens (choice index = prompt index x n + i)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}
        self.final: tuple[int, int] | None = None

    def see(self, event: dict) -> None:
        usage = event.get("usage")
        if not usage:
            return
        choices = event.get("choices")
        if not choices:
            self.final = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            return
        for c in choices:
            i = int(c.get("index", 0))
            self.prompt[i // self.n] = usage.get("prompt_tokens", 0)
            self.completion[i] = max(self.completion.get(i, 0), usage.get("completion_tokens", 0))

    def totals(self) -> tuple[int, int]:
        return self.final or (sum(self.prompt.values()), sum(self.completion.values()))


# ---- vLLM's refusals ----


def _error_event(chunk: str | None) -> RequestRejected | None:
    """vLLM's error event in a stream (`data: {"error": {"message", "type", "param", "code": status}}`), else None."""
    if chunk is None or not chunk.startswith('data: {"error"'):
        return None
    error = json.loads(chunk[len("data: ") :]).get("error") or {}
    status = error.get("code")
    return RequestRejected(
        str(error.get("message"))[:2000], status=status if isinstance(status, int) else 500, param=error.get("param")
    )


def output_constraint(request: Any) -> Any:
    """The request's structured-output constraint (vLLM's StructuredOutputsParams; None: unconstrained), or
    RequestRejected when vLLM refuses it (two kinds of constraint at once)."""
    with _rejecting(request):
        return request.extract_structured_outputs()


@contextmanager
def _rejecting(request: Any) -> Iterator[None]:
    """Raise RequestRejected (a 400) for an exception that vLLM raised about the request.

    vLLM's own server answers its `VLLMClientError` family and, for code not yet migrated to it, a plain
    ValueError, TypeError or OverflowError (e.g. an audio part sent to a text-only model) with a 400. Errors
    from compiling a structured-output constraint (a regex with a lookbehind, a `$ref` to nothing) name no
    parameter themselves: the request field holding the constraint is named."""
    try:
        yield
    except Exception as exc:
        if not (isinstance(exc, (ValueError, TypeError, OverflowError)) or is_vllm_client_error(exc)):
            raise
        param = getattr(exc, "parameter", None)
        if param is None and _raised_checking_structured_outputs(exc):
            param = constraint_field(request)
        raise RequestRejected(str(exc)[:2000], status=400, param=param) from exc


def is_vllm_client_error(exc: BaseException) -> bool:
    """vLLM's errors caused by the request (its `VLLMClientError` family, e.g. an empty chat), which vLLM's
    own server answers with a 4xx. Matched by name: vLLM is imported lazily."""
    return any(c.__name__ == "VLLMClientError" and c.__module__ == "vllm.exceptions" for c in type(exc).__mro__)


def constraint_field(request: Any) -> str | None:
    """The request field that constrains the output (`response_format` wins over `structured_outputs`)."""
    fmt = request.response_format
    if fmt is not None and getattr(fmt, "type", "text") != "text":
        return "response_format"
    return "structured_outputs" if request.structured_outputs is not None else None


def _raised_checking_structured_outputs(exc: BaseException) -> bool:
    """Whether vLLM raised `exc` in `SamplingParams._validate_structured_outputs` (where the grammar backends
    compile a request's constraint); matched by frame, as the messages differ per backend."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_validate_structured_outputs":
            return True
        tb = tb.tb_next
    return False
