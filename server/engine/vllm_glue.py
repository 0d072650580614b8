"""Every touch point with vLLM, in one file: the only module under server/ that imports vllm.

Two kinds of names pass through here:
- the model side: the model classes we subclass, the helpers `install` calls while vLLM builds the model,
  the logits-processor (V1) and model-state (V2) hooks that route requests, the registry the plugin
  registers with, the forward context the op reads and the platform the facade asks;
- vLLM's *internal* OpenAI-server API: `vllm serve` assembles its server with `make_arg_parser`,
  `build_async_engine_client` and `init_app_state`; we call the same functions to get an engine client and
  vLLM's own chat and completion serving objects, then put our routes in front of them.

Each name is imported on first use (`__getattr__` over `VLLM_NAMES`): worker processes import the model
side while vLLM is loading the model, and must not pull in the OpenAI server there. These names are
internal to vLLM and move between releases: the version is pinned, and tests/test_vllm_glue.py imports
every one and checks what we rely on, so an upgrade that moves one fails loudly there.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names as VLLM_NAMES, for type checkers (tests/test_vllm_glue.py keeps them equal)
    from argparse import Namespace

    from starlette.datastructures import State
    from vllm import ModelRegistry, SamplingParams
    from vllm.config import CompilationConfig, VllmConfig
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.engine.protocol import EngineClient
    from vllm.entrypoints.generate.base.protocol import StreamOptions
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
    )
    from vllm.forward_context import get_forward_context, is_forward_context_available
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.mistral import MistralForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

VLLM_VERSION = "0.32.0"

# name -> the vLLM module it is imported from, on first use
VLLM_NAMES: dict[str, str] = {
    # the model (server/engine/model.py, plugin.py): classes we subclass, helpers called while it is built
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
    "MistralForCausalLM": "vllm.model_executor.models.mistral",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3",
    "Attention": "vllm.model_executor.layers.attention",
    "VllmConfig": "vllm.config",
    "get_tensor_model_parallel_rank": "vllm.distributed",
    "extract_layer_index": "vllm.model_executor.models.utils",
    "ModelRegistry": "vllm",
    # routing (routing.py, routing_v1.py, routing_v2.py): per-request rows and the forward now running
    "SamplingParams": "vllm",
    "BatchUpdate": "vllm.v1.sample.logits_processor",
    "LogitsProcessor": "vllm.v1.sample.logits_processor",
    "MoveDirectionality": "vllm.v1.sample.logits_processor",
    "DefaultModelState": "vllm.v1.worker.gpu.model_states.default",
    "NewRequestData": "vllm.v1.core.sched.output",
    "InputBatch": "vllm.v1.worker.gpu.input_batch",
    "get_forward_context": "vllm.forward_context",
    "is_forward_context_available": "vllm.forward_context",
    "current_platform": "vllm.platforms",
    "CompilationConfig": "vllm.config",
    # the OpenAI server (this file, facade.py, server/routes, server/inference.py)
    "EngineClient": "vllm.engine.protocol",
    "init_app_state": "vllm.entrypoints.launchers.api_server.app_state",
    "build_async_engine_client": "vllm.entrypoints.launchers.api_server.entry",
    "make_arg_parser": "vllm.entrypoints.launchers.cli_args",
    "FlexibleArgumentParser": "vllm.utils.argparse_utils",
    "ChatCompletionRequest": "vllm.entrypoints.openai.chat_completion.protocol",
    "ChatCompletionResponse": "vllm.entrypoints.openai.chat_completion.protocol",
    "CompletionRequest": "vllm.entrypoints.openai.completion.protocol",
    "CompletionResponse": "vllm.entrypoints.openai.completion.protocol",
    "ResponsesRequest": "vllm.entrypoints.openai.responses.protocol",
    "ResponsesResponse": "vllm.entrypoints.openai.responses.protocol",
    "StreamOptions": "vllm.entrypoints.generate.base.protocol",
    "ErrorResponse": "vllm.entrypoints.serve.engine.protocol",
    "TokenizeCompletionRequest": "vllm.entrypoints.serve.tokenize.protocol",
    "TokenizeChatRequest": "vllm.entrypoints.serve.tokenize.protocol",
    "DetokenizeRequest": "vllm.entrypoints.serve.tokenize.protocol",
}

__all__ = [  # VLLM_NAMES' names, then our own (tests/test_vllm_glue.py keeps them equal)
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Attention",
    "VllmConfig",
    "get_tensor_model_parallel_rank",
    "extract_layer_index",
    "ModelRegistry",
    "SamplingParams",
    "BatchUpdate",
    "LogitsProcessor",
    "MoveDirectionality",
    "DefaultModelState",
    "NewRequestData",
    "InputBatch",
    "get_forward_context",
    "is_forward_context_available",
    "current_platform",
    "CompilationConfig",
    "EngineClient",
    "init_app_state",
    "build_async_engine_client",
    "make_arg_parser",
    "FlexibleArgumentParser",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "ResponsesRequest",
    "ResponsesResponse",
    "StreamOptions",
    "ErrorResponse",
    "TokenizeCompletionRequest",
    "TokenizeChatRequest",
    "DetokenizeRequest",
    "VLLM_NAMES",
    "VLLM_VERSION",
    "engine_arg_parser",
    "engine_args",
    "json_flag",
    "open_engine",
    "serving_state",
]


def __getattr__(name: str) -> Any:
    """A vLLM name from `VLLM_NAMES`, imported on first use and then kept as a plain module global."""
    module = VLLM_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def engine_arg_parser(**parser_kwargs: Any) -> FlexibleArgumentParser:
    """`vllm serve`'s own argument parser (every vLLM flag; `parser_kwargs` go to FlexibleArgumentParser)."""
    return __getattr__("make_arg_parser")(__getattr__("FlexibleArgumentParser")(**parser_kwargs))


def engine_args(argv: list[str]) -> Namespace:
    """Parse `vllm serve`-style flags with vLLM's own parser (so every vLLM flag works)."""
    return engine_arg_parser().parse_args(argv)


def json_flag(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@asynccontextmanager
async def open_engine(args: Namespace) -> AsyncIterator[EngineClient]:
    async with __getattr__("build_async_engine_client")(args) as client:
        yield client


async def serving_state(client: EngineClient, args: Namespace) -> State:
    """vLLM's serving objects (`openai_serving_chat`, `openai_serving_completion`, ...) on a fresh State."""
    from starlette.datastructures import State

    state = State()
    tasks = await client.get_supported_tasks()
    await __getattr__("init_app_state")(client, state, args, tasks)
    return state
