"""Prometheus metrics, on a registry per app (so several apps in one process never collide).

Labels stay bounded: `kind` is "adapter" or "base" and `tenant` a tenant name, never an adapter name
(thousands of adapters must not become thousands of time series).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.engine.facade import EngineHooks

RATE_WINDOW_S = 60


class Metrics(EngineHooks):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("aligner_requests", "Generation requests", ["tenant", "kind", "endpoint"], registry=r)
        self.prompt_tokens = Counter("aligner_prompt_tokens", "Prompt tokens processed", ["tenant", "kind"], registry=r)
        self.completion_tokens = Counter(
            "aligner_completion_tokens", "Tokens generated", ["tenant", "kind"], registry=r
        )
        self.adapter_loads = Counter("aligner_adapter_loads", "Adapters loaded into the engine", registry=r)
        self.adapter_evictions = Counter("aligner_adapter_evictions", "Adapters evicted from the engine", registry=r)
        self.load_seconds = Histogram(
            "aligner_adapter_load_seconds",
            "Time to load one adapter into the engine",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.resident = Gauge("aligner_adapters_resident", "Adapters resident in the engine", registry=r)
        self.leases = Gauge(
            "aligner_adapter_requests_in_flight", "Requests holding an adapter in the engine", registry=r
        )
        self.uploads = Counter("aligner_adapter_uploads", "Adapter uploads", ["outcome"], registry=r)
        self.unknown_rows = Counter(
            "aligner_adapter_rows_unknown",
            "Batch rows whose adapter key the worker did not hold (ran as base: must stay 0)",
            registry=r,
        )
        self.stacked = Counter(
            "aligner_requests_by_adapters",
            "Generation requests by how many adapters they named (0: the base model; 2 or more: a stack)",
            ["adapters"],
            registry=r,
        )
        self.refused = Counter(
            "aligner_requests_refused", "Requests refused by a tenant limit", ["tenant", "limit"], registry=r
        )
        self.finetune_created = Counter("aligner_finetune_jobs_created", "Fine-tuning jobs created", registry=r)
        self.finetune_jobs = Gauge(
            "aligner_finetune_jobs",
            "Fine-tuning jobs by status, every tenant's (from the store)",
            ["status"],
            registry=r,
        )
        self.finetune_queue = Gauge(
            "aligner_finetune_queue_length", "Fine-tuning jobs queued for a training worker", registry=r
        )
        self.finetune_rate = Gauge(
            "aligner_finetune_steps_per_second",
            "Optimizer steps per second of every training worker on the store, over the last minute",
            registry=r,
        )
        self._unknown_seen = 0

    async def refresh_store(self, store) -> None:
        """Pull the fine-tuning queue's figures from the store, which every worker and replica shares."""
        try:
            counts = await store.job_counts()
            steps = await store.training_steps_since(datetime.now(UTC) - timedelta(seconds=RATE_WINDOW_S))
        except Exception:  # store down: /health says so; keep the last figures
            return
        for status, n in counts.items():
            self.finetune_jobs.labels(status).set(n)
        self.finetune_queue.set(counts.get("queued", 0))
        self.finetune_rate.set(steps / RATE_WINDOW_S)

    async def refresh(self, engine) -> None:
        """Pull what only the engine's workers count (called before each scrape)."""
        try:
            stats = await engine.counters()
        except Exception:  # engine not running: nothing to pull, /health says why
            return
        seen = int(stats.get("unknown_key_events", 0))
        if seen > self._unknown_seen:
            self.unknown_rows.inc(seen - self._unknown_seen)
            self._unknown_seen = seen

    # EngineHooks
    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_loads.inc()
        self.load_seconds.observe(seconds)

    def adapter_evicted(self) -> None:
        self.adapter_evictions.inc()

    def resident_changed(self, count: int) -> None:
        self.resident.set(count)

    def leases_changed(self, count: int) -> None:
        self.leases.set(count)

    def usage(self, tenant: str, kind: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(tenant, kind).inc(prompt)
        self.completion_tokens.labels(tenant, kind).inc(completion)
