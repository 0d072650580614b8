"""API errors, and the one place where every error becomes an OpenAI-shaped JSON response.

    APIError                       {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest      400    invalid_request_error
    ├── Unauthorized        401    invalid_api_key
    ├── PermissionDenied    403    permission_denied
    ├── AdapterNotFound     404    adapter_not_found (another tenant's adapter answers exactly the same)
    ├── ModelNotFound       404    model_not_found
    ├── NotFoundError       404    not_found (tenants, keys)
    ├── ConflictError       409    conflict
    ├── PayloadTooLarge     413    file_too_large
    ├── InvalidAdapter      422    invalid_adapter / base_model_mismatch
    ├── RateLimited         429    rate_limit_exceeded / quota_exceeded (with Retry-After)
    └── ServiceUnavailable  503    store_unavailable / engine_busy / engine_not_ready (with Retry-After)

Errors of the other packages (`adapters_store`, `aligner_core`, the engine facade) are mapped here too,
so routes raise or let propagate and never build error bodies themselves.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import Conflict, NotFound, QuotaExceeded, StoreError, StoreUnavailable
from aligner_core.errors import AdapterFormatError, AdapterMismatch

log = logging.getLogger("aligner.server")


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.headers = message, param, headers
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status, type, code = 400, "invalid_request_error", None


class Unauthorized(APIError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class PermissionDenied(APIError):
    status, type, code = 403, "invalid_request_error", "permission_denied"


class AdapterNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "adapter_not_found"

    @classmethod
    def named(cls, name: str) -> AdapterNotFound:
        return cls(f"The adapter '{name}' does not exist or you do not have access to it.", param="adapter")


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFoundError(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ConflictError(APIError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "file_too_large"


class InvalidAdapter(APIError):
    status, type, code = 422, "invalid_request_error", "invalid_adapter"


class RateLimited(APIError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param, headers={"Retry-After": str(retry_after)})


class ServiceUnavailable(APIError):
    status, type, code = 503, "server_error", "service_unavailable"

    def __init__(self, message: str, *, code: str, retry_after: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def to_api_error(exc: Exception) -> APIError:
    """Map any package's error to the API error the client sees."""
    from server.engine.facade import EngineBusy, EngineNotReady

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, Conflict):
        return ConflictError(str(exc))
    if isinstance(exc, QuotaExceeded):
        return RateLimited(
            f"Quota exceeded: {exc.limit_name} is limited to {exc.limit} (currently {exc.current}); delete adapters first.",
            retry_after=60, code="quota_exceeded", param="file",
        )
    if isinstance(exc, StoreUnavailable):
        return ServiceUnavailable("The adapter store is unavailable; retry shortly.", code="store_unavailable")
    if isinstance(exc, AdapterMismatch):
        return InvalidAdapter(exc.message, param=exc.param, code="base_model_mismatch")
    if isinstance(exc, AdapterFormatError):
        return InvalidAdapter(exc.message, param=exc.param)
    if isinstance(exc, EngineBusy):
        return ServiceUnavailable(str(exc), code="engine_busy")
    if isinstance(exc, EngineNotReady):
        return ServiceUnavailable(str(exc), code="engine_not_ready", retry_after=5)
    if is_vllm_client_error(exc):
        return InvalidRequest(str(exc), param=getattr(exc, "parameter", None))
    if isinstance(exc, StoreError):
        log.exception("store error")
        return APIError("The adapter store failed.")
    log.exception("unhandled error", exc_info=exc)
    return APIError("The server had an error while processing your request.")


def is_vllm_client_error(exc: Exception) -> bool:
    """vLLM's errors caused by the request (its `VLLMClientError` family, e.g. an empty chat), which vLLM's
    own server answers with a 4xx. Matched by name: only `server.engine` imports vLLM."""
    return any(c.__name__ == "VLLMClientError" and c.__module__ == "vllm.exceptions" for c in type(exc).__mro__)


def bad_request_from_vllm(exc: Exception, *, constraint_param: str | None = None) -> InvalidRequest | None:
    """The 400 for an exception that vLLM's serving code raised on a bad request, else None.

    vLLM's own server answers its `VLLMClientError` family and, for code not yet migrated to it, a plain
    ValueError, TypeError or OverflowError (e.g. an audio part sent to a text-only model) with a 400.
    `constraint_param` names the request field holding a structured-output constraint: vLLM's errors from
    compiling it (a regex with a lookbehind, a `$ref` to nothing) name no parameter themselves."""
    if isinstance(exc, (ValueError, TypeError, OverflowError)) or is_vllm_client_error(exc):
        param = getattr(exc, "parameter", None)
        if param is None and constraint_param is not None and _raised_checking_structured_outputs(exc):
            param = constraint_param
        return InvalidRequest(str(exc)[:2000], param=param)
    return None


def _raised_checking_structured_outputs(exc: BaseException) -> bool:
    """Whether vLLM raised `exc` in `SamplingParams._validate_structured_outputs` (where the grammar backends
    compile a request's constraint); matched by frame, as the messages differ per backend."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_validate_structured_outputs":
            return True
        tb = tb.tb_next
    return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        msg = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return error_response(InvalidRequest(msg, param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(str(exc.detail))
        err.status, err.type, err.code = exc.status_code, "invalid_request_error", None
        return error_response(err)

    from server.engine.facade import EngineError

    # Errors we answer are handled here; only the catch-all `Exception` handler also re-raises into the
    # server (which logs a traceback and may drop the connection), so each of our roots is listed.
    for cls in (APIError, StoreError, AdapterFormatError, EngineError):
        app.add_exception_handler(cls, _any)
