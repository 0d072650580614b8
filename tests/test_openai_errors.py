"""OpenAI-exact refusals, in process (no engine): an unknown request argument is a 400 naming it while every
field of vLLM's extended API stays accepted, `param` names the field without pydantic's internals, a body
that is not JSON says so, a 405 carries `Allow`, a 404 names the method and path, and vLLM's own error
`type`s (`BadRequestError`) never reach a client."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import AliasChoices, ConfigDict, Field

from server.engine.facade import RequestRejected, _error_event
from server.errors import error_event, error_response, install_error_handlers
from server.requests import ChatRequest, CompletionsRequest, known_fields

KEYS = {"message", "type", "param", "code"}
MESSAGES = [{"role": "user", "content": "hi"}]


class AliasedRequest(CompletionsRequest):
    """vLLM names no field by alias today; a field that has one is known by the names pydantic reads it by."""

    session: str | None = Field(default=None, alias="session_tag")  # read as session_tag only
    tier: str | None = Field(default=None, validation_alias=AliasChoices("tier", "priority_tier"))


class ByNameRequest(AliasedRequest):
    model_config = ConfigDict(validate_by_name=True)  # session_tag and session


def _app() -> FastAPI:
    """The request models and the error handlers of the real app, on routes that echo what they read."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> dict:
        return body.model_dump(exclude_unset=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionsRequest) -> dict:
        return body.model_dump(exclude_unset=True)

    @app.post("/aliased")
    async def aliased(body: AliasedRequest) -> dict:
        return {"session": body.session, "tier": body.tier}

    @app.post("/by-name")
    async def by_name(body: ByNameRequest) -> dict:
        return {"session": body.session}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {}

    @app.post("/v1/adapters")
    async def create_adapter() -> dict:
        return {}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(_app())


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == KEYS, body
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error"), body
    return body["error"]


def chat(client: TestClient, **fields):
    return client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, **fields})


def test_an_unknown_argument_is_a_400_that_names_it(client: TestClient) -> None:
    err = error(chat(client, adaptor="pirate"), 400)
    assert err == {
        "message": "Unrecognized request argument supplied: adaptor",
        "type": "invalid_request_error",
        "param": "adaptor",
        "code": None,
    }
    err = error(client.post("/v1/completions", json={"model": "m", "prompt": "x", "tempreature": 1}), 400)
    assert (err["param"], err["message"]) == ("tempreature", "Unrecognized request argument supplied: tempreature")


def test_every_unknown_argument_is_named_the_first_in_param(client: TestClient) -> None:
    err = error(chat(client, zeta=1, adaptor="pirate"), 400)
    assert err["param"] == "zeta" and err["message"] == "Unrecognized request arguments supplied: zeta, adaptor"


def test_an_unknown_argument_is_refused_before_anything_else_is_checked(client: TestClient) -> None:
    err = error(client.post("/v1/chat/completions", json={"messages": "not a list", "adaptor": "x"}), 400)
    assert err["param"] == "adaptor"


def test_vllms_removed_guided_fields_are_refused_with_what_replaces_them(client: TestClient) -> None:
    """vLLM drops these silently, so the output would not be constrained at all."""
    err = error(chat(client, guided_json={"type": "object"}), 400)
    assert err["param"] == "guided_json" and "structured_outputs" in err["message"], err


def test_our_adapter_and_vllms_extension_fields_are_accepted(client: TestClient) -> None:
    extensions = {
        "adapter": "pirate@2",
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "structured_outputs": {"regex": "[a-z]+"},
        "chat_template_kwargs": {"enable_thinking": False},
        "vllm_xargs": {"x": 1},
        "priority": 0,
        "return_mm_kwargs": False,  # deprecated, still a field
    }
    r = chat(client, **extensions)
    assert r.status_code == 200, r.text
    got = r.json()
    assert (
        got["adapter"] == "pirate@2" and got["top_k"] == 5 and got["chat_template_kwargs"] == {"enable_thinking": False}
    )
    assert got["structured_outputs"]["regex"] == "[a-z]+"
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "adapter": "a", "top_k": 3, "echo": True})
    assert r.status_code == 200 and r.json()["top_k"] == 3, r.text


def test_every_field_of_vllms_request_models_is_known() -> None:
    from server.engine.vllm_glue import ChatCompletionRequest, CompletionRequest

    assert known_fields(ChatRequest) >= set(ChatCompletionRequest.model_fields) | {"adapter"}
    assert known_fields(CompletionsRequest) >= set(CompletionRequest.model_fields) | {"adapter"}


def test_openai_fields_that_do_not_change_the_answer_are_accepted(client: TestClient) -> None:
    r = chat(client, metadata={"k": "v"}, store=False, service_tier="auto", prompt_cache_key="c", safety_identifier="u")
    assert r.status_code == 200, r.text


