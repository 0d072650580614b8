"""Fuzzing: schemathesis against the real server's own OpenAPI document (as a tenant and as the admin: no 5xx,
every 4xx in OpenAI's error shape), and a seeded fuzz of the adapter parser `decode` (every malformed input
raises AdapterFormatError, nothing else; no hang; no large allocation)."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import support
import torch
from support import Server, require_in_ci, serve, tiny_spec

from aligner_core.adapter_format import Adapter, decode, encode
from aligner_core.errors import AdapterFormatError

ERROR_KEYS = {"message", "type", "param", "code"}

# --- schemathesis: every operation of /openapi.json, as a tenant and as the admin ---

ADMIN = "admin-key-for-fuzz-tests-0123456789"
OPERATIONS = support.OPERATIONS  # test_operations_are_all_covered keeps it equal to the OpenAPI document
EXAMPLES = int(os.environ.get("ALIGNER_FUZZ_EXAMPLES", "50"))  # per operation and role, valid and invalid mixed
WRONG_ROLE_EXAMPLES = 8  # a tenant on /admin, the admin on /v1: every answer is a 401
MAX_TOKENS = 4  # generation stays cheap; limits themselves are tested in test_security.py


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[Server]:
    yield from serve(tmp_path_factory.mktemp("fuzz"), {"ALIGNER_ADMIN_KEY": ADMIN, "ALIGNER_MAX_MODEL_LEN": "256"})


@pytest.fixture(scope="module")
def keys(fuzz_server: Server) -> dict[str, str]:
    import httpx

    auth = {"authorization": f"Bearer {ADMIN}"}
    tenant = httpx.post(fuzz_server.base + "/admin/tenants", json={"name": "fuzzer"}, headers=auth, timeout=30).json()
    key = httpx.post(f"{fuzz_server.base}/admin/tenants/{tenant['id']}/keys", headers=auth, timeout=30).json()["key"]
    return {"tenant": key, "admin": ADMIN}


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    try:
        import schemathesis
    except ImportError:
        require_in_ci("schemathesis is not installed: pip install -e '.[test]'")
    return schemathesis.openapi.from_url(fuzz_server.base + "/openapi.json")


def figure(test: str, **figures: object) -> None:
    """A measured figure for RELIABILITY.md (through support.record where the helper exists)."""
    record = getattr(support, "record", None)
    if record is not None:
        record(test, **figures)
    else:
        print(f"\n[figure] {test}: {figures}")


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter]:
    counts: Counter = Counter()
    yield counts
    if counts:
        figure(
            "test_fuzz::test_schemathesis",
            operations=len(OPERATIONS),
            roles=2,
            calls=sum(v for k, v in counts.items() if k[0] == "calls"),
            **{f"status_{k[1]}": v for k, v in sorted(counts.items()) if k[0] == "status"},
        )


@pytest.mark.server
def test_operations_are_all_covered(api_schema) -> None:
    found = {(m.upper(), p) for p, ops in api_schema.raw_schema["paths"].items() for m in ops}
    assert found == set(OPERATIONS)


def _cap_generation(body: object) -> None:
    """Keep generation requests cheap: at most MAX_TOKENS new tokens per choice, at most 2 choices."""
    if not isinstance(body, dict):
        return
    for field, cap in (
        ("max_tokens", MAX_TOKENS),
        ("max_completion_tokens", MAX_TOKENS),
        ("n", 2),
        ("best_of", 2),
        ("min_tokens", 1),
    ):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[field] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS


def check_response(case, response) -> None:
    label = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.content[:600]!r}"
    assert response.status_code < 500, label
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert isinstance(body, dict) and set(body) == {"error"}, label
        assert isinstance(body["error"], dict) and set(body["error"]) == ERROR_KEYS, label
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], label
        assert isinstance(body["error"]["type"], str), label


@pytest.mark.server
@pytest.mark.parametrize("role", ["tenant", "admin"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis(
    fuzz_server: Server, api_schema, keys: dict[str, str], tally: Counter, role: str, method: str, path: str
) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    operation = api_schema[path][method]
    strategy = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    right_role = path.startswith("/admin") == (role == "admin") or not path.startswith(("/v1", "/admin"))
    examples = EXAMPLES if right_role else WRONG_ROLE_EXAMPLES

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )  # no shrinking: bounded time, the example is printed
    @given(case=strategy)
    def run(case) -> None:
        if path in ("/v1/chat/completions", "/v1/completions"):
            _cap_generation(case.body)
        response = case.call(base_url=fuzz_server.base, headers={"Authorization": f"Bearer {keys[role]}"}, timeout=120)
        tally["calls", role] += 1
        tally["status", f"{response.status_code // 100}xx"] += 1
        check_response(case, response)

    run()


@pytest.mark.server
def test_found_by_fuzzing_are_4xx(fuzz_server: Server, keys: dict[str, str]) -> None:
    """Requests that the fuzz found answered 500, kept as named cases."""
    import httpx

    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    header, payload = tensor_header(random.Random(1))
    cases = [
        ("/v1/chat/completions", {"json": {"messages": []}}),  # vLLM's VLLMValidationError
        ("/v1/chat/completions", {"json": {"messages": None}}),  # TypeError in vLLM's request validator
        ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [audio]}]}}),  # ValueError
        ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10**6}}),
        ("/v1/completions", {"json": {"prompt": None}}),
        (
            "/v1/adapters",
            {"files": {"file": ("a", container(b"[" * 60000))}, "data": {"name": "deep"}},
        ),  # RecursionError
        (
            "/v1/adapters",
            {
                "files": {"file": ("a", container(dict(header, gate={"dtype": ["F32"]}), payload))},
                "data": {"name": "unhashable"},
            },
        ),  # TypeError in decode
    ]
    for path, kw in cases:
        r = httpx.post(fuzz_server.base + path, headers={"authorization": f"Bearer {keys['tenant']}"}, timeout=60, **kw)
        assert 400 <= r.status_code < 500, (path, kw, r.text)
        assert set(r.json()["error"]) == ERROR_KEYS
    r = httpx.post(
        fuzz_server.base + "/admin/tenants",
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=30,
        json={"name": "big", "quotas": {"max_adapter_bytes": 2**64}},
    )
    assert r.status_code == 400 and set(r.json()["error"]) == ERROR_KEYS, r.text


@pytest.mark.server
def test_server_survived_the_fuzz(fuzz_server: Server, keys: dict[str, str]) -> None:
    import httpx

    assert httpx.get(fuzz_server.base + "/health", timeout=30).status_code == 200
    r = httpx.post(
        fuzz_server.base + "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 2},
        headers={"authorization": f"Bearer {keys['tenant']}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    log = fuzz_server.log.read_text(errors="replace")
    for sign in (" 500 Internal Server Error", "unhandled error", "Exception in ASGI application"):
        assert sign not in log, sign  # no request error escaped to the catch-all handler, not even a logged one


# --- the adapter parser: a seeded fuzz of `decode` ---

SPEC = tiny_spec()  # hidden 64, 4 layers, 4 heads: small files, many cases per second
CASES_PER_FAMILY = 600
META = Adapter.random(SPEC, tokens=1).metadata()


def container(header: object, payload: bytes = b"", *, declared: int | None = None) -> bytes:
    """A safetensors container with any header (object, or raw bytes) and a declared header length."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + payload


