"""Every touch point with vLLM's *internal* OpenAI-server API, in one file.

`vllm serve` assembles its server with `make_arg_parser`, `build_async_engine_client` and
`init_app_state`; we call the same functions to get an engine client and vLLM's own chat and completion
serving objects, then put our routes in front of them. These names are internal to vLLM and move between
releases: the version is pinned, and tests/test_vllm_glue.py fails loudly if one disappears.
"""

from __future__ import annotations

import json
from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.datastructures import State
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.utils.argparse_utils import FlexibleArgumentParser

VLLM_VERSION = "0.32.0"

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionRequest",
    "CompletionResponse",
    "EngineClient",
    "ErrorResponse",
    "StreamOptions",
    "engine_args",
    "open_engine",
    "serving_state",
]


def engine_args(argv: list[str]) -> Namespace:
    """Parse `vllm serve`-style flags with vLLM's own parser (so every vLLM flag works)."""
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


def json_flag(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@asynccontextmanager
async def open_engine(args: Namespace) -> AsyncIterator[EngineClient]:
    async with build_async_engine_client(args) as client:
        yield client


async def serving_state(client: EngineClient, args: Namespace) -> State:
    """vLLM's serving objects (`openai_serving_chat`, `openai_serving_completion`, ...) on a fresh State."""
    state = State()
    tasks = await client.get_supported_tasks()
    await init_app_state(client, state, args, tasks)
    return state
