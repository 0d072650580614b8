"""The I/O-free core shared by `Client` and `AsyncClient`.

Everything here is pure: configuration, the description of each API call (`Call`), the status/code ->
exception map, the retry policy, SSE decoding and pagination. The two clients only move bytes: they turn
a `Call` into an httpx request, and feed answers back. Multi-step operations are generators that yield
`Call`s and receive their parsed results (`drive` in each client runs them), so they too are written once;
one that polls (`wait_job`) also yields `Sleep`s, which each client waits out its own way (time.sleep,
asyncio.sleep, or the `sleep=` given to it).
"""

from __future__ import annotations

import base64
import email.utils
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from aligner_client import models as m
from aligner_client.errors import (
    CODE_ERRORS,
    STATUS_ERRORS,
    APIConnectionError,
    APIError,
    APITimeoutError,
    InternalServerError,
    WaitTimeoutError,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0  # generation on a CPU server can take a while
USER_AGENT = "aligner-client/0.1.0"

FileInput = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str | None
    admin_key: str | None
    headers: Mapping[str, str] = field(default_factory=dict)


def resolve_config(
    base_url: str | None = None,
    api_key: str | None = None,
    admin_key: str | None = None,
    headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Arguments first, then ALIGNER_BASE_URL / ALIGNER_API_KEY / ALIGNER_ADMIN_KEY.

    `base_url` is the server root; a trailing `/v1` (an OpenAI-style URL) is accepted and dropped.
    Admin routes use `admin_key`, falling back to `api_key`.
    """
    env = os.environ if env is None else env
    url = (base_url or env.get("ALIGNER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    key = api_key or env.get("ALIGNER_API_KEY") or None
    admin = admin_key or env.get("ALIGNER_ADMIN_KEY") or key
    return Config(url, key, admin, dict(headers or {}))


# ------------------------------------------------------------------------------------------------ calls


@dataclass
class Call:
    """One HTTP request to make and how to read its answer."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    form: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    parse: Callable[[Any], Any] = lambda body: body
    admin: bool = False  # authenticate with the admin key
    stream: bool = False
    raw: bool = False  # the answer's bytes go to `parse` as they are (file content), not its JSON

    def request_args(self, config: Config) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client.build_request` (same for the async client)."""
        accept = "text/event-stream" if self.stream else "*/*" if self.raw else "application/json"
        headers = {"user-agent": USER_AGENT, "accept": accept}
        headers.update(config.headers)
        key = config.admin_key if self.admin else config.api_key
        if key:
            headers["authorization"] = f"Bearer {key}"
        args: dict[str, Any] = {"method": self.method, "url": config.base_url + self.path, "headers": headers}
        if self.params:
            args["params"] = {k: v for k, v in self.params.items() if v is not None}
        if self.json is not None:
            args["json"] = self.json
        if self.files is not None:
            args["files"] = self.files
            args["data"] = self.form or {}
        return args


@dataclass(frozen=True)
class Sleep:
    """Yielded by a polling operation: wait `seconds` before the next call (the client's sleep; the answer
    sent back is None)."""

    seconds: float


Op = Call | Generator[Call | Sleep, Any, Any]


def _seg(name: str) -> str:
    return quote(name, safe="@")


def read_file_input(file: FileInput, default_name: str = "adapter.safetensors") -> tuple[str, bytes]:
    """(filename, bytes) from a path, bytes or a binary file object; bytes are named `default_name`. Adapter
    files are small (≤ 1 MiB), training files a few MiB: read whole."""
    if isinstance(file, (bytes, bytearray, memoryview)):
        return default_name, bytes(file)
    if isinstance(file, (str, os.PathLike)):
        p = Path(file)
        return p.name, p.read_bytes()
    data = file.read()
    return Path(getattr(file, "name", default_name) or default_name).name, data


# adapters


def upload_adapter(name: str, file: FileInput, *, public: bool = False) -> Call:
    """`POST /v1/adapters`, or with `public` `POST /admin/adapters` (admin key)."""
    filename, data = read_file_input(file)
    return Call(
        "POST",
        "/admin/adapters" if public else "/v1/adapters",
        form={"name": name},
        files={"file": (filename, data, "application/octet-stream")},
        parse=m.Adapter.model_validate,
        admin=public,
    )


def upload_tensors(
    name: str, prefix: Any, gate: Any, *, base_model: str | None = None, public: bool = False, **encoding: Any
) -> Generator[Call, Any, m.Adapter]:
    """Encode aligner/v1 from tensors (`encoding`: `encode_adapter`'s start_layer and gate_activation) and upload
    it; without `base_model`, ask the server for its base model id first."""
    from aligner_client.tensors import encode_adapter

    if base_model is None:
        models: m.ModelList = yield list_models()
        base_model = models.base.id
    data = encode_adapter(prefix, gate, base_model=base_model, **encoding)
    return (yield upload_adapter(name, data, public=public))


def ref(name: str, version: int | None = None) -> str:
    return name if version is None else f"{name}@{version}"


def list_adapters(limit: int | None = None, after: str | None = None) -> Call:
    return Call("GET", "/v1/adapters", params={"limit": limit, "after": after}, parse=m.AdapterList.model_validate)


def get_adapter(name: str, version: int | None = None) -> Call:
    return Call("GET", f"/v1/adapters/{_seg(ref(name, version))}", parse=m.Adapter.model_validate)


def adapter_versions(name: str) -> Call:
    return Call("GET", f"/v1/adapters/{_seg(name)}/versions", parse=m.AdapterList.model_validate)


def delete_adapter(name: str, version: int | None = None, *, public: bool = False) -> Call:
    """`DELETE /v1/adapters/…`, or with `public` `/admin/adapters/…` (admin key)."""
    path = f"/{'admin' if public else 'v1'}/adapters/{_seg(ref(name, version))}"
    return Call("DELETE", path, admin=public, parse=m.AdapterDeleted.model_validate)


@dataclass
class Paginator:
    """Cursor state for `GET /v1/adapters`: `next_call()` until it returns None, `feed()` each page."""

    page_size: int | None = 100
    after: str | None = None
    done: bool = False

    def next_call(self) -> Call | None:
        return None if self.done else list_adapters(self.page_size, self.after)

    def feed(self, page: m.AdapterList) -> list[m.Adapter]:
        if not page.has_more or not page.next_after or not page.data:
            self.done = True
        self.after = page.next_after
        return page.data


# adapter stacks: the `adapters` field of a generation request


@dataclass(frozen=True)
class AdapterSpec:
    """One entry of `adapters=`: a stored adapter (`name`: "name" or "name@version") or an inline one (`inline`:
    an aligner/v1 file's bytes, or their base64), at `scale` (None: the server's default, 1.0).

    Scale 0 gives the base model's tokens, one entry at scale 1 the plain adapter's; the bounds (default -2..4)
    and the most entries (default 4) are the server's to check.
    """

    name: str | None = None
    scale: float | None = None
    inline: bytes | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.name is None) == (self.inline is None):
            raise ValueError("an adapter entry has exactly one of name= and inline=")
        s = self.scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
            raise ValueError(f"an adapter's scale is a finite number, not {s!r}")

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """ "pirate", "pirate@2", or with a scale after the last ':' "pirate:0.5" (names never hold a ':')."""
        name, sep, scale = text.rpartition(":")
        if not sep:
            return cls(name=text)
        if not name:
            raise ValueError(f"{text!r}: no adapter name before the ':'")
        try:
            value = float(scale)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"{text!r}: the scale after the ':' is not a finite number")
        return cls(name=name, scale=value)

    @classmethod
    def from_file(cls, file: FileInput, *, scale: float | None = None) -> AdapterSpec:
        """An inline adapter: an aligner/v1 file (path, bytes or binary file object), sent in the request itself."""
        return cls(inline=read_file_input(file)[1], scale=scale)

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name} if self.name is not None else {"inline": _base64(self.inline)}
        if self.scale is not None:
            entry["scale"] = float(self.scale)
        return entry


AdapterEntry = AdapterSpec | str | Mapping[str, Any]


def _base64(data: Any) -> Any:
    """Bytes as base64 text; text (already base64) as it is."""
    return base64.b64encode(bytes(data)).decode("ascii") if isinstance(data, (bytes, bytearray, memoryview)) else data


def adapters_field(adapters: Sequence[AdapterEntry]) -> list[dict[str, Any]]:
    """The wire form of `adapters=`. Strings go through `AdapterSpec.parse` and specs are checked here; a dict
    goes as it is (its `inline` bytes base64-encoded), for the server to judge."""
    if isinstance(adapters, (str, bytes, Mapping, AdapterSpec)):
        raise TypeError("adapters= takes a list of entries, e.g. adapters=['pirate:0.5', 'json']")
    wire = []
    for entry in adapters:
        if isinstance(entry, str):
            entry = AdapterSpec.parse(entry)
        if isinstance(entry, AdapterSpec):
            wire.append(entry.to_json())
        elif isinstance(entry, Mapping):
            wire.append({k: _base64(v) if k == "inline" else v for k, v in entry.items()})
        else:
            raise TypeError(f"an adapters= entry is a str, a dict or an AdapterSpec, not {type(entry).__name__}")
    return wire


# models and generation


def list_models() -> Call:
    return Call("GET", "/v1/models", parse=m.ModelList.model_validate)


def chat(messages: list[dict[str, Any]] | str, **options: Any) -> Call:
    """`options`: those of `Chat.create`, with `extra` the other fields."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return _generation("/v1/chat/completions", m.ChatCompletion, messages=messages, **options)


def completion(prompt: str | list[Any], **options: Any) -> Call:
    return _generation("/v1/completions", m.Completion, prompt=prompt, **options)


def _generation(
    path: str,
    answer: type[m.ChatCompletion],
    *,
    stream: bool = False,
    adapters: Sequence[AdapterEntry] | None = None,
    extra: dict[str, Any] | None = None,
    **fields: Any,
) -> Call:
    if adapters is not None:
        if fields.get("adapter") is not None:
            raise ValueError("pass adapter= or adapters=, not both (one adapter is adapters=[name])")
        fields["adapters"] = adapters_field(adapters)
    body = {k: v for k, v in fields.items() if v is not None}
    if stream:
        body["stream"] = stream
    body.update(extra or {})
    return Call("POST", path, json=body, stream=stream, parse=answer.model_validate)


# files and fine-tuning jobs (OpenAI's API: the server trains an adapter, named in the job's fine_tuned_model)

METHODS = ("supervised", "dpo")


def upload_file(file: FileInput, purpose: str = "fine-tune") -> Call:
    """`POST /v1/files`: JSONL (path, bytes or binary file object), chat examples for method "supervised" or
    preference pairs for "dpo"; the server checks every line before storing it."""
    filename, data = read_file_input(file, "training.jsonl")
    return Call(
        "POST",
        "/v1/files",
        form={"purpose": purpose},
        files={"file": (filename, data, "application/jsonl")},
        parse=m.FileObject.model_validate,
    )


def list_files(limit: int | None = None, after: str | None = None, purpose: str | None = None) -> Call:
    params = {"limit": limit, "after": after, "purpose": purpose}
    return Call("GET", "/v1/files", params=params, parse=m.FileList.model_validate)


def get_file(file_id: str) -> Call:
    return Call("GET", f"/v1/files/{_seg(file_id)}", parse=m.FileObject.model_validate)


def file_content(file_id: str) -> Call:
    return Call("GET", f"/v1/files/{_seg(file_id)}/content", raw=True, parse=bytes)


def delete_file(file_id: str) -> Call:
    return Call("DELETE", f"/v1/files/{_seg(file_id)}", parse=m.FileDeleted.model_validate)


def job_body(
    training_file: str,
    *,
    model: str,
    method: str | Mapping[str, Any] = "supervised",
    hyperparameters: Mapping[str, Any] | None = None,
    validation_file: str | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    aligner: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of `POST /v1/fine_tuning/jobs`. `method` is "supervised" or "dpo", and `hyperparameters` go
    inside it (one left out or None: the server's "auto"); or `method` is OpenAI's whole object, sent as
    written, and then `hyperparameters` stay empty. `aligner`: the adapter's shape (tokens, start_layer,
    gate_activation). Bounds are the server's to check (it answers 400 naming the field)."""
    hp = {k: v for k, v in (hyperparameters or {}).items() if v is not None}
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method is one of {', '.join(METHODS)}, not {method!r}")
        method_obj: dict[str, Any] = {"type": method, method: {"hyperparameters": hp}}
    elif hp:
        raise ValueError("give the hyperparameters inside method=, or method= as a name with them, not both")
    else:
        method_obj = dict(method)
    shape = {k: v for k, v in (aligner or {}).items() if v is not None}
    body = {
        "model": model,
        "training_file": training_file,
        "validation_file": validation_file,
        "suffix": suffix,
        "seed": seed,
        "method": method_obj,
        "aligner": shape or None,
    }
    return {k: v for k, v in body.items() if v is not None} | dict(extra or {})


def create_job(training_file: str, *, model: str | None = None, **fields: Any) -> Generator[Call, Any, m.FineTuningJob]:
    """`fields`: `job_body`'s. Without `model`, the server's base model id is asked for first (the body is
    checked before anything is sent)."""
    body = job_body(training_file, model=model or "", **fields)
    if model is None:
        models: m.ModelList = yield list_models()
        body["model"] = models.base.id
    return (yield Call("POST", "/v1/fine_tuning/jobs", json=body, parse=m.FineTuningJob.model_validate))


def _job_path(job_id: str, tail: str = "") -> str:
    return f"/v1/fine_tuning/jobs/{_seg(job_id)}{tail}"


def list_jobs(limit: int | None = None, after: str | None = None) -> Call:
    params = {"limit": limit, "after": after}
    return Call("GET", "/v1/fine_tuning/jobs", params=params, parse=m.FineTuningJobList.model_validate)


def get_job(job_id: str) -> Call:
    return Call("GET", _job_path(job_id), parse=m.FineTuningJob.model_validate)


def list_events(job_id: str, limit: int | None = None, after: str | None = None) -> Call:
    """Newest first; `after` an event id gives the ones before it."""
    params = {"limit": limit, "after": after}
    return Call("GET", _job_path(job_id, "/events"), params=params, parse=m.FineTuningJobEventList.model_validate)


def list_checkpoints(job_id: str, limit: int | None = None, after: str | None = None) -> Call:
    params = {"limit": limit, "after": after}
    parse = m.FineTuningJobCheckpointList.model_validate
    return Call("GET", _job_path(job_id, "/checkpoints"), params=params, parse=parse)


def cancel_job(job_id: str) -> Call:
    return Call("POST", _job_path(job_id, "/cancel"), parse=m.FineTuningJob.model_validate)


@dataclass
class EventFeed:
    """A job's events as they appear: each `poll()` (a generator of calls) returns those not returned before,
    oldest first. The API lists newest first, so pages are read back until an event already seen."""

    job_id: str
    page_size: int = 100
    seen: set[str] = field(default_factory=set)

    def poll(self) -> Generator[Call, Any, list[m.FineTuningJobEvent]]:
        new: list[m.FineTuningJobEvent] = []
        after = None
        while True:
            page: m.FineTuningJobEventList = yield list_events(self.job_id, self.page_size, after)
            fresh = list(itertools.takewhile(lambda e: e.id not in self.seen, page.data))
            new += fresh
            if len(fresh) < len(page.data) or not page.has_more or not page.data:
                break
            after = page.data[-1].id
        self.seen.update(e.id for e in new)
        return new[::-1]


def wait_job(
    job_id: str,
    *,
    poll_s: float = 2.0,
    timeout: float | None = None,
    on_event: Callable[[m.FineTuningJobEvent], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Generator[Call | Sleep, Any, m.FineTuningJob]:
    """Poll the job every `poll_s` seconds until it is finished (succeeded, failed or cancelled) and return it;
    a failed job is returned too (its `error` says why), not raised. `on_event` is called with each event, oldest
    first, from the job's first as they appear. After `timeout` seconds (None: no limit) WaitTimeoutError,
    holding the job as last seen; the job itself runs on."""
    if not (poll_s > 0 and math.isfinite(poll_s)):
        raise ValueError(f"poll_s is a number of seconds above 0, not {poll_s!r}")
    deadline = None if timeout is None else clock() + timeout
    feed = EventFeed(job_id) if on_event is not None else None
    while True:
        job: m.FineTuningJob = yield get_job(job_id)
        if feed is not None and on_event is not None:  # the job first: once it is finished, so is its log
            for event in (yield from feed.poll()):
                on_event(event)
        if job.finished:
            return job
        left = None if deadline is None else deadline - clock()
        if left is not None and left <= 0:
            raise WaitTimeoutError(f"fine-tuning job {job_id} is still {job.status} after {timeout:g} s", job=job)
        yield Sleep(poll_s if left is None else min(poll_s, left))


# admin


QUOTAS = tuple(m.Quotas.model_fields)  # the quota names, in the server's order


def _quotas(quotas: dict[str, int | None]) -> dict[str, int]:
    unknown = sorted(set(quotas) - set(QUOTAS))
    if unknown:
        raise TypeError(f"unknown quota {', '.join(unknown)}; one of {', '.join(QUOTAS)}")
    return {k: v for k, v in quotas.items() if v is not None}


def create_tenant(name: str, **quotas: int | None) -> Call:
    """Quotas left out get the server's defaults."""
    body = {"name": name, "quotas": _quotas(quotas)}
    return Call("POST", "/admin/tenants", json=body, admin=True, parse=m.Tenant.model_validate)


def list_tenants() -> Call:
    return Call("GET", "/admin/tenants", admin=True, parse=m.TenantList.model_validate)


def set_quotas(tenant_id: str, **quotas: int | None) -> Call:
    """Changes the quotas given; the others keep their values."""
    return Call(
        "PATCH", f"/admin/tenants/{_seg(tenant_id)}", json=_quotas(quotas), admin=True, parse=m.Tenant.model_validate
    )


def create_key(tenant_id: str) -> Call:
    return Call("POST", f"/admin/tenants/{_seg(tenant_id)}/keys", admin=True, parse=m.ApiKey.model_validate)


def list_keys(tenant_id: str) -> Call:
    return Call("GET", f"/admin/tenants/{_seg(tenant_id)}/keys", admin=True, parse=m.ApiKeyList.model_validate)


def revoke_key(key_id: str) -> Call:
    return Call("DELETE", f"/admin/keys/{_seg(key_id)}", admin=True, parse=m.ApiKey.model_validate)


# ------------------------------------------------------------------------------------------------ errors


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from_response(status: int, headers: Mapping[str, str], content: bytes) -> APIError:
    """The exception for an error answer, from its status and the body's `error.code`."""
    body: Any = None
    try:
        body = json.loads(content) if content else None
    except ValueError:
        pass
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or f"HTTP {status}")
        code, etype, param = err.get("code"), err.get("type"), err.get("param")
    else:
        text = content.decode("utf-8", "replace").strip()[:500] if content else ""
        message = text or f"HTTP {status}"
        code = etype = param = None
    code = code if isinstance(code, str) else (None if code is None else str(code))
    cls = (
        CODE_ERRORS.get(code or "") or STATUS_ERRORS.get(status) or (InternalServerError if status >= 500 else APIError)
    )
    retry_after = parse_retry_after(_header(headers, "retry-after"))
    return cls(
        message, status=status, code=code, type=etype, param=param, retry_after=retry_after, body=body, headers=headers
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    getter = getattr(headers, "get", None)
    value = getter(name) if getter else None
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def transport_error(exc: BaseException) -> APIConnectionError:
    """Map an httpx transport exception (by class name: the core imports no I/O library)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "TimeoutException" in names:
        return APITimeoutError(f"Request timed out: {exc}" if str(exc) else "Request timed out.")
    return APIConnectionError(f"Connection error: {exc}" if str(exc) else "Connection error.")


# ------------------------------------------------------------------------------------------------ retries


RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
NO_RETRY_CODES = frozenset({"quota_exceeded"})  # waiting does not help: the caller must delete adapters


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff on 429 / 5xx / connection errors; the server's Retry-After wins when present.

    Attempt n (0-based) waits `initial_delay * 2**n` capped at `max_delay`, minus up to `jitter` of it.
    A Retry-After longer than `max_retry_after` is not waited for: the error is raised at once.
    """

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    jitter: float = 0.25
    rand: Callable[[], float] = random.random

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_delay, self.initial_delay * (2**attempt))
        return delay * (1 - self.jitter * self.rand())

    def delay_after_error(self, attempt: int, error: AlignerErrorLike) -> float | None:
        """Seconds to wait before retrying after `error` on `attempt` (0-based), or None to raise it."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, APIConnectionError):
            return self.backoff(attempt)
        if not isinstance(error, APIError) or error.status is None:
            return None
        if error.code in NO_RETRY_CODES:
            return None
        if error.status not in RETRY_STATUSES and error.status < 500:
            return None
        if error.retry_after is not None:
            return None if error.retry_after > self.max_retry_after else error.retry_after
        return self.backoff(attempt)


AlignerErrorLike = APIError | APIConnectionError | BaseException

# a failed attempt: the transport's exception, or an error answer's (status, headers, body)
Failure = BaseException | tuple[int, Mapping[str, str], bytes]


@dataclass
class Retries:
    """The retry loop without its I/O: after each failed attempt a client hands the failure to `delay_after`,
    which raises the mapped exception to give up, or returns the seconds to sleep before the next attempt."""

    policy: RetryPolicy
    attempt: int = 0

    def delay_after(self, failure: Failure) -> float:
        if isinstance(failure, BaseException):
            err: Exception = transport_error(failure)
            cause: BaseException | None = failure
        else:
            err, cause = error_from_response(*failure), None
        delay = self.policy.delay_after_error(self.attempt, err)
        if delay is None:
            raise err from cause
        self.attempt += 1
        return delay


# ------------------------------------------------------------------------------------------------ SSE


DONE = object()  # the `[DONE]` sentinel


class SSEDecoder:
    """Server-sent events, line by line (lines without their newline). `feed` returns a completed event's
    data (str) when a blank line ends one, else None; comments, `event:`, `id:` and `retry:` are skipped."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        fname, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if fname == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The last event when the stream ends without a trailing blank line."""
        return self.feed("")


def decode_event(data: str) -> Any:
    """One event's data: a chunk model, or DONE; an `{"error": ...}` event raises its APIError."""
    if data.strip() == "[DONE]":
        return DONE
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise APIError(f"malformed stream event: {data[:200]!r}", body=data) from e
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        status = err.get("code") if isinstance(err.get("code"), int) else None
        cls = STATUS_ERRORS.get(status or 0, APIError)
        code = err.get("code") if isinstance(err.get("code"), str) else None
        raise cls(
            str(err.get("message") or "stream error"),
            status=status,
            code=code,
            type=err.get("type"),
            param=err.get("param"),
            body=obj,
        )
    return m.ChatCompletionChunk.model_validate(obj)


class ChunkDecoder:
    """A streamed completion's lines in, its chunks out (the I/O-free half of `Stream` and `AsyncStream`):
    `feed` gives the chunks a line completes, `end` those left when the lines run out; once `[DONE]` came,
    `done` is True and nothing after it is read."""

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self.done = False

    def feed(self, line: str) -> list[m.ChatCompletionChunk]:
        return self._decode(self._sse.feed(line))

    def end(self) -> list[m.ChatCompletionChunk]:
        return self._decode(self._sse.flush())

    def _decode(self, data: str | None) -> list[m.ChatCompletionChunk]:
        if data is None:
            return []
        event = decode_event(data)
        if event is DONE:
            self.done = True
            return []
        return [event]