def valid_files(rng: random.Random) -> bytes:
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    adapter = Adapter.random(
        SPEC,
        tokens=rng.randint(1, 4),
        start_layer=rng.randint(0, 3),
        seed=rng.randrange(1 << 30),
        gate_activation=rng.choice(["identity", "tanh"]),
        dtype=dtype,
    )
    return encode(adapter)


def tensor_header(rng: random.Random) -> tuple[dict, bytes]:
    """A header for a valid tiny adapter, with its payload, ready to be bent in one place."""
    n, start = rng.randint(1, 3), rng.randint(0, 3)
    prefix, gate = n * SPEC.hidden_size * 4, (SPEC.num_layers - start) * SPEC.num_heads * 4
    header = {
        "__metadata__": META | {"start_layer": str(start)},
        "gate": {"dtype": "F32", "shape": [SPEC.num_layers - start, SPEC.num_heads], "data_offsets": [0, gate]},
        "prefix": {"dtype": "F32", "shape": [n, SPEC.hidden_size], "data_offsets": [gate, gate + prefix]},
    }
    return header, b"\0" * (gate + prefix)


HUGE = [2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 10**30, -1, -(2**63)]
ODD = [None, True, 1.5, "3", [], {}, [1], {"a": 1}, "", "F32" * 1000, float("nan"), -0.0]


