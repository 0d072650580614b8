"""`Client` and `AsyncClient`: thin shells that move the core's `Call`s over httpx."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import GeneratorType
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from aligner_client import _core as core
from aligner_client import models as m
from aligner_client._resources import Namespaces
from aligner_client.errors import APIError

HttpT = TypeVar("HttpT", httpx.Client, httpx.AsyncClient)
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)


def _parse(call: core.Call, resp: httpx.Response) -> Any:
    if call.raw:
        return call.parse(resp.content)
    try:
        body = resp.json() if resp.content else None
    except ValueError as e:
        raise APIError(
            f"the server answered {resp.status_code} with a body that is not JSON",
            status=resp.status_code,
            body=resp.text[:500],
        ) from e
    try:
        return call.parse(body)
    except ValidationError as e:
        raise APIError(
            f"unexpected answer from {resp.request.method} {resp.request.url.path}: {e}",
            status=resp.status_code,
            body=body,
        ) from e


class Stream:
    """Chunks of a streamed completion; iterate it (once). Closes its connection at the end, on `close()`,
    or when used as a context manager."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __iter__(self) -> Iterator[m.ChatCompletionChunk]:
        chunks = core.ChunkDecoder()
        try:
            for line in self.response.iter_lines():
                yield from chunks.feed(line)
                if chunks.done:
                    return
            yield from chunks.end()
        except httpx.TransportError as e:
            raise core.transport_error(e) from e
        finally:
            self.response.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """The async twin of `Stream`: `async for chunk in stream`."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[m.ChatCompletionChunk]:
        chunks = core.ChunkDecoder()
        try:
            async for line in self.response.aiter_lines():
                for chunk in chunks.feed(line):
                    yield chunk
                if chunks.done:
                    return
            for chunk in chunks.end():
                yield chunk
        except httpx.TransportError as e:
            raise core.transport_error(e) from e
        finally:
            await self.response.aclose()

    async def close(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Shell(Namespaces, Generic[HttpT, TransportT]):
    """What `Client` and `AsyncClient` share: the arguments, configuration, retry policy and namespaces."""

    _http_class: Callable[..., HttpT]  # httpx.Client or httpx.AsyncClient
    _default_sleep: Callable[[float], Any]

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        admin_key: str | None = None,
        timeout: float | httpx.Timeout | None = core.DEFAULT_TIMEOUT,
        max_retries: int = 2,
        retry_policy: core.RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: TransportT | None = None,
        http_client: HttpT | None = None,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self.config = core.resolve_config(base_url, api_key, admin_key, headers)
        self.retry_policy = retry_policy if retry_policy is not None else core.RetryPolicy(max_retries=max_retries)
        self._own_http = http_client is None
        self._http: HttpT = http_client or self._http_class(timeout=timeout, transport=transport)
        self._sleep = sleep if sleep is not None else self._default_sleep
        self._init_namespaces()

    @property
    def base_url(self) -> str:
        return self.config.base_url


class Client(_Shell[httpx.Client, httpx.BaseTransport]):
    """Synchronous client.

    `base_url` (server root; default `ALIGNER_BASE_URL`, then http://127.0.0.1:8000), `api_key` (default
    `ALIGNER_API_KEY`), `admin_key` for `/admin` (default `ALIGNER_ADMIN_KEY`, then `api_key`).
    Retries 429 / 5xx / connection errors `max_retries` times with exponential backoff, honouring
    Retry-After. `transport`, `http_client` and `sleep` (default `time.sleep`) are for tests and custom
    networking.
    """

    _http_class = httpx.Client
    _default_sleep = staticmethod(time.sleep)

    def _send(self, call: core.Call) -> httpx.Response:
        retries = core.Retries(self.retry_policy)
        while True:
            request = self._http.build_request(**call.request_args(self.config))
            try:
                resp = self._http.send(request, stream=call.stream)
            except httpx.TransportError as e:
                failure: core.Failure = e
            else:
                if resp.status_code < 400:
                    return resp
                failure = (resp.status_code, resp.headers, resp.read())
                resp.close()
            self._sleep(retries.delay_after(failure))

    def _drive(self, op: core.Op) -> Any:
        if isinstance(op, core.Call):
            return _parse(op, self._send(op))
        assert isinstance(op, GeneratorType)
        try:
            step = next(op)
            while True:
                if isinstance(step, core.Sleep):
                    step = op.send(self._sleep(step.seconds))
                else:
                    step = op.send(_parse(step, self._send(step)))
        except StopIteration as done:
            return done.value

    def _stream(self, call: core.Call) -> Stream:
        return Stream(self._send(call))

    def _paginate(self, pager: core.Paginator) -> Iterator[m.Adapter]:
        while (call := pager.next_call()) is not None:
            yield from pager.feed(self._drive(call))

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Shell[httpx.AsyncClient, httpx.AsyncBaseTransport]):
    """Asynchronous client: the same namespaces and arguments as `Client` (`sleep` defaults to `asyncio.sleep`);
    every call is awaited (`async for` over `adapters.list_all()` and over the `AsyncStream` that `stream=True`
    gives)."""

    # The namespaces' annotations are the sync client's values; here each call gives an awaitable of one.
    adapters: Any
    models: Any
    chat: Any
    completions: Any
    admin: Any
    files: Any
    fine_tuning: Any

    _http_class = httpx.AsyncClient
    _default_sleep = staticmethod(asyncio.sleep)

    async def _send(self, call: core.Call) -> httpx.Response:
        retries = core.Retries(self.retry_policy)
        while True:
            request = self._http.build_request(**call.request_args(self.config))
            try:
                resp = await self._http.send(request, stream=call.stream)
            except httpx.TransportError as e:
                failure: core.Failure = e
            else:
                if resp.status_code < 400:
                    return resp
                failure = (resp.status_code, resp.headers, await resp.aread())
                await resp.aclose()
            slept = self._sleep(retries.delay_after(failure))
            if inspect.isawaitable(slept):
                await slept

    async def _drive(self, op: core.Op) -> Any:
        if isinstance(op, core.Call):
            return _parse(op, await self._send(op))
        assert isinstance(op, GeneratorType)
        try:
            step = next(op)
            while True:
                if isinstance(step, core.Sleep):
                    slept = self._sleep(step.seconds)
                    step = op.send(await slept if inspect.isawaitable(slept) else None)
                else:
                    step = op.send(_parse(step, await self._send(step)))
        except StopIteration as done:
            return done.value

    async def _stream(self, call: core.Call) -> AsyncStream:
        return AsyncStream(await self._send(call))

    async def _paginate(self, pager: core.Paginator) -> AsyncIterator[m.Adapter]:
        while (call := pager.next_call()) is not None:
            for item in pager.feed(await self._drive(call)):
                yield item

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
