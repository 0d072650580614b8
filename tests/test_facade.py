"""The engine facade's residency rules (LRU among unpinned adapters, pins, retire) with a recording fake
engine client, and `generate`'s protocol with a fake serving object; the real engine's side is covered by
the parity, tenancy, security and reliability tests."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.config import AlignerEngineConfig
from server.engine.facade import AlignerEngine, EngineBusy, EngineOptions


class FakeClient:
    errored = False

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append((method, args))
        return [True]


def engine(slots: int) -> tuple[AlignerEngine, FakeClient]:
    eng = AlignerEngine(EngineOptions(model_path="m", served_name="m:1", aligner=AlignerEngineConfig(max_slots=slots)))
    eng.client = FakeClient()
    return eng, eng.client


async def _data() -> bytes:
    return b"adapter-bytes"


def test_lru_evicts_the_least_recently_used_unpinned_adapter() -> None:
    async def main():
        eng, client = engine(2)
        a = await eng.lease("a", _data)
        b = await eng.lease("b", _data)
        await a.release()
        await b.release()
        await (await eng.lease("a", _data)).release()  # touch a: b is now least recently used
        await (await eng.lease("c", _data)).release()
        return eng, client

    eng, client = asyncio.run(main())
    assert ("aligner_unload", ("b", True)) in client.calls
    assert sorted(eng.resident_keys()) == ["a", "c"]
    assert [m for m, _ in client.calls].count("aligner_load") == 3  # a is loaded once, not again


def test_pinned_adapters_are_never_evicted() -> None:
    async def main():
        eng, client = engine(1)
        held = await eng.lease("a", _data)
        with pytest.raises(EngineBusy):
            await eng.lease("b", _data)
        assert eng.resident_keys() == ["a"] and not any(m == "aligner_unload" for m, _ in client.calls)
        await held.release()
        await (await eng.lease("b", _data)).release()
        return eng

    assert asyncio.run(main()).resident_keys() == ["b"]


def test_retire_waits_for_the_last_lease() -> None:
    async def main():
        eng, client = engine(4)
        one, two = await eng.lease("a", _data), await eng.lease("a", _data)
        await eng.retire("a")
        assert eng.resident_keys() == ["a"]
        await one.release()
        await one.release()  # idempotent
        assert eng.resident_keys() == ["a"] and eng.leases == 1
        await two.release()
        return eng, client

    eng, client = asyncio.run(main())
    assert eng.resident_keys() == [] and eng.leases == 0
    assert client.calls[-1] == ("aligner_unload", ("a", True))


# ---- generate: one request's protocol with vLLM's serving code, against a fake serving object ----


class FakeServing:
    """vLLM's serving State, as far as `generate` uses it: records each request, answers with `answer`."""

    def __init__(self, answer) -> None:
        self.answer, self.requests, self.closed = answer, [], False
        self.openai_serving_chat = self.openai_serving_completion = self.openai_serving_responses = self

    async def create_completion(self, request, raw_request):
        self.requests.append(request)
        return self.answer(self)

    create_responses = create_completion


def _events(serving: FakeServing, events: list[str]):
    async def stream():
        try:
            for e in events:
                yield e
        finally:
            serving.closed = True

    return stream()


def serving_engine(answer, **options) -> tuple[AlignerEngine, FakeServing]:
    eng, _ = engine(2)
    eng.options = EngineOptions(**{"model_path": "m", "served_name": "m:1", **options})
    eng._serving = FakeServing(answer)  # the seam's one private touch point, in place of a started engine
    return eng, eng._serving


CHUNKS = [
    'data: {"choices":[{"index":0,"text":"a"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n',
    'data: {"choices":[{"index":0,"text":"b"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
    "data: [DONE]\n\n",
]


def test_generate_stamps_the_request_and_hides_usage_the_client_did_not_ask_for() -> None:
    from server.engine.facade import AdapterUse, cache_salt
    from server.engine.vllm_glue import CompletionRequest

    async def main():
        eng, serving = serving_engine(lambda s: _events(s, CHUNKS))
        body = CompletionRequest(
            prompt="hi",
            stream=True,
            model="x",
            priority=5,
            cache_salt="mine",
            vllm_xargs={"aligner": "forged", "other": 1},
        )
        gen = await eng.generate(
            "completions",
            body,
            None,
            adapter=AdapterUse("k" * 64, _data),
            salt_scope="ten_1",
            priority=7,
            shown_model="persona",
        )
        assert eng.leases == 1 and gen.streaming
        events = [e async for e in gen.events()]
        usage = gen.usage()
        await gen.close()
        await gen.close()  # idempotent
        return eng, serving, events, usage

    eng, serving, events, usage = asyncio.run(main())
    (sent,) = serving.requests
    assert sent.vllm_xargs == {"other": 1, "aligner": "k" * 64} and sent.model == "m:1" and sent.priority == 0
    assert sent.cache_salt == cache_salt("ten_1", "k" * 64, "mine")
    assert sent.stream_options.include_usage and sent.stream_options.continuous_usage_stats
    assert events == [
        'data: {"choices":[{"index":0,"text":"a"}],"model":"persona"}\n\n',  # the model the client named
        'data: {"choices":[{"index":0,"text":"b"}],"model":"persona"}\n\n',
        "data: [DONE]\n\n",
    ]
    assert usage == (3, 2) and serving.closed and eng.leases == 0