def random_bytes(rng: random.Random) -> bytes:
    data = rng.randbytes(rng.choice([0, 1, 7, 8, 9, 64, rng.randint(0, 4096)]))
    if len(data) >= 8 and rng.random() < 0.5:  # a plausible header length over random bytes
        data = struct.pack("<Q", rng.randint(0, len(data))) + data[8:]
    return data


def mutated(rng: random.Random) -> bytes:
    data = bytearray(valid_files(rng))
    kind = rng.choice(["flip", "flip-header", "truncate", "insert", "delete", "append", "splice"])
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "flip-header":  # the length prefix and the JSON, where a flip changes structure
        (n,) = struct.unpack("<Q", data[:8])
        i = rng.randrange(8 + n)
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind == "insert":
        i = rng.randrange(len(data))
        data[i:i] = rng.randbytes(rng.randint(1, 64))
    elif kind == "delete":
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 64)]
    elif kind == "append":
        data += rng.randbytes(rng.randint(1, 256))
    else:
        other = valid_files(rng)
        data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]
    return bytes(data)


def bad_header_length(rng: random.Random) -> bytes:
    data = valid_files(rng)
    declared = rng.choice(HUGE[:-2] + [len(data) - 7, len(data), 64 * 1024 + 1, 2**16, 0, 1, 2])
    return struct.pack("<Q", declared % 2**64) + data[8:]


