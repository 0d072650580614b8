"""Helpers shared by the tests: the real model, adapters, an engine on its own event loop, parity checks."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from aligner_core.adapter_format import Adapter, encode
from aligner_core.model_prep import PreparedModel, prepare
from aligner_core.model_spec import ModelSpec

if TYPE_CHECKING:
    from server.engine.table import LayerHandle

LOGPROB_TOLERANCE = 1e-3  # float32 engine vs float32 HF reference; measured differences are ~1e-5

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
]


OPERATIONS = [  # (method, path template) of every operation; test_fuzz keeps it equal to the OpenAPI document
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/adapters"),
    ("GET", "/v1/adapters"),
    ("GET", "/v1/adapters/{name}"),
    ("DELETE", "/v1/adapters/{name}"),
    ("GET", "/v1/adapters/{name}/versions"),
    ("GET", "/v1/adapters/{name}/content"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("DELETE", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"),
    ("GET", "/admin/tenants"),
    ("POST", "/admin/tenants"),
    ("PATCH", "/admin/tenants/{tenant_id}"),
    ("POST", "/admin/tenants/{tenant_id}/keys"),
    ("GET", "/admin/tenants/{tenant_id}/keys"),
    ("DELETE", "/admin/keys/{key_id}"),
    ("POST", "/admin/adapters"),
    ("DELETE", "/admin/adapters/{name}"),
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/metrics"),
]


def real_model() -> PreparedModel:
    return prepare()


def tiny_spec(**kw: int) -> ModelSpec:
    shape = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16) | kw
    return ModelSpec(name="tiny", fingerprint="0123456789ab", **shape)


def tiny_llama_config(**kw: Any):
    """A small LlamaConfig for HF-only tests (64 wide, 4 layers, 4 query / 2 kv heads unless overridden)."""
    from transformers import LlamaConfig

    heads = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)  # tiny_spec()'s
    return LlamaConfig(**(dict(vocab_size=128, intermediate_size=128) | heads | kw))


def tiny_llama(**kw: Any):
    """(a random tiny LlamaForCausalLM with attention bias, eager attention, seed 0; its ModelSpec)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(**({"attention_bias": True} | kw))
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    return model, ModelSpec.from_config(config.to_dict(), name="tiny")


def linear_layers(
    spec: ModelSpec, *, bias: bool = True, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[LayerHandle]:
    """A LayerHandle per layer of `spec`: a fresh random fused qkv `nn.Linear` (made on the CPU from torch's
    global generator, then moved to `device` and `dtype`), no key norm."""
    from server.engine.table import LayerHandle

    H, KVH, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    return [
        LayerHandle(
            index=i,
            qkv_proj=torch.nn.Linear(spec.hidden_size, (H + 2 * KVH) * D, bias=bias).to(device, dtype),
            k_norm=None,
            q_size=H * D,
            kv_size=KVH * D,
        )
        for i in range(spec.num_layers)
    ]


def adapter_set(spec: ModelSpec) -> dict[str, Adapter]:
    """Adapters covering N in {1, 4, 16}, start_layer in {0, 2}, both gate activations."""
    return {
        "n1": Adapter.random(spec, tokens=1, start_layer=2, seed=11, gate_scale=0.08),
        "n4_tanh": Adapter.random(spec, tokens=4, start_layer=2, gate_activation="tanh", seed=12, gate_scale=0.4),
        "n4_s0": Adapter.random(spec, tokens=4, start_layer=0, seed=13, gate_scale=0.06),
        "n1_s0_tanh": Adapter.random(spec, tokens=1, start_layer=0, gate_activation="tanh", seed=14, gate_scale=0.3),
        "n16": Adapter.random(spec, tokens=16, start_layer=2, seed=15, gate_scale=0.08),
    }


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def engine_options(model_path: Path | str, served_name: str, **options: Any):
    """`EngineOptions` as the engine tests run it: float32, eager, 1 GiB of KV cache (each overridable);
    `options` are the rest of EngineOptions."""
    from server.engine.facade import EngineOptions

    defaults: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "kv_cache_gib": 1}
    return EngineOptions(model_path=str(model_path), served_name=served_name, **(defaults | options))


