"""Tool calling out of the box on SmolLM2: the preset's chat template (its ChatML plus Hermes-style tools), vLLM's
hermes parser, and every forced call's arguments held to its tool's JSON schema (`--tool-strict-level
parameter`: vLLM's default leaves a non-strict tool's arguments free, and the model then calls
get_weather("Paris") with arguments `"Paris"`). The fast tests check the template, the settings and the flags
the engine gets; the server tests send `tools` through the real `openai` client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import openai
import pytest
from support import real_model, serve

from aligner_core.model_prep import DEFAULT_PRESET, PRESETS
from server.settings import (
    SettingError,
    Settings,
    chat_template,
    serve_settings,
    tool_call_parser,
    tools_refusal,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No ALIGNER_* from the outer environment in the settings tests."""
    for name in list(os.environ):
        if name.upper().startswith("ALIGNER_"):
            monkeypatch.delenv(name)


def valid_call(call, tools=(WEATHER,)) -> dict:
    """A tool call's arguments, parsed, after checking they are JSON that its tool's schema accepts."""
    assert call.type == "function"
    assert call.function.name in {t["function"]["name"] for t in tools}, call
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


# ---- the template: SmolLM2's own without tools, Hermes-style tools with them ----


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model().path)


def template() -> str:
    path = PRESETS[DEFAULT_PRESET].chat_template_path
    assert path is not None and path.is_file()
    return path.read_text()


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "?"},
        ],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "system", "content": "S2"}],
        [{"role": "assistant", "content": "first"}],
    ],
)
def test_without_tools_the_template_renders_what_smollm2s_own_does(tokenizer, messages) -> None:
    for prompt in (True, False):
        own = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        ours = tokenizer.apply_chat_template(
            messages, chat_template=template(), tokenize=False, add_generation_prompt=prompt
        )
        assert ours == own


