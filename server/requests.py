"""The OpenAI request bodies the API accepts: vLLM's own (with every extension of its API), plus `adapter`.

vLLM's models accept any extra field and drop it (logged at debug level), so a typo (`"adaptor"`) would be
answered by the base model. OpenAI's API refuses an unrecognized request argument with a 400, and so do
these: a top-level key is known when the model reads it (a field's name or alias: vLLM's OpenAI fields, its
extensions such as `top_k`, `structured_outputs`, `chat_template_kwargs`, and our `adapter`), or is one of
the few OpenAI fields vLLM lacks that do not change the answer (`OPENAI_IGNORED`). `adapters` (a stack of
adapters, each at a scale) is ours too."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, model_validator
from pydantic_core import PydanticCustomError

from server.engine.facade import is_vllm_client_error
from server.engine.vllm_glue import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResponsesRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from server.errors import INVALID_REQUEST

# OpenAI request fields that vLLM's models lack and that do not change the answer: accepted, ignored.
OPENAI_IGNORED = frozenset(
    {"metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier"}
)


def invalid_request(message: str, param: str | None = None) -> PydanticCustomError:
    """A validation error with OpenAI's message and `param`, for a request model's validator to raise."""
    return PydanticCustomError(INVALID_REQUEST, "{message}", {"message": message, "param": param})


@cache
def known_fields(model: type[BaseModel]) -> frozenset[str]:
    """The top-level keys `model` reads: each field's aliases, and its name unless an alias replaces it
    (pydantic reads a field that has an alias by its name only under `validate_by_name`), plus
    `OPENAI_IGNORED`."""
    by_name = bool(model.model_config.get("validate_by_name") or model.model_config.get("populate_by_name"))
    names = set(OPENAI_IGNORED)
    for name, field in model.model_fields.items():
        alias = field.validation_alias or field.alias
        if alias is None or by_name:
            names.add(name)
        for choice in alias.choices if isinstance(alias, AliasChoices) else [alias]:
            if isinstance(choice, str):
                names.add(choice)
            elif isinstance(choice, AliasPath) and isinstance(choice.path[0], str):
                names.add(choice.path[0])
    return frozenset(names)


def unrecognized(names: list[str]) -> PydanticCustomError:
    """OpenAI's refusal of unknown request arguments; `param` is the first one."""
    hint = ""
    if any(n.startswith("guided_") for n in names):  # removed from vLLM, which ignores them
        hint = " (vLLM's guided_* fields were removed: use `structured_outputs` or `response_format`)"
    plural = "s" if len(names) > 1 else ""
    return invalid_request(f"Unrecognized request argument{plural} supplied: {', '.join(names)}{hint}", names[0])


class _MalformedIsInvalid(BaseModel):
    """Mixed into our request models. Refuses unknown top-level fields (see the module docstring). vLLM's
    own request validators raise TypeError ("messages": null) or its VLLMValidationError on some malformed
    bodies; pydantic turns only ValueError into a validation error, so re-raise as one: a 400 (naming
    vLLM's `parameter` where it names one)."""

    @model_validator(mode="wrap")
    @classmethod
    def malformed_is_invalid(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
        if isinstance(data, dict):
            known = known_fields(cls)
            unknown = [k for k in data if k not in known]
            if unknown:
                raise unrecognized([str(k) for k in unknown])
        try:
            return handler(data)
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise ValueError(f"malformed request: {e}") from None
        except Exception as e:
            if is_vllm_client_error(e):
                param = getattr(e, "parameter", None)
                raise invalid_request(Exception.__str__(e) if param else str(e), param) from None
            raise


class StackEntry(BaseModel):
    """One entry of a request's `adapters`: an adapter by `name` ("name" or "name@version") or `inline` (the
    base64 of an aligner/v1 file, used once and never stored), at `scale` (finite; bounds: `stacking`)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    inline: str | None = None
    scale: float = Field(1.0, allow_inf_nan=False)


class ChatRequest(_MalformedIsInvalid, ChatCompletionRequest):
    adapter: str | None = None  # "name" or "name@version"; absent: the base model
    adapters: list[StackEntry] | None = None  # a stack, each at its scale (server/stacking.py)


class CompletionsRequest(_MalformedIsInvalid, CompletionRequest):
    adapter: str | None = None
    adapters: list[StackEntry] | None = None


class ResponsesBody(_MalformedIsInvalid, ResponsesRequest):
    adapter: str | None = None
    adapters: list[StackEntry] | None = None


class TokenizeCompletion(_MalformedIsInvalid, TokenizeCompletionRequest):
    adapter: str | None = None  # checked for visibility only: an adapter changes no token


class TokenizeChat(_MalformedIsInvalid, TokenizeChatRequest):
    adapter: str | None = None


class Detokenize(_MalformedIsInvalid, DetokenizeRequest):
    adapter: str | None = None
