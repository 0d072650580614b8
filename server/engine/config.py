"""Engine-side Aligner settings, carried to every worker in vLLM's `additional_config["aligner"]`; the model's
context length as vLLM derives it; and vLLM's own flag parser as `aligner serve` uses it (imported on use)."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

# The key of SamplingParams.extra_args that carries a request's adapter (its content hash) to the worker.
EXTRA_ARGS_KEY = "aligner"
STACK_SEP = "+"  # joins the engine keys of a stack into one routing key (keys are hex digests and scales)
SCALE_SEP = "*"  # between an adapter's content hash and its scale in a scaled adapter's engine key


def scaled_key(key: str, scale: float) -> str:
    """The engine key of adapter `key` at `scale` (1.0: `key` itself, the plain adapter): its own table
    entry, loaded with its gates times the scale."""
    return key if scale == 1.0 else f"{key}{SCALE_SEP}{scale!r}"


def stack_key(keys: list[str]) -> str:
    """The routing key of a stack of engine keys, in lane order (`op.WorkerState.assign` splits it)."""
    if any(STACK_SEP in k for k in keys):
        raise ValueError(f"an engine key may not contain {STACK_SEP!r}")
    return STACK_SEP.join(keys)


@dataclass(frozen=True)
class AlignerEngineConfig:
    max_slots: int = 64  # hot adapters: per-layer K_p/V_p precomputed
    cold_slots: int = 0  # further resident adapters kept as raw P and gates, projected on the fly
    max_tokens: int = 16  # largest N (prefix tokens) an adapter may have
    max_stack: int = 4  # most adapters one request may stack: the routing's lanes (one kernel call each in use)
    path: str = "auto"  # "auto", "torch", "triton" or "cpu": see server/engine/kernels PATHS
    routing: str = "v1"  # the runner's routing tracker, "v1" or "v2" (set by the engine options, not a user setting)

    def to_additional_config(self) -> dict[str, Any]:
        return {"aligner": asdict(self)}

    @classmethod
    def from_additional_config(cls, additional: dict[str, Any] | None) -> AlignerEngineConfig:
        return cls(**((additional or {}).get("aligner") or {}))


# ---- the model's context length, as vLLM derives it from config.json ----

# vLLM 0.32's keys (ModelArchConfigConvertor.derive_max_model_len_and_key): the smallest one present wins,
# except `model_max_length`, which wins whenever it is set.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "model_max_length",
    "max_target_positions",
    "max_sequence_length",
    "max_seq_length",
    "seq_len",
)
# RoPE types whose `factor` vLLM does not apply again (max_position_embeddings is already scaled)
_PRESCALED_ROPE = {"su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"}


def model_context_length(config: dict[str, Any]) -> tuple[int, str] | None:
    """(the model's context length, the config.json key it comes from), derived as vLLM 0.32 derives its
    default max_model_len (`_get_and_verify_max_len`): the smallest length key, `model_max_length` if set,
    times the RoPE scaling factor where one applies. None: config.json names no length (vLLM assumes 2048)."""
    text = config.get("text_config") or config
    found = {key: text[key] for key in CONTEXT_KEYS if isinstance(text.get(key), (int, float))}
    if not found:
        return None
    key = "model_max_length" if text.get("model_max_length") else min(found, key=lambda k: found[k])
    length = float(found[key])
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if isinstance(rope, dict) and "gemma3" not in str(text.get("model_type", "")):
        per_layer = [r for r in rope.values() if isinstance(r, dict)] or [rope]
        factor = 1.0
        for params in per_layer:
            if (params.get("rope_type") or params.get("type") or "default") not in _PRESCALED_ROPE:
                factor = params.get("factor", factor) or 1.0
        length *= factor
    return int(length), key


# ---- vLLM's own command-line parser, for `aligner serve` and ALIGNER_ENGINE_ARGS ----


class FlagError(ValueError):
    """vLLM's parser refused a flag; the message is its own ("unrecognized arguments: --frob")."""


class EngineFlags:
    """`vllm serve`'s parser (vLLM's own, so every vLLM flag and form works: `--max_model_len=4k`,
    `--hf-overrides.key value`, `--config file.yaml`), reporting only what an argv sets explicitly."""

    def __init__(self) -> None:
        from server.engine import vllm_glue

        parser = vllm_glue.engine_arg_parser(prog="aligner serve")
        for action in parser._actions:  # an unset flag leaves no attribute: what is left was given
            action.default = argparse.SUPPRESS
        parser.error = self._refuse  # type: ignore[method-assign]
        self._parser = parser

    @staticmethod
    def _refuse(message: str) -> NoReturn:
        raise FlagError(message)

    def given(self, argv: list[str]) -> dict[str, Any]:
        """{argparse dest: value} of every setting `argv` gives (positional MODEL is `model_tag`)."""
        return vars(self._parser.parse_args(list(argv)))

    def without(self, argv: list[str], dest: str) -> list[str] | None:
        """`argv` less the tokens that give `dest` (every occurrence), the rest unchanged; None where they
        cannot be told apart (e.g. it comes from a --config file)."""
        argv = list(argv)
        action = next((a for a in self._parser._actions if a.dest == dest), None)
        while action is not None:
            given = self.given(argv)
            if dest not in given:
                return argv
            rest = {k: v for k, v in given.items() if k != dest}
            for start, count in self._candidates(argv, action, given[dest]):
                shorter = argv[:start] + argv[start + count :]
                try:
                    left = self.given(shorter)
                except FlagError:
                    continue
                if {k: v for k, v in left.items() if k != dest} == rest:
                    argv = shorter
                    break
            else:
                return None
        return argv

    @staticmethod
    def _candidates(argv: list[str], action: argparse.Action, value: Any) -> list[tuple[int, int]]:
        """(start, length) of each token run that may be `action` with its value."""
        if not action.option_strings:  # the positional MODEL
            return [(i, 1) for i, token in enumerate(argv) if token == value]
        found = []
        for i, token in enumerate(argv):
            if not token.startswith("--"):
                continue
            key = token.split("=", 1)[0].replace("_", "-")
            if any(opt.startswith(key) and len(key) > 2 for opt in action.option_strings):
                found.append((i, 1 if "=" in token or action.nargs == 0 else 2))
        return found

    def help(self, token: str) -> NoReturn:
        """Print vLLM's own help for `token` (`--help`, `--help=all`, `--help=GROUP`, `--help=FLAG`), then exit."""
        from server.engine import vllm_glue

        parser = vllm_glue.engine_arg_parser(prog="aligner serve", usage="aligner serve [MODEL] [options]")
        parser.epilog = (
            "For full list:   aligner serve --help=all\n"
            "For a section:   aligner serve --help=ModelConfig    (case-insensitive)\n"
            "For a flag:      aligner serve --help=max-model-len  (_ or - accepted)\n"
        )
        parser.parse_args([token])
        raise SystemExit(0)
