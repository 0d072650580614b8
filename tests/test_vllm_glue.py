"""The one vLLM touch point (server/engine/vllm_glue.py): every name it re-exports is imported here and checked
for what the engine relies on (a class where we subclass it, the parameters where we call it, the fields we
read or set), so an upgrade that moves or changes one fails loudly here, not inside a running engine. And no
other file under server/ imports vllm.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.engine import vllm_glue

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "server" / "engine" / "vllm_glue.py"


def params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def fields(cls: type) -> set[str]:
    """Field names of a dataclass, a pydantic model or a msgspec struct."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "model_fields"):
        return set(cls.model_fields)
    return set(cls.__struct_fields__)


def model_class(cls: type) -> None:  # AlignerMixin subclasses it and calls __init__(vllm_config=, prefix=)
    assert issubclass(cls, torch.nn.Module)
    sig = inspect.signature(cls.__init__).parameters
    assert sig["vllm_config"].kind is inspect.Parameter.KEYWORD_ONLY and "prefix" in sig


def attention(cls: type) -> None:  # found by isinstance; its forward is wrapped; its attributes are read by install
    assert issubclass(cls, torch.nn.Module)
    assert params(cls.forward)[:4] == ["self", "query", "key", "value"]
    init = inspect.getsource(cls.__init__)
    for attr in ("layer_name", "num_heads", "num_kv_heads", "head_size"):
        assert f"self.{attr} =" in init, attr


def vllm_config(cls: type) -> None:
    assert {"additional_config", "scheduler_config", "model_config"} <= fields(cls)


def tp_rank(fn: Callable) -> None:
    assert callable(fn) and params(fn) == []


def layer_index(fn: Callable) -> None:
    assert fn("model.layers.7.self_attn.attn") == 7


def registry(reg: object) -> None:
    assert callable(reg.register_model) and callable(reg.get_supported_archs)
    assert "LlamaForCausalLM" in reg.get_supported_archs()


def sampling_params(cls: type) -> None:  # routing reads extra_args, which the OpenAI body's vllm_xargs fills
    assert "extra_args" in fields(cls)
    assert cls(extra_args={"aligner": "k"}).extra_args == {"aligner": "k"}


def batch_update(cls: type) -> None:
    assert {"removed", "added", "moved", "batch_size"} <= fields(cls)


def logits_processor(cls: type) -> None:  # AlignerRoutingLP subclasses it
    assert params(cls.__init__) == ["self", "vllm_config", "device", "is_pin_memory"]
    assert params(cls.update_state) == ["self", "batch_update"]
    for method in ("apply", "is_argmax_invariant"):
        assert callable(getattr(cls, method))


def move_directionality(cls: type) -> None:
    assert issubclass(cls, enum.Enum) and {m.name for m in cls} == {"UNIDIRECTIONAL", "SWAP"}


def default_model_state(cls: type) -> None:  # AlignerModelState subclasses it and overrides both hooks
    assert params(cls.add_request) == ["self", "req_index", "new_req_data"]
    assert params(cls.prepare_inputs) == ["self", "input_batch", "req_states"]


def new_request_data(cls: type) -> None:
    assert "sampling_params" in fields(cls)


def input_batch(cls: type) -> None:
    assert {"idx_mapping_np", "query_start_loc_np", "num_reqs"} <= fields(cls)


def forward_context(fn: Callable) -> None:  # called with no arguments, once per layer
    assert params(fn) == []


def forward_context_available(fn: Callable) -> None:
    assert params(fn) == [] and fn() is False  # no forward runs here


def platform(p: object) -> None:
    assert isinstance(p.is_cpu(), bool)


def engine_client(cls: type) -> None:
    assert inspect.iscoroutinefunction(cls.get_supported_tasks)
    for attr in ("errored", "dead_error", "check_health", "collective_rpc"):
        assert hasattr(cls, attr), attr


def init_app_state(fn: Callable) -> None:
    assert inspect.iscoroutinefunction(fn)
    assert params(fn)[:4] == ["engine_client", "state", "args", "supported_tasks"]