def test_generate_turns_vllm_refusals_into_request_rejected_and_releases_the_lease() -> None:
    from server.engine.facade import AdapterUse, RequestRejected
    from server.engine.vllm_glue import CompletionRequest, ErrorResponse

    refusal = 'data: {"error": {"message": "bad regex", "type": "BadRequestError", "param": null, "code": 400}}\n\n'

    def raises(serving: FakeServing):
        raise ValueError("bad prompt")  # as vLLM's code not yet migrated to VLLMClientError does

    answers = {
        "error response": lambda s: ErrorResponse(error={"message": "no", "type": "NotFoundError", "code": 404}),
        "first event": lambda s: _events(s, [refusal, "data: [DONE]\n\n"]),
        "raised": raises,
    }

    async def main(answer):
        eng, serving = serving_engine(answer)
        body = CompletionRequest(prompt="hi", stream=True)
        with pytest.raises(RequestRejected) as e:
            await eng.generate("completions", body, None, adapter=AdapterUse("k" * 64, _data), salt_scope=None)
        return eng, e.value

    got = {label: asyncio.run(main(answer)) for label, answer in answers.items()}
    assert [(e.status, e.message) for _, e in got.values()] == [(404, "no"), (400, "bad regex"), (400, "bad prompt")]
    assert all(eng.leases == 0 for eng, _ in got.values())


def test_a_stream_error_event_after_the_first_raises() -> None:
    from server.engine.facade import RequestRejected
    from server.engine.vllm_glue import CompletionRequest

    died = 'data: {"error": {"message": "engine died", "type": "InternalServerError", "param": null, "code": 500}}\n\n'

    async def main():
        eng, serving = serving_engine(lambda s: _events(s, CHUNKS[:1] + [died, "data: [DONE]\n\n"]))
        gen = await eng.generate(
            "completions", CompletionRequest(prompt="hi", stream=True), None, adapter=None, salt_scope=None
        )
        seen = []
        with pytest.raises(RequestRejected) as e:
            async for event in gen.events():
                seen.append(event)
        await gen.close()
        return seen, e.value, serving

    seen, err, serving = asyncio.run(main())
    assert len(seen) == 1 and (err.status, err.message) == (500, "engine died") and serving.closed


class _Event:
    """A Responses API stream event as vLLM's serving code yields it (an object, not SSE text)."""

    def __init__(self, **fields) -> None:
        self.type, self.fields = fields["type"], fields

    def model_dump_json(self, **_) -> str:
        import json

        return json.dumps(self.fields)


RESPONSE_EVENTS = [
    _Event(type="response.created", response={"model": "m:1", "status": "in_progress"}),
    _Event(type="response.output_text.delta", delta="Par"),
    _Event(type="response.output_text.delta", delta="is"),
    _Event(
        type="response.completed",
        response={"model": "m:1", "status": "completed", "usage": {"input_tokens": 9, "output_tokens": 2}},
    ),
]


@pytest.mark.parametrize("leave_after", [None, 3])
def test_a_responses_stream_echoes_the_model_and_counts_what_was_streamed(leave_after) -> None:
    """The Responses API's events become SSE text with the model the client named; usage is the final
    event's, or the text deltas seen when the client left before it."""
    import json

    from server.engine.facade import AdapterUse
    from server.engine.vllm_glue import ResponsesRequest

    async def main():
        eng, serving = serving_engine(lambda s: _events(s, RESPONSE_EVENTS))
        body = ResponsesRequest(input="hi", stream=True, model="x")
        gen = await eng.generate(
            "responses", body, None, adapter=AdapterUse("k" * 64, _data), salt_scope="t", shown_model="persona"
        )
        events = []
        async for e in gen.events():
            events.append(e)
            if len(events) == leave_after:
                break
        usage = gen.usage()
        await gen.close()
        return eng, serving, events, usage

    eng, serving, events, usage = asyncio.run(main())
    (sent,) = serving.requests
    assert sent.vllm_xargs == {"aligner": "k" * 64} and sent.model == "m:1"
    heads = [e.split("\n", 1)[0] for e in events]
    assert heads == [f"event: {e.type}" for e in RESPONSE_EVENTS][: leave_after or None]
    data = [json.loads(e.split("data: ", 1)[1]) for e in events]
    assert data[0]["response"]["model"] == "persona"
    assert usage == ((9, 2) if leave_after is None else (0, 2)) and serving.closed and eng.leases == 0
