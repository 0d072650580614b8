"""The served base model's shape and identity.

An adapter carries `base_model` = the identity of the model it was made for: the model's name plus a
fingerprint of the parts of its config that decide what an adapter means (shapes, vocabulary, rope).
Two servers of the same model agree on it; a reshaped or different model does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Config keys that change the meaning of an adapter's numbers. Anything else (dtype, generation
# defaults, transformers version) may differ between two copies of the same model.
_FINGERPRINT_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "rope_parameters",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class ModelSpec:
    """What an adapter must match: the attention shape of the base model, and its identity."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    @property
    def identity(self) -> str:
        """`<name>:<fingerprint>`: the `id` of the base model in /v1/models and in adapter files."""
        return f"{self.name}:{self.fingerprint}"

    @classmethod
    def from_config(cls, config: dict[str, Any], *, name: str) -> ModelSpec:
        """Build from a Hugging Face `config.json` dict."""
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        subset = {k: config.get(k) for k in _FINGERPRINT_KEYS}
        subset["head_dim"] = head_dim
        kv_heads = subset["num_key_value_heads"] = int(config.get("num_key_value_heads") or heads)
        digest = hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()
        return cls(
            name=name,
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            fingerprint=digest[:12],
        )
