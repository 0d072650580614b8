"""Engine-side Aligner settings, carried to every worker in vLLM's `additional_config["aligner"]`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The key of SamplingParams.extra_args that carries a request's adapter (its content hash) to the worker.
EXTRA_ARGS_KEY = "aligner"


@dataclass(frozen=True)
class AlignerEngineConfig:
    max_slots: int = 64  # hot adapters: per-layer K_p/V_p precomputed
    cold_slots: int = 0  # further resident adapters kept as raw P and gates, projected on the fly
    max_tokens: int = 16  # largest N (prefix tokens) an adapter may have
    path: str = "auto"  # "auto", "torch", "gather", "triton" or "cpu": see server/engine/op.py PATHS

    def to_additional_config(self) -> dict[str, Any]:
        return {"aligner": asdict(self)}

    @classmethod
    def from_additional_config(cls, additional: dict[str, Any] | None) -> AlignerEngineConfig:
        return cls(**((additional or {}).get("aligner") or {}))