def test_a_field_is_known_by_the_names_pydantic_reads_it_by(client: TestClient) -> None:
    for extra in ({"session_tag": "s", "priority_tier": "t"}, {"session_tag": "s", "tier": "t"}):
        r = client.post("/aliased", json={"model": "m", "prompt": "x", **extra})
        assert r.status_code == 200 and r.json() == {"session": "s", "tier": "t"}, r.text
    # without validate_by_name pydantic would not read `session`: refused, not silently dropped
    r = client.post("/aliased", json={"model": "m", "prompt": "x", "session": "s"})
    assert error(r, 400)["param"] == "session"
    for extra in ({"session_tag": "s"}, {"session": "s"}):
        r = client.post("/by-name", json={"model": "m", "prompt": "x", **extra})
        assert r.status_code == 200 and r.json() == {"session": "s"}, r.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": 1}}, "response_format.type"),  # was response_format.function-wrap[...].type
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),  # was ...ParamName.content.str
        ({"response_format": {"type": "json_schema", "json_schema": {"name": 5}}}, "response_format.json_schema.name"),
        ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),  # a missing field
        ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"logit_bias": {"12": "x"}}, "logit_bias.12"),
    ],
)
def test_param_names_the_field_without_pydantic_internals(client: TestClient, fields: dict, param: str) -> None:
    err = error(chat(client, **fields), 400)
    assert err["param"] == param and err["message"].startswith(param + ": "), err
    assert not any(c in err["param"] for c in "()-") and "Param" not in err["param"], err


def test_a_completions_prompt_of_the_wrong_type_names_prompt(client: TestClient) -> None:
    err = error(client.post("/v1/completions", json={"model": "m", "prompt": {"a": 1}}), 400)
    assert err["param"] == "prompt", err  # was prompt.list[constrained-int]


def test_param_without_the_body_drops_what_looks_like_pydantic_internals() -> None:
    loc = ("body", "response_format", "function-wrap[__log_extra_fields__()]", "type")
    exc = RequestValidationError([{"loc": loc, "msg": "bad", "type": "literal_error"}])
    assert json.loads(error_response(exc).body)["error"]["param"] == "response_format.type"
    loc = ("body", "messages", 0, "ChatCompletionUserMessageParam", "content", "str")
    exc = RequestValidationError([{"loc": loc, "msg": "bad", "type": "string_type"}])
    assert json.loads(error_response(exc).body)["error"]["param"] == "messages[0].content"


def test_vllms_own_validation_errors_name_their_parameter(client: TestClient) -> None:
    err = error(chat(client, stream=False, stream_options={"include_usage": True}), 400)
    assert err["param"] == "stream_options" and "(parameter=" not in err["message"], err
    assert not err["message"].startswith("Value error"), err


@pytest.mark.parametrize("raw", [b'{"model": "m", "messages": [', b'{"model": "m"} trailing', b"{'model': 'm'}"])
def test_a_body_that_is_not_json_says_so_and_names_no_param(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = error(r, 400)
    assert err["param"] is None and err["message"].startswith("The request body is not valid JSON"), err


def test_a_body_that_is_no_object_or_missing_says_so(client: TestClient) -> None:
    err = error(client.post("/v1/chat/completions", json=[1, 2]), 400)
    assert err["param"] is None and err["message"] == "The request body must be a JSON object.", err
    r = client.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert error(r, 400)["message"] == "The request body is missing; send a JSON object."


def test_a_405_carries_allow_with_every_method_of_the_path(client: TestClient) -> None:
    r = client.get("/v1/chat/completions")
    err = error(r, 405)
    assert r.headers["allow"] == "POST"
    assert err["message"] == "Method not allowed (GET /v1/chat/completions); allowed: POST", err
    r = client.delete("/v1/adapters")  # two routes, one per method: Starlette's own Allow named only the first
    assert error(r, 405)["message"].endswith("allowed: GET, POST") and r.headers["allow"] == "GET, POST"


def test_a_404_names_the_method_and_path(client: TestClient) -> None:
    err = error(client.post("/v1/nope?x=1"), 404)
    assert err == {
        "message": "Invalid URL (POST /v1/nope)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_the_real_apps_routing_errors() -> None:
    """Routing answers before any dependency, so the app needs no lifespan (no engine, no store) here."""
    from server.app import create_app
    from server.settings import Settings

    real = TestClient(create_app(Settings(admin_key="k" * 40)))
    r = real.get("/v1/chat/completions")
    assert error(r, 405)["message"].endswith("allowed: POST") and r.headers["allow"] == "POST"
    r = real.put("/v1/adapters")
    assert r.headers["allow"] == "GET, POST", r.headers
    assert error(real.get("/v1/nope"), 404)["message"] == "Invalid URL (GET /v1/nope)"


def test_vllms_error_types_never_reach_a_client() -> None:
    """vLLM's refusals carry its exception names as `type`; the client sees OpenAI's type of the status."""
    for vllm_type, status, openai_type in [
        ("BadRequestError", 400, "invalid_request_error"),
        ("NotFoundError", 404, "invalid_request_error"),
        ("InternalServerError", 500, "server_error"),
    ]:
        chunk = "data: " + json.dumps({"error": {"message": "no", "type": vllm_type, "param": "n", "code": status}})
        rejected = _error_event(chunk + "\n\n")
        assert isinstance(rejected, RequestRejected)
        response = error_response(rejected)
        body = json.loads(response.body)["error"]
        assert response.status_code == status and body["type"] == openai_type and body["param"] == "n", body
        streamed = json.loads(error_event(rejected).removeprefix("data: "))["error"]
        assert streamed["type"] == openai_type and streamed["code"] == status, streamed