def test_with_tools_the_template_teaches_hermes_calls_and_renders_calls_and_results(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You help."},
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "21 C, sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "14:00"},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=[WEATHER, TIME], chat_template=template(), tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou help.\n\n# Tools\n")
    assert json.dumps(WEATHER) in text and json.dumps(TIME) in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>' in text
    assert text.count("<|im_start|>system") == 1  # the system turn carries the tools, once
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response>\n<tool_response>\n14:00\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text
    default = tokenizer.apply_chat_template(ASK, tools=[WEATHER], chat_template=template(), tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


# ---- settings: on by default for the preset, off for a folder, the command line wins ----


def model_folder(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    return tmp_path


def test_the_preset_serves_its_template_with_hermes_and_a_folder_serves_neither(tmp_path) -> None:
    settings = Settings()
    assert tool_call_parser(settings) == "hermes"
    assert chat_template(settings) == str(PRESETS[DEFAULT_PRESET].chat_template_path)
    folder = Settings(model=str(model_folder(tmp_path)))
    assert tool_call_parser(folder) is None and chat_template(folder) is None
    off = Settings(tool_call_parser="none", chat_template="none")
    assert tool_call_parser(off) is None and chat_template(off) is None
    mine = Settings(model=str(tmp_path), tool_call_parser="llama3_json", chat_template="/t.jinja")
    assert (tool_call_parser(mine), chat_template(mine)) == ("llama3_json", "/t.jinja")


def test_the_engine_gets_the_tool_flags_and_the_users_own_win(tmp_path, monkeypatch) -> None:
    from server.app import engine_options
    from server.engine.vllm_glue import engine_args

    model = str(real_model().path)
    args = engine_args(engine_options(serve_settings({}, []), model, "m-0").argv())
    assert args.enable_auto_tool_choice is True and args.tool_call_parser == "hermes"
    assert args.chat_template == str(PRESETS[DEFAULT_PRESET].chat_template_path)
    assert args.tool_strict_level == "parameter"

    monkeypatch.setenv("ALIGNER_TOOL_CALL_PARSER", "llama3_json")
    monkeypatch.setenv("ALIGNER_ENGINE_ARGS", "--tool-strict-level auto --chat-template /env.jinja")
    settings = serve_settings({}, ["--tool-call-parser", "pythonic", "--chat-template", "/cli.jinja"])
    assert (settings.tool_call_parser, settings.chat_template, settings.tool_strict_level) == (
        "pythonic",
        "/cli.jinja",
        "auto",
    )
    assert settings.engine_args == ""  # taken out: the engine gets them from the settings, once
    args = engine_args(engine_options(settings, model, "m-0").argv())
    assert (args.tool_call_parser, args.chat_template, args.tool_strict_level) == ("pythonic", "/cli.jinja", "auto")

    monkeypatch.setenv("ALIGNER_TOOL_CALL_PARSER", "none")
    monkeypatch.setenv("ALIGNER_CHAT_TEMPLATE", "none")
    monkeypatch.delenv("ALIGNER_ENGINE_ARGS")
    args = engine_args(engine_options(serve_settings({}, []), model, "m-0").argv())
    assert args.enable_auto_tool_choice is False and args.tool_call_parser is None and args.chat_template is None


def test_auto_tool_choice_without_a_parser_names_the_setting(tmp_path) -> None:
    with pytest.raises(SettingError, match="--enable-auto-tool-choice .*ALIGNER_TOOL_CALL_PARSER"):
        serve_settings({}, [str(model_folder(tmp_path)), "--enable-auto-tool-choice"])
    assert serve_settings({}, ["--enable-auto-tool-choice"]).model == DEFAULT_PRESET  # the preset has hermes


def test_tools_without_a_parser_are_refused_naming_our_setting() -> None:
    off = Settings(tool_call_parser="none")
    for choice in ("auto", "required", NAMED):
        message = tools_refusal(off, [WEATHER], choice)
        assert message is not None and "ALIGNER_TOOL_CALL_PARSER" in message
        assert "--enable-auto-tool-choice" not in message
    assert tools_refusal(off, [WEATHER], "none") is None
    assert tools_refusal(off, None, None) is None
    assert tools_refusal(Settings(), [WEATHER], "auto") is None


def test_vllm_pins_arguments_to_the_schema_only_at_the_parameter_level() -> None:
    """The cause of `"Paris"`: at vLLM's default level a forced call of a non-strict tool constrains the
    `<tool_call>` envelope and the name, and the arguments are any JSON value."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.structural_tag_registry import get_model_structural_tag
    from vllm.tool_parsers.tool_strict_level import ToolStrictLevel

    request = ChatCompletionRequest(model="m", messages=ASK, tools=[WEATHER], tool_choice=NAMED)
    schema = json.dumps(WEATHER["function"]["parameters"])

    def tag(level: ToolStrictLevel) -> str:
        built = get_model_structural_tag("hermes", request.tools, request.tool_choice, False, strict_level=level)
        assert built is not None
        return json.dumps(built.model_dump())

    assert '"json_schema": true' in tag(ToolStrictLevel.AUTO) and schema not in tag(ToolStrictLevel.AUTO)
    assert schema in tag(ToolStrictLevel.PARAMETER)


# ---- a real server on the default settings ----


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="open-mode-needs-no-key", max_retries=0)


def chat(client, **kw):
    body = {"model": real_model().spec.identity, "messages": ASK, "temperature": 0, "max_tokens": 80} | kw
    return client.chat.completions.create(**body)


@pytest.mark.server
def test_a_named_tool_call_has_schema_valid_arguments(client) -> None:
    reply = chat(client, tools=[WEATHER, TIME], tool_choice=NAMED)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's for a named call
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert valid_call(call)["city"] == "Paris"


@pytest.mark.server
def test_a_required_tool_call_has_schema_valid_arguments(client) -> None:
    reply = chat(client, tools=[WEATHER, TIME], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        valid_call(call, (WEATHER, TIME))
    one = chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    valid_call(one.choices[0].message.tool_calls[0], (WEATHER, TIME))


@pytest.mark.server
def test_auto_is_the_default_and_answers_with_text_or_a_valid_call(client) -> None:
    for kw in ({"tool_choice": "auto"}, {}):  # `tools` alone means auto
        choice = chat(client, tools=[WEATHER], max_tokens=40, **kw).choices[0]
        if choice.message.tool_calls:  # a 135M model seldom chooses to call
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                valid_call(call)
        else:
            assert choice.message.content and choice.finish_reason in ("stop", "length")
    choice = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=20).choices[0]
    assert choice.message.content and not choice.message.tool_calls


@pytest.mark.server
def test_a_streamed_named_call_assembles_to_schema_valid_arguments(client) -> None:
    names, arguments = [], ""
    for chunk in chat(client, tools=[WEATHER], tool_choice=NAMED, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            assert delta.index == 0
            if delta.function and delta.function.name:
                names.append(delta.function.name)
            arguments += (delta.function.arguments or "") if delta.function else ""
    assert names == ["get_weather"]
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_weather"])


@pytest.mark.server
def test_a_conversation_with_a_call_and_its_result_is_answered(client) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = chat(client, messages=messages, tools=[WEATHER], max_tokens=30)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 100  # the tools and the result reached the prompt


@pytest.mark.server
def test_a_named_call_through_an_adapter(client, server) -> None:
    """The pirate persona (a trained example adapter) runs every token of the call, and the call holds."""
    import httpx

    pirate = REPO / "examples" / "adapters" / "pirate.safetensors"
    files = {"file": (pirate.name, pirate.read_bytes())}
    up = httpx.post(server.base + "/v1/adapters", data={"name": "tools-pirate"}, files=files, timeout=30)
    assert up.status_code == 201, up.text
    reply = chat(client, tools=[WEATHER], tool_choice=NAMED, extra_body={"adapter": "tools-pirate"})
    assert reply.model == "tools-pirate"  # the answer names what the request named
    (call,) = reply.choices[0].message.tool_calls
    valid_call(call)


@pytest.mark.server
def test_tool_call_answers_and_chunks_match_openais_schemas(server) -> None:
    """As strict clients read them: a named call, a required one and their stream chunks."""
    import httpx
    from test_openai_schema import violations

    found = {}
    for label, choice in (("named", NAMED), ("required", "required")):
        body = {"model": real_model().spec.identity, "messages": ASK, "tools": [WEATHER], "tool_choice": choice}
        body |= {"temperature": 0, "max_tokens": 60}
        r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["tool_calls"]
        found[label] = violations(r.json(), "CreateChatCompletionResponse")
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body | {"stream": True}, timeout=120) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: ") and x != "data: [DONE]"]
        assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
        found[label + " stream"] = sorted(
            {v for c in chunks for v in violations(c, "CreateChatCompletionStreamResponse")}
        )
    assert not any(found.values()), json.dumps(found, indent=1)
