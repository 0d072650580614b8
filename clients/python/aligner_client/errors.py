"""The client's exceptions; the tree is drawn in the package docstring (`aligner_client.__doc__`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class AlignerError(Exception):
    """Root of every exception the SDK raises."""


class APIError(AlignerError):
    """The server answered with an error: `{"error": {"message", "type", "param", "code"}}`."""

    status: int | None
    code: str | None
    type: str | None
    param: str | None
    message: str
    retry_after: float | None
    body: Any

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.type, self.param = message, status, code, type, param
        self.retry_after, self.body, self.headers = retry_after, body, dict(headers or {})

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        code = f" [{self.code}]" if self.code else ""
        return f"{where}{self.message}{code}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class BadRequestError(APIError):
    """400: a malformed request (bad name, bad JSON, missing field)."""


class AuthenticationError(APIError):
    """401 invalid_api_key: missing or wrong key."""


class PermissionDeniedError(APIError):
    """403 permission_denied (e.g. the admin API on an open-mode server)."""


class NotFoundError(APIError):
    """404: model_not_found, not_found (tenants, keys), or an adapter (see AdapterNotFoundError)."""


class AdapterNotFoundError(NotFoundError):
    """404 adapter_not_found: missing, deleted, or another tenant's adapter (they look the same)."""


class ConflictError(APIError):
    """409 conflict."""


class PayloadTooLargeError(APIError):
    """413 file_too_large."""


class InvalidAdapterError(APIError):
    """422 invalid_adapter or base_model_mismatch: the server refused the adapter file."""


class RateLimitError(APIError):
    """429 rate_limit_exceeded or quota_exceeded; `retry_after` holds the server's Retry-After."""


class InternalServerError(APIError):
    """500 and other 5xx answers without a more specific class."""


class ServiceUnavailableError(InternalServerError):
    """503 store_unavailable / engine_busy / engine_not_ready."""


class APIConnectionError(AlignerError):
    """No answer: the server could not be reached, or the connection broke."""

    def __init__(self, message: str = "Connection error.") -> None:
        super().__init__(message)
        self.message = message


class APITimeoutError(APIConnectionError):
    """The request timed out."""

    def __init__(self, message: str = "Request timed out.") -> None:
        super().__init__(message)


class WaitTimeoutError(AlignerError):
    """`fine_tuning.jobs.wait` gave up: the job had not finished in time. `job` is the job as last seen; it
    runs on (cancel it to stop it)."""

    def __init__(self, message: str, *, job: Any = None) -> None:
        super().__init__(message)
        self.message, self.job = message, job


STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidAdapterError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
CODE_ERRORS: dict[str, type[APIError]] = {"adapter_not_found": AdapterNotFoundError}

__all__ = [
    "AlignerError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "AdapterNotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "InvalidAdapterError",
    "RateLimitError",
    "InternalServerError",
    "ServiceUnavailableError",
    "APIConnectionError",
    "APITimeoutError",
    "WaitTimeoutError",
]