def bad_tensor_info(rng: random.Random) -> bytes:
    header, payload = tensor_header(rng)
    name = rng.choice(["prefix", "gate"])
    field = rng.choice(["shape", "data_offsets", "dtype", "whole"])
    if field == "shape":
        header[name]["shape"] = rng.choice(
            [
                [rng.choice(HUGE), rng.choice(HUGE)],
                [rng.choice(HUGE)] * rng.randint(1, 6),
                [2**32, 2**32, 2**32],
                [0, SPEC.hidden_size],
                [SPEC.hidden_size],
                [],
                [1, 1, 1, SPEC.hidden_size],
                [rng.choice(ODD)],
                rng.choice(ODD),
                [rng.randint(0, 9), rng.randint(0, 99)],
            ]
        )
    elif field == "data_offsets":
        size = len(payload)
        header[name]["data_offsets"] = rng.choice(
            [
                [0, rng.choice(HUGE)],
                [rng.choice(HUGE), rng.choice(HUGE)],
                [size, 0],
                [0, size + 4],
                [4, 4],
                [-4, 0],
                [0],
                [0, 1, 2],
                rng.choice(ODD),
                [rng.choice(ODD), 0],
                [0, size],
            ]
        )
    elif field == "dtype":
        header[name]["dtype"] = rng.choice(
            ["F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "f32", "F32 ", "", "BF16\0", *ODD]
        )
    else:
        header[name] = rng.choice(ODD)
    return container(header, payload)


def non_finite(rng: random.Random) -> bytes:
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    adapter = Adapter.random(SPEC, tokens=rng.randint(1, 3), seed=rng.randrange(1 << 30), dtype=dtype)
    t = adapter.prefix if rng.random() < 0.5 else adapter.gate
    flat = t.view(-1)
    for _ in range(rng.randint(1, 3)):
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    if dtype == torch.float16 and rng.random() < 0.3:  # finite in float32, infinite once stored as float16
        flat[rng.randrange(flat.numel())] = 1e6
    return encode(adapter)


def wrong_structure(rng: random.Random) -> bytes:
    header, payload = tensor_header(rng)
    kind = rng.choice(["extra", "missing", "renamed", "gate-shape", "prefix-hidden", "meta"])
    if kind == "extra":  # a third tensor, even a well-formed one
        header["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(payload), len(payload) + 4]}
        payload += b"\0" * 4
    elif kind == "missing":
        del header[rng.choice(["prefix", "gate"])]
    elif kind == "renamed":
        header["Prefix"] = header.pop("prefix")
    elif kind == "gate-shape":  # same byte count, other shape
        rows, cols = header["gate"]["shape"]
        header["gate"]["shape"] = rng.choice([[cols, rows], [rows * cols, 1], [1, rows * cols]])
        if header["gate"]["shape"] == [rows, cols]:
            header["gate"]["shape"] = [rows * cols]
    elif kind == "prefix-hidden":
        n, hidden = header["prefix"]["shape"]
        header["prefix"]["shape"] = [n * 2, hidden // 2]
    else:
        meta = header["__metadata__"]
        key = rng.choice(list(meta) + ["__all__"])
        if key == "__all__":
            header["__metadata__"] = rng.choice(ODD + ["aligner/v1"])
        elif rng.random() < 0.3:
            del meta[key]
        else:
            meta[key] = rng.choice(
                [
                    "",
                    "-1",
                    "1e3",
                    "9" * 5000,
                    "0x10",
                    " 2 ",
                    "tanh",
                    "aligner/v2",
                    "relu",
                    str(SPEC.num_layers),
                    "4.0",
                    "nan",
                    "\x00",
                    *ODD,
                ]
            )
    return container(header, payload)


def not_json(rng: random.Random) -> bytes:
    header, payload = tensor_header(rng)
    text = json.dumps(header).encode()
    raw = rng.choice(
        [
            text[: rng.randrange(len(text))],
            b"\xff\xfe" + text,
            text.replace(b'"', b"'", 3),
            b"[" * rng.randint(1, 60000),
            b'{"a":' * rng.randint(1, 12000),
            b"NaN",
            b"null",
            b'"aligner"',
            b"[1, 2]",
            b"1e999",
            b"\x00" * 64,
            rng.randbytes(rng.randint(1, 512)),
            text + b"}",
            b"{" + b'"k": 1,' * 5000 + b'"k": 2}',
        ]
    )
    raw += b" " * (-len(raw) % 8)
    return container(raw, payload if rng.random() < 0.5 else b"")


FAMILIES: dict[str, Callable[[random.Random], bytes]] = {
    "random_bytes": random_bytes,
    "mutated_valid": mutated,
    "bad_header_length": bad_header_length,
    "bad_tensor_info": bad_tensor_info,
    "non_finite": non_finite,
    "wrong_structure": wrong_structure,
    "not_json": not_json,
}


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum, frame):
        raise Hang(f"decode ran past {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def memory_cap(mib: int) -> Iterator[None]:
    """Let the process's data segment grow by at most `mib` MiB: a larger allocation fails (MemoryError, or
    torch's RuntimeError), which the fuzz loop reports as a wrong exception type."""
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (psutil.Process().memory_info().data + (mib << 20), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_fuzz(family: str) -> None:
    """Every input either decodes to a valid adapter or raises AdapterFormatError; never another exception,
    never more than a second or two (5 s aborts it), never an allocation past 256 MiB."""
    rng = random.Random(f"aligner-decode-{family}")
    decode(encode(Adapter.random(SPEC)))  # warm up torch outside the memory cap
    outcomes, slowest = Counter(), 0.0
    for i in range(CASES_PER_FAMILY):
        data = FAMILIES[family](rng)
        t0 = time.perf_counter()
        try:
            with time_limit(5), memory_cap(256):
                adapter = decode(data, max_bytes=1 << 20)
        except AdapterFormatError as e:
            assert e.message and isinstance(e.message, str)
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - exactly what this test looks for
            pytest.fail(f"{family} case {i}: {type(e).__name__}: {e}\ninput[:200] = {data[:200]!r}")
        else:
            assert torch.isfinite(adapter.prefix.float()).all() and torch.isfinite(adapter.gate.float()).all()
            outcomes["decoded"] += 1
        slowest = max(slowest, time.perf_counter() - t0)
    figure(
        f"test_fuzz::test_decode_fuzz[{family}]",
        cases=CASES_PER_FAMILY,
        slowest_ms=round(slowest * 1000, 1),
        **outcomes,
    )
    assert slowest < 2.0, slowest
    if family not in ("mutated_valid", "random_bytes"):
        assert outcomes["refused"] > 0.5 * CASES_PER_FAMILY, outcomes  # the family really is malformed
    if family in ("non_finite", "bad_header_length", "not_json"):
        assert outcomes["decoded"] == 0, outcomes


def test_decode_known_tricky_inputs() -> None:
    """Found by the fuzz above, kept as named cases: each once raised something other than AdapterFormatError."""
    header, payload = tensor_header(random.Random(0))
    unhashable = dict(header, prefix=dict(header["prefix"], dtype=["F32"]))
    for data in (
        container(b"[" * 60000),
        container(unhashable, payload),
        container(dict(header, gate=dict(header["gate"], dtype={"F32": 1})), payload),
    ):
        with pytest.raises(AdapterFormatError):
            decode(data)
