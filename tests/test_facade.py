"""The engine facade's residency rules (LRU among unpinned adapters, pins, retire) with a recording fake
engine client; the real engine's side is covered by the parity, tenancy and reliability tests."""

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