class EngineRunner:
    """An AlignerEngine on a private event loop, so plain (sync) tests can drive it."""

    def __init__(self, options) -> None:
        from server.engine.facade import AlignerEngine

        self.loop = asyncio.new_event_loop()
        self.engine = AlignerEngine(options)
        self.run(self.engine.start())
        self._ids = itertools.count()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.engine.stop())
        self.loop.close()

    async def generate(
        self, prompt_ids: list[int], key: str | None, *, max_tokens: int = 24, delay: float = 0.0, salt: bool = True
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from server.engine.facade import cache_salt

        await asyncio.sleep(delay)
        prompt = TokensPrompt(prompt_token_ids=prompt_ids)
        if key and salt:
            prompt["cache_salt"] = cache_salt(None, key)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            logprobs=0,
            extra_args={"aligner": key} if key else None,
        )
        final = None
        async for out in self.engine.client.generate(prompt, params, request_id=f"t{next(self._ids)}"):
            final = out
        comp = final.outputs[0]
        lps = [step[tok].logprob for step, tok in zip(comp.logprobs, comp.token_ids)]
        return Generation(prompt_ids, list(comp.token_ids), lps, final.num_cached_tokens or 0)


@dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]
    cached_tokens: int = 0


@dataclass
class Parity:
    matched: int
    total: int
    max_logprob_diff: float


def parity(hf_model, adapter: Adapter | list[tuple[Adapter, float]] | None, gen: Generation) -> Parity:
    """Teacher-forced comparison with the HF reference (one adapter, a stack of (adapter, scale), or the base
    model): all greedy tokens must agree."""
    from aligner_core.reference import teacher_forced

    greedy, ref = teacher_forced(hf_model, adapter, gen.prompt_ids, gen.tokens)
    matched = next((i for i, (g, t) in enumerate(zip(greedy, gen.tokens)) if g != t), len(gen.tokens))
    upto = max(matched, 1)
    diff = max(abs(a - b) for a, b in zip(gen.logprobs[:upto], ref[:upto]))
    return Parity(matched, len(gen.tokens), diff)


class Server:
    """`python -m server serve` as a real process on a free loopback port."""

    def __init__(self, store_url: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.extra_env = env or {}
        self.base = f"http://127.0.0.1:{self.port}"
        self.store_url, self.log = store_url, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> None:
        import httpx

        env = (
            os.environ
            | {"ALIGNER_KV_CACHE_GIB": "1", "ALIGNER_MAX_MODEL_LEN": "1024", "ALIGNER_MAX_NUM_SEQS": "32"}
            | {"ALIGNER_FINETUNE_WORKERS": "0"}  # a test that trains asks for its worker
            | self.extra_env
        )
        cmd = [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--enforce-eager",
            "--port",
            str(self.port),
            "--store",
            self.store_url,
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail("server did not become healthy in time:\n" + self.log.read_text()[-3000:])

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for assertion messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def serve(tmp: Path, env: dict[str, str] | None = None):
    """A module fixture's body: a Server on a SQLite store in `tmp`, started, then stopped."""
    srv = Server(f"sqlite:///{tmp / 'store.db'}", tmp / "server.log", env=env)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_train(data: Path | str, output: Path | str, **settings: Any):
    """`training.train.train` as the tests run it: on CPU, quiet, no plot, batches of 4, no validation split
    (each overridable); `settings` are the rest of TrainConfig."""
    from training.train import TrainConfig, train

    defaults: dict[str, Any] = {"batch_size": 4, "val_split": 0, "plot": "", "quiet": True, "device": "cpu"}
    return train(TrainConfig(data=str(data), output=str(output), **(defaults | settings)))


def require_in_ci(reason: str) -> None:
    """Skip locally, fail in CI: CI must never pass by skipping."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def record(test: str, **figures: object) -> None:
    """A measured figure for RELIABILITY.md: printed (pytest -s) and appended to $ALIGNER_FIGURES if set."""
    import json

    line = json.dumps({"test": test, **figures}, default=str)
    print(f"\n[figure] {line}")
    if path := os.environ.get("ALIGNER_FIGURES"):
        with open(path, "a") as f:
            f.write(line + "\n")


REPO = Path(__file__).resolve().parents[1]
__all__ = ["REPO", "PROMPTS", "adapter_set", "encode", "parity"]
