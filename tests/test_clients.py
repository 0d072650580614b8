"""The third-party clients people point at an OpenAI-compatible server, against the real one: LangChain
(langchain-openai: invoke, stream, batch over adapters, bind_tools), LiteLLM (`openai/<model>` with `api_base`,
streaming) and the OpenAI Agents SDK (an agent with one tool, on the Responses and the Chat Completions model).
Each answer is held to the plain openai client's for the same request, on the base model and on adapters, whose
answers differ from the base's. No internet: LiteLLM's cost map is its local copy, its telemetry and LangSmith's
and the Agents SDK's tracing are off."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from support import real_model, serve

from aligner_core.adapter_format import Adapter, encode

pytestmark = [
    pytest.mark.server,
    # LiteLLM's own types, at its first streamed call (pydantic about TypedDicts it cannot freeze)
    pytest.mark.filterwarnings("ignore:Item .* is using the `ReadOnly` qualifier:UserWarning"),
]

KEY = "compat"  # open mode: any key
QUESTION = "Name a colour."
MAX_TOKENS = 16
# A forced call is Hermes markup around the JSON, ~36 tokens for get_weather("Paris"); the call ends generation.
TOOL_TOKENS = 64
ADAPTERS = {"compat-a": 1, "compat-b": 2}  # name: seed; gate_scale 1.0, so each visibly changes the answer
TIMEOUT = 120


@pytest.fixture(scope="module", autouse=True)
def offline():
    """LiteLLM reads its bundled cost map (it fetches it at import otherwise) and LangSmith traces nothing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        mp.setenv("LANGSMITH_TRACING", "false")
        mp.setenv("LANGCHAIN_TRACING_V2", "false")
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory.mktemp("compat"))


@pytest.fixture(scope="module")
def base() -> str:
    return real_model().spec.identity


@pytest.fixture(scope="module")
def adapters(server) -> list[str]:
    spec = real_model().spec
    for name, seed in ADAPTERS.items():
        data = encode(Adapter.random(spec, tokens=2, seed=seed, gate_scale=1.0))
        r = httpx.post(server.base + "/v1/adapters", files={"file": (name + ".safetensors", data)}, data={"name": name})
        assert r.status_code == 201, r.text
    return list(ADAPTERS)


@pytest.fixture(scope="module")
def reference(server, base, adapters) -> dict[str, tuple[str, int]]:
    """The plain openai client's greedy answer to QUESTION (its text and token count) per model: the base's and
    each adapter's, all different."""
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)
    answers = {}
    for model in (base, *adapters):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS, temperature=0
        )
        assert r.model == model and r.choices[0].message.content, r
        answers[model] = (r.choices[0].message.content, r.usage.completion_tokens)
    assert len({text for text, _ in answers.values()}) == len(answers), f"an adapter changed nothing: {answers}"
    return answers


# ---- LangChain (langchain-openai) ----


def chat_openai(server, model: str, **kw):
    from langchain_openai import ChatOpenAI

    options = dict(temperature=0, max_tokens=MAX_TOKENS, timeout=TIMEOUT, max_retries=0) | kw
    return ChatOpenAI(model=model, base_url=server.base + "/v1", api_key=KEY, **options)


def test_langchain_invoke_and_stream_on_the_base_and_adapters(server, base, adapters, reference) -> None:
    for model, (text, tokens) in reference.items():
        reply = chat_openai(server, model).invoke(QUESTION)
        assert reply.content == text, model
        assert reply.response_metadata["model_name"] == model
        assert reply.usage_metadata["output_tokens"] == tokens
    for model in (base, adapters[0]):
        chunks = [c.content for c in chat_openai(server, model).stream(QUESTION)]
        assert sum(1 for c in chunks if c) > 1, chunks  # streamed, not one block
        assert "".join(chunks) == reference[model][0]
    # the adapter as a field of the body, with the base model named
    reply = chat_openai(server, base, extra_body={"adapter": adapters[1]}).invoke(QUESTION)
    assert reply.content == reference[adapters[1]][0]


def test_langchain_batch_over_adapters(server, base, adapters, reference) -> None:
    from langchain_core.runnables import ConfigurableField

    llm = chat_openai(server, base).configurable_fields(model_name=ConfigurableField(id="model"))
    models = [base, *adapters]
    replies = llm.batch([QUESTION] * len(models), config=[{"configurable": {"model": m}} for m in models])
    assert [r.content for r in replies] == [reference[m][0] for m in models]
    assert [r.response_metadata["model_name"] for r in replies] == models


def test_langchain_bind_tools_forced_call_is_schema_valid(server, base) -> None:
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is sunny in {city}."

    llm = chat_openai(server, base, max_tokens=TOOL_TOKENS).bind_tools([get_weather], tool_choice="get_weather")
    reply = llm.invoke("What is the weather in Paris?")
    assert not reply.invalid_tool_calls, reply.invalid_tool_calls
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"], reply
    jsonschema.validate(reply.tool_calls[0]["args"], convert_to_openai_tool(get_weather)["function"]["parameters"])
    assert get_weather.invoke(reply.tool_calls[0]["args"]).startswith("It is sunny in ")


# ---- LiteLLM ----


@pytest.fixture(scope="module")
def litellm(offline):
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def test_litellm_completion_on_the_base_and_adapters(server, base, adapters, reference, litellm) -> None:
    common = dict(api_base=server.base + "/v1", api_key=KEY, max_tokens=MAX_TOKENS, temperature=0, timeout=TIMEOUT)
    messages = [{"role": "user", "content": QUESTION}]
    for model, (text, tokens) in reference.items():
        r = litellm.completion(model=f"openai/{model}", messages=messages, **common)
        assert r.choices[0].message.content == text, model
        assert r.usage.completion_tokens == tokens
    r = litellm.completion(model=f"openai/{base}", messages=messages, extra_body={"adapter": adapters[1]}, **common)
    assert r.choices[0].message.content == reference[adapters[1]][0]


def test_litellm_streaming(server, base, adapters, reference, litellm) -> None:
    common = dict(api_base=server.base + "/v1", api_key=KEY, max_tokens=MAX_TOKENS, temperature=0, timeout=TIMEOUT)
    for model in (base, adapters[0]):
        stream = litellm.completion(
            model=f"openai/{model}", messages=[{"role": "user", "content": QUESTION}], stream=True, **common
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert sum(1 for p in pieces if p) > 1, pieces
        assert "".join(pieces) == reference[model][0], model


# ---- the OpenAI Agents SDK ----


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agents_sdk_agent_with_one_tool(server, base, api) -> None:
    """The first turn must call the tool (tool_choice required); the SDK then resets tool_choice (its
    reset_tool_choice), so the second turn answers in text and the run ends, well inside max_turns."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        ToolCallItem,
        ToolCallOutputItem,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    async def run():
        async with openai.AsyncOpenAI(
            base_url=server.base + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0
        ) as client:
            kind = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
            agent = Agent(
                name="weather",
                instructions="Answer with the weather tool.",
                model=kind(model=base, openai_client=client),
                tools=[get_weather],
                model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=TOOL_TOKENS),
                reset_tool_choice=True,
            )
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=3)

    result = asyncio.run(run())
    called = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    assert [c.name for c in called] == ["get_weather"], result.new_items
    arguments = json.loads(called[0].arguments)
    jsonschema.validate(arguments, get_weather.params_json_schema)
    assert calls == [arguments["city"]]
    outputs = [item.output for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert outputs == [f"It is sunny in {arguments['city']}."]
    assert len(result.raw_responses) == 2  # the call, then the answer
    assert isinstance(result.final_output, str) and result.final_output.strip(), result.final_output