def build_async_engine_client(fn: Callable) -> None:  # used as `async with build_async_engine_client(args)`
    assert params(fn)[0] == "args" and inspect.isasyncgenfunction(fn.__wrapped__)


def make_arg_parser(fn: Callable) -> None:
    assert params(fn) == ["parser"]


def flexible_argument_parser(cls: type) -> None:
    assert issubclass(cls, argparse.ArgumentParser)


def openai_request(cls: type) -> None:  # our route bodies subclass it; the engine sets these fields on it
    assert {"cache_salt", "vllm_xargs", "priority", "model", "stream", "stream_options", "n"} <= fields(cls)


def responses_request(cls: type) -> None:  # as openai_request, without n and stream_options
    assert {"cache_salt", "vllm_xargs", "priority", "model", "stream", "input", "max_output_tokens"} <= fields(cls)


def openai_response(cls: type) -> None:
    assert callable(cls.model_dump) and "usage" in fields(cls)


def stream_options(cls: type) -> None:
    assert {"include_usage", "continuous_usage_stats"} <= fields(cls)


def error_response(cls: type) -> None:  # a refusal's message, code (HTTP status) and param are read
    assert "error" in fields(cls)
    assert {"message", "code", "param"} <= fields(cls.model_fields["error"].annotation)


def compilation_config(cls: type) -> None:  # the piecewise fallback reads vLLM's own splitting ops
    assert {"cudagraph_mode", "splitting_ops"} <= fields(cls)
    assert "vllm::unified_attention_with_output" in cls._attention_ops


def tokenize_request(cls: type) -> None:  # our /tokenize bodies subclass it; the engine sets `model`
    assert "model" in fields(cls) and ({"prompt"} <= fields(cls) or {"messages"} <= fields(cls))


def detokenize_request(cls: type) -> None:
    assert {"model", "tokens"} <= fields(cls)


EXPECTED: dict[str, Callable] = {
    "LlamaForCausalLM": model_class,
    "MistralForCausalLM": model_class,
    "Qwen2ForCausalLM": model_class,
    "Qwen3ForCausalLM": model_class,
    "Attention": attention,
    "VllmConfig": vllm_config,
    "get_tensor_model_parallel_rank": tp_rank,
    "extract_layer_index": layer_index,
    "ModelRegistry": registry,
    "SamplingParams": sampling_params,
    "BatchUpdate": batch_update,
    "LogitsProcessor": logits_processor,
    "MoveDirectionality": move_directionality,
    "DefaultModelState": default_model_state,
    "NewRequestData": new_request_data,
    "InputBatch": input_batch,
    "get_forward_context": forward_context,
    "is_forward_context_available": forward_context_available,
    "current_platform": platform,
    "CompilationConfig": compilation_config,
    "EngineClient": engine_client,
    "init_app_state": init_app_state,
    "build_async_engine_client": build_async_engine_client,
    "make_arg_parser": make_arg_parser,
    "FlexibleArgumentParser": flexible_argument_parser,
    "ChatCompletionRequest": openai_request,
    "ChatCompletionResponse": openai_response,
    "CompletionRequest": openai_request,
    "CompletionResponse": openai_response,
    "ResponsesRequest": responses_request,
    "ResponsesResponse": openai_response,
    "StreamOptions": stream_options,
    "ErrorResponse": error_response,
    "TokenizeCompletionRequest": tokenize_request,
    "TokenizeChatRequest": tokenize_request,
    "DetokenizeRequest": detokenize_request,
}


def test_every_name_in_the_table_is_checked() -> None:
    assert set(EXPECTED) == set(vllm_glue.VLLM_NAMES)


@pytest.mark.parametrize("name", list(vllm_glue.VLLM_NAMES))
def test_name_imports_and_is_what_we_rely_on(name: str) -> None:
    value = getattr(vllm_glue, name)
    assert value is getattr(importlib.import_module(vllm_glue.VLLM_NAMES[name]), name)
    EXPECTED[name](value)


