"""API errors, and the one place where every error becomes OpenAI's error shape.

    APIError                       {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest      400    code None
    ├── Unauthorized        401    invalid_api_key
    ├── PermissionDenied    403    permission_denied
    ├── AdapterNotFound     404    adapter_not_found (another tenant's adapter answers exactly the same)
    ├── ModelNotFound       404    model_not_found
    ├── NotFoundError       404    not_found (tenants, keys)
    ├── ConflictError       409    conflict
    ├── PayloadTooLarge     413    file_too_large / request_too_large
    ├── InvalidAdapter      422    invalid_adapter / base_model_mismatch
    ├── RateLimited         429    rate_limit_exceeded / quota_exceeded / a fair-share limit (with Retry-After)
    ├── ServiceUnavailable  503    store_unavailable / engine_busy / engine_not_ready (with Retry-After)
    └── StatusError         any    code None: a status chosen elsewhere (Starlette's routing, vLLM's refusals)

The `type` follows the status as in OpenAI's API: `rate_limit_error` for 429, `server_error` for 5xx,
`invalid_request_error` for every other 4xx. `to_api_error` maps the errors of the other packages
(`adapters_store`, `aligner_core`, the engine, vLLM's, FastAPI's and Starlette's), so routes raise or let
propagate and never build error bodies themselves. vLLM's own error `type`s (`BadRequestError`, ...) never
reach a client: its refusals arrive as `RequestRejected` and get the `type` of their status here.

`param` names the request field at fault in OpenAI's style, `messages[0].content`, `response_format.type`:
object keys joined by dots, list indices in brackets, without the segments pydantic adds to an error's
`loc` (validators such as `function-wrap[...]`, union members such as `str` or a TypedDict's class name). A
body that is not valid JSON has `param` None (and a message that says so). Routing errors name the request,
as OpenAI's do: a 404 for an unknown path is `Invalid URL (GET /v1/nope)`; a 405 carries `Allow` with every
method of the path, and names them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from adapters_store import Conflict, NotFound, QuotaExceeded, StoreError, StoreUnavailable
from aligner_core.errors import AdapterFormatError, AdapterMismatch
from server.engine.facade import EngineBusy, EngineError, EngineNotReady, RequestRejected, is_vllm_client_error

log = logging.getLogger("aligner.server")


def openai_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """Each subclass names its status and code: `class Gone(APIError, status=410, code="gone")`."""

    status = 500
    code: str | None = "internal_error"

    def __init_subclass__(cls, *, status: int, code: str | None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.status, cls.code = status, code

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.headers = message, param, headers
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": openai_type(self.status), "param": self.param, "code": self.code}
        }


class InvalidRequest(APIError, status=400, code=None):
    """The request is malformed or asks for something impossible; `param` names the field."""


class Unauthorized(APIError, status=401, code="invalid_api_key"):
    """No credential, an unknown one, or a key revoked while its request ran."""


class PermissionDenied(APIError, status=403, code="permission_denied"):
    """The credential is valid, the action is not open to it."""


class AdapterNotFound(APIError, status=404, code="adapter_not_found"):
    @classmethod
    def named(cls, name: str) -> AdapterNotFound:
        return cls(f"The adapter '{name}' does not exist or you do not have access to it.", param="adapter")


class ModelNotFound(APIError, status=404, code="model_not_found"):
    """An adapter named through `model`, which the tenant cannot use."""

    @classmethod
    def named(cls, name: str) -> ModelNotFound:
        return cls(f"The model '{name}' does not exist or you do not have access to it.", param="model")


class NotFoundError(APIError, status=404, code="not_found"):
    """A tenant or an API key."""


class ConflictError(APIError, status=409, code="conflict"):
    """A write collided with existing data."""


class PayloadTooLarge(APIError, status=413, code="file_too_large"):
    """A body or an adapter file over its limit."""


class InvalidAdapter(APIError, status=422, code="invalid_adapter"):
    """An adapter file that was read but cannot serve this model."""


class RateLimited(APIError, status=429, code="rate_limit_exceeded"):
    limit: str | None = None  # the fair-share limit that refused the request (set by fair_share)

    def __init__(self, message: str, *, retry_after: int, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param, headers={"Retry-After": str(retry_after)})


class ServiceUnavailable(APIError, status=503, code="service_unavailable"):
    def __init__(self, message: str, *, code: str, retry_after: int = 1, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param, headers={"Retry-After": str(retry_after)})


class StatusError(APIError, status=500, code=None):
    def __init__(
        self, message: str, *, status: int, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, param=param, headers=headers)
        self.status = status


# The pydantic error type of a refusal that a request model's validator builds (`server.requests`): its
# `ctx` holds OpenAI's `message` and `param`.
INVALID_REQUEST = "invalid_request"
_SOURCES = ("body", "query", "path", "header", "cookie")  # the first segment of a FastAPI error's `loc`
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "tuple", "set", "frozenset", "bytes", "none", "any"}
_ROOT_OBJECT_ERRORS = {"model_attributes_type", "model_type", "dict_type"}  # the body is no JSON object


def _is_tag(segment: object) -> bool:
    """A segment pydantic adds to a `loc` that is no field: a validator (`function-wrap[...]`), a union
    member (`str`, `list[constrained-int]`, `ChatCompletionUserMessageParam`), a dict key's `[key]`."""
    return isinstance(segment, str) and (
        not segment or re.search(r"[\[\](){}\-]", segment) is not None or segment[0].isupper() or segment in _TYPE_TAGS
    )


