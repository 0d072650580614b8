"""What the routes share: settings, the model identity, the store, the engine, the metrics.

Built once by the app's lifespan and reached through the dependencies in `deps.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters_store import Store, Tenant
from aligner_core.model_spec import ModelSpec
from server.engine.facade import AlignerEngine
from server.fair_share import FairShare
from server.metrics import Metrics
from server.ratelimit import RateLimiter
from server.resolver import AdapterResolver
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    spec: ModelSpec
    store: Store
    engine: AlignerEngine
    metrics: Metrics
    resolver: AdapterResolver
    open_tenant: Tenant | None  # open mode: the one implicit tenant; multi-tenant mode: None
    public_tenant: Tenant  # owner of the adapters the admin publishes
    limiter: RateLimiter = field(default_factory=RateLimiter)  # generation requests per minute
    management_limiter: RateLimiter = field(default_factory=RateLimiter)  # uploads, deletes, listings
    fair: FairShare = field(default_factory=FairShare)
    model_path: str = ""  # the served model's folder (its tokenizer counts fine-tuning tokens)

    @property
    def multi_tenant(self) -> bool:
        return self.open_tenant is None
