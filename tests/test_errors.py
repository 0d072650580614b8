"""The one error map: every error, ours, the store's, the engine's, vLLM's and the web framework's, in
OpenAI's shape with OpenAI's `type` for its status."""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from adapters_store import Conflict, NotFound, QuotaExceeded, StoreUnavailable
from server.engine.facade import EngineBusy, EngineNotReady, RequestRejected
from server.errors import APIError, RateLimited, Unauthorized, error_event, error_response

KEYS = {"message", "type", "param", "code"}


def answer(exc: BaseException) -> tuple[int, dict]:
    response = error_response(exc)
    body = json.loads(response.body)
    assert set(body) == {"error"} and set(body["error"]) == KEYS, body
    return response.status_code, body["error"]


def test_every_error_answers_openai_shape_with_the_type_of_its_status() -> None:
    cases = {
        Unauthorized("no key"): (401, "invalid_request_error", "invalid_api_key"),
        NotFound("gone"): (404, "invalid_request_error", "not_found"),
        Conflict("taken"): (409, "invalid_request_error", "conflict"),
        QuotaExceeded("max_adapters", 1, 1, "full"): (429, "rate_limit_error", "quota_exceeded"),
        StoreUnavailable("down"): (503, "server_error", "store_unavailable"),
        EngineBusy("slots"): (503, "server_error", "engine_busy"),
        EngineNotReady("stopped"): (503, "server_error", "engine_not_ready"),
        RequestRejected("bad regex", status=400, param="structured_outputs"): (400, "invalid_request_error", None),
        RequestRejected("no such thing", status=404): (404, "invalid_request_error", None),
        HTTPException(405, "Method Not Allowed"): (405, "invalid_request_error", None),
        RuntimeError("bug"): (500, "server_error", "internal_error"),
    }
    for exc, (status, type_, code) in cases.items():
        got, err = answer(exc)
        assert (got, err["type"], err["code"]) == (status, type_, code), (exc, err)
    assert (
        answer(RequestRejected("bad regex", status=400, param="structured_outputs"))[1]["param"] == "structured_outputs"
    )
    assert answer(EngineBusy("slots"))[1]["param"] == "adapter"


def test_a_validation_error_names_its_field() -> None:
    exc = RequestValidationError([{"loc": ("body", "max_tokens"), "msg": "must be positive", "type": "value_error"}])
    status, err = answer(exc)
    assert (status, err["param"], err["message"]) == (400, "max_tokens", "max_tokens: must be positive")


def test_retry_after_travels_as_a_header() -> None:
    response = error_response(RateLimited("slow down", retry_after=7))
    assert response.status_code == 429 and response.headers["retry-after"] == "7"


def test_a_stream_error_event_carries_the_status_when_it_has_no_code() -> None:
    died = json.loads(error_event(RequestRejected("engine died", status=500)).removeprefix("data: "))["error"]
    assert died == {"message": "engine died", "type": "server_error", "param": None, "code": 500}
    revoked = json.loads(error_event(Unauthorized("revoked")).removeprefix("data: "))["error"]
    assert revoked["code"] == "invalid_api_key" and revoked["type"] == "invalid_request_error"


def test_a_new_api_error_names_status_and_code_once() -> None:
    class Gone(APIError, status=410, code="gone"):
        pass

    assert Gone("bye").body() == {
        "error": {"message": "bye", "type": "invalid_request_error", "param": None, "code": "gone"}
    }
