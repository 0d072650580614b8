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
propagate and never build error bodies themselves.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status


def to_api_error(exc: BaseException) -> APIError:
    """Map any error to the API error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        return InvalidRequest(
            f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}", param=".".join(loc) or None
        )
    if isinstance(exc, StarletteHTTPException):
        return StatusError(str(exc.detail), status=exc.status_code)
    if isinstance(exc, NotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, Conflict):
        return ConflictError(str(exc))
    if isinstance(exc, QuotaExceeded):
        return RateLimited(
            f"Quota exceeded: {exc.limit_name} is limited to {exc.limit} (currently {exc.current}); delete adapters first.",
            retry_after=60,
            code="quota_exceeded",
            param="file",
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


def error_response(err: BaseException) -> JSONResponse:
    api = to_api_error(err)
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
        return error_response(exc)

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