def test_all_names_the_table_and_the_helpers() -> None:
    """`__all__` (a literal, for static tools) is the table's names and the module's own public ones."""
    tree = ast.parse(Path(vllm_glue.__file__).read_text())
    own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    own |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    own |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    public = {n for n in own if not n.startswith("_")}
    assert len(vllm_glue.__all__) == len(set(vllm_glue.__all__))
    assert set(vllm_glue.__all__) == set(vllm_glue.VLLM_NAMES) | public


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NotAVllmName'"):
        vllm_glue.NotAVllmName  # noqa: B018


def test_type_checking_imports_match_the_table() -> None:
    """The `if TYPE_CHECKING:` imports (what type checkers see) name exactly the table's vLLM names, from its modules."""
    tree = ast.parse(GLUE.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {
        a.name: n.module
        for n in block.body
        if isinstance(n, ast.ImportFrom) and n.module.split(".")[0] == "vllm"
        for a in n.names
    }
    assert seen == vllm_glue.VLLM_NAMES


# the OpenAI server's names (the glue's last group): its launchers, protocol classes and argument parser
SERVER_MODULES = ("vllm.entrypoints.", "vllm.engine.", "vllm.utils.argparse_utils")
SERVING = {n for n, m in vllm_glue.VLLM_NAMES.items() if m.startswith(SERVER_MODULES)}


def vllm_modules_after(code: str) -> set[str]:
    import subprocess
    import sys

    code += "; import sys; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.strip().splitlines()[-1].split())


def test_the_model_side_does_not_load_the_openai_server() -> None:
    """Workers import the model classes and routers while vLLM builds the model: that must import no more of
    vLLM than the model-side names themselves need, and none of the OpenAI server's launchers."""
    assert {"EngineClient", "ChatCompletionRequest", "FlexibleArgumentParser"} <= SERVING and len(SERVING) == 16
    model_side = sorted({m for n, m in vllm_glue.VLLM_NAMES.items() if n not in SERVING})
    own = vllm_modules_after("import " + ", ".join(model_side))
    ours = vllm_modules_after(
        "import server.engine.model, server.engine.routing_v1, server.engine.routing_v2, "
        "server.engine.worker_ext, server.engine.plugin"
    )
    assert ours <= own, sorted(ours - own)
    assert not any(m.startswith("vllm.entrypoints.launchers") for m in ours)


def test_vllm_version_is_the_pinned_one() -> None:
    import vllm

    assert vllm.__version__.startswith(vllm_glue.VLLM_VERSION)


def imports_vllm(path: Path) -> bool:
    """Whether a source file imports vllm: an import statement anywhere (functions and TYPE_CHECKING blocks
    included), an importlib/__import__ call naming it, or an import line the parser would not see."""
    text = path.read_text()
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "vllm" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
            return True
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] == "vllm":
                return True
    return re.search(r"^\s*(from\s+vllm\b|import\s+vllm\b)", text, re.MULTILINE) is not None


def test_exactly_one_file_under_server_imports_vllm() -> None:
    importers = {str(p.relative_to(REPO)) for p in (REPO / "server").rglob("*.py") if imports_vllm(p)}
    assert importers == {"server/engine/vllm_glue.py"}, importers


def test_the_scan_sees_every_way_of_importing(tmp_path) -> None:
    cases = {
        "import vllm": True,
        "import vllm.config as c": True,
        "def f():\n    from vllm.platforms import current_platform": True,
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vllm import SamplingParams": True,
        "import importlib\nimportlib.import_module('vllm.forward_context')": True,
        "from server.engine.vllm_glue import current_platform": False,
        "x = 'vllm.exceptions'  # a module name compared, not imported": False,
    }
    for i, (source, expected) in enumerate(cases.items()):
        path = tmp_path / f"case{i}.py"
        path.write_text(source + "\n")
        assert imports_vllm(path) is expected, source