def _field_path(loc: Sequence[Any], body: Any, missing: bool) -> list[str | int]:
    """The fields and indices of `loc` that address the request. Where the body is at hand, a segment
    counts when it indexes into the body (so no union tag is mistaken for a field); a missing field, the
    last segment, cannot, and counts unless it looks like a tag. Without the body, tag-like segments go."""
    segments = list(loc)
    source = segments.pop(0) if segments and segments[0] in _SOURCES else None
    if source != "body" or not isinstance(body, (dict, list)):
        return [s for s in segments if not _is_tag(s)]
    path: list[str | int] = []
    node = body
    for i, segment in enumerate(segments):
        if isinstance(node, dict) and isinstance(segment, str) and segment in node:
            node = node[segment]
        elif isinstance(node, list) and type(segment) is int and -len(node) <= segment < len(node):
            node = node[segment]
        elif not (missing and i == len(segments) - 1 and not _is_tag(segment)):
            continue
        path.append(segment)
    return path


def param_name(path: Sequence[str | int]) -> str | None:
    """`["messages", 0, "content"]` as OpenAI writes it: `messages[0].content`."""
    name = ""
    for segment in path:
        name += f"[{segment}]" if isinstance(segment, int) else f".{segment}" if name else str(segment)
    return name or None


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation error (its first error) as a 400 naming the field at fault."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind, loc, ctx = first.get("type"), first.get("loc", ()), first.get("ctx") or {}
    if kind == "json_invalid":
        where = f" (at character {loc[1]})" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return InvalidRequest(f"The request body is not valid JSON: {ctx.get('error', 'JSON decode error')}{where}.")
    if kind == INVALID_REQUEST:
        return InvalidRequest(str(ctx.get("message")), param=ctx.get("param"))
    param = param_name(_field_path(loc, getattr(exc, "body", None), kind == "missing"))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param is None and tuple(loc) == ("body",):
        if kind == "missing":
            msg = "The request body is missing; send a JSON object."
        elif kind in _ROOT_OBJECT_ERRORS:
            msg = "The request body must be a JSON object."
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at the request's path. Starlette's own `Allow` lists only
    the first route matching the path, and FastAPI makes one route per method (GET and POST /v1/adapters)."""
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        if getattr(route, "methods", None) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _routing_error(exc: StarletteHTTPException, request: Request | None) -> APIError:
    """Starlette's HTTPException: its status, detail and headers (`Allow` on a 405); the router's own 404
    and 405 name the request's method and path, and a 405's `Allow` lists every method of the path."""
    message, headers = str(exc.detail), dict(exc.headers) if exc.headers else None
    if request is not None:
        route = f"{request.method} {request.url.path[:512]}"
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"Invalid URL ({route})"
        elif exc.status_code == 405 and exc.detail == "Method Not Allowed":
            headers = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
            allowed = ", ".join(_allowed_methods(request)) or (exc.headers or {}).get("Allow")
            if allowed:
                headers["Allow"] = allowed
            message = f"Method not allowed ({route})" + (f"; allowed: {allowed}" if allowed else "")
    return StatusError(message, status=exc.status_code, headers=headers)


#: What to do about a store quota, and the request field it concerns (adapter quotas: the default).
_QUOTA_HINTS = {
    "max_files": ("delete files first", "file"),
    "max_file_bytes": ("delete files first", "file"),
    "max_queued_jobs": ("wait for a job to finish, or cancel one", None),
    "max_training_tokens": ("ask the operator for more", "training_file"),
}


def to_api_error(exc: BaseException, request: Request | None = None) -> APIError:
    """Map any error to the API error the client sees (`request`, where known, is named in routing errors)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        return _routing_error(exc, request)
    if isinstance(exc, NotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, Conflict):
        return ConflictError(str(exc))
    if isinstance(exc, QuotaExceeded):
        hint, param = _QUOTA_HINTS.get(exc.limit_name, ("delete adapters first", "file"))
        return RateLimited(
            f"Quota exceeded: {exc.limit_name} is limited to {exc.limit} (currently {exc.current}); {hint}.",
            retry_after=60,
            code="quota_exceeded",
            param=param,
        )
    if isinstance(exc, StoreUnavailable):
        return ServiceUnavailable("The adapter store is unavailable; retry shortly.", code="store_unavailable")
    if isinstance(exc, AdapterMismatch):
        return InvalidAdapter(exc.message, param=exc.param, code="base_model_mismatch")
    if isinstance(exc, AdapterFormatError):
        return InvalidAdapter(exc.message, param=exc.param)
    if isinstance(exc, RequestRejected):
        return StatusError(exc.message, status=exc.status, param=exc.param)
    if isinstance(exc, EngineBusy):
        return ServiceUnavailable(str(exc), code="engine_busy", param="adapter")
    if isinstance(exc, EngineNotReady):
        return ServiceUnavailable(str(exc), code="engine_not_ready", retry_after=5)
    if is_vllm_client_error(exc):
        return InvalidRequest(str(exc), param=getattr(exc, "parameter", None))
    if isinstance(exc, StoreError):
        log.exception("store error", exc_info=exc)
        return APIError("The adapter store failed.")
    log.exception("unhandled error", exc_info=exc)
    return APIError("The server had an error while processing your request.")


def error_response(err: BaseException, request: Request | None = None) -> JSONResponse:
    api = to_api_error(err, request)
    return JSONResponse(api.body(), status_code=api.status, headers=api.headers)


def error_event(err: BaseException) -> str:
    """The SSE event that ends a stream with `err`. The stream's 200 went out already, so an error without a
    code of its own carries its status as `code`, as vLLM's own error events do (the client SDK reads it)."""
    api = to_api_error(err)
    body = api.body()
    if body["error"]["code"] is None:
        body["error"]["code"] = api.status
    return "data: " + json.dumps(body) + "\n\n"


def install_error_handlers(app: FastAPI) -> None:
    async def answer(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, request)

    # Only the catch-all `Exception` handler also re-raises into the server (which logs a traceback and may
    # drop the connection), so each error we answer on purpose is listed.
    for cls in (
        Exception,
        RequestValidationError,
        StarletteHTTPException,
        APIError,
        StoreError,
        AdapterFormatError,
        EngineError,
    ):
        app.add_exception_handler(cls, answer)
