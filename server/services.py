"""What the routes share: settings, the model identity, the store, the engine, the metrics.

Built once by the app's lifespan and reached through the dependencies in `deps.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store import Store
from aligner_core.model_spec import ModelSpec
from server.engine.facade import AlignerEngine
from server.metrics import Metrics
from server.settings import Settings


@dataclass
class Services:
    settings: Settings
    spec: ModelSpec
    store: Store
    engine: AlignerEngine
    metrics: Metrics
    open_tenant_id: str  # the implicit tenant of open mode
