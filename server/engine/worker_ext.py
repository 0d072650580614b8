"""Methods vLLM mixes into every worker (`worker_extension_cls`), called through `collective_rpc`.

Arguments travel as untyped msgpack, so adapters arrive as their aligner/v1 file bytes, never tensors.
"""

from __future__ import annotations

from aligner_core.adapter_format import decode
from server.engine.op import worker_state


class AlignerWorkerExtension:
    def aligner_load(self, key: str, data: bytes) -> int:
        """Make `key` resident (idempotent); returns its slot. Raises TableFull when no slot is free."""
        return _state().table.put(key, decode(data))

    def aligner_load_many(self, items: list[tuple[str, bytes]]) -> int:
        """Bulk `aligner_load` (warming a replica, benchmarks); returns how many are resident afterwards."""
        table = _state().table
        for key, data in items:
            table.put(key, decode(data))
        return len(table.raw)

    def aligner_unload(self, key: str, force: bool = False) -> bool:
        """Free `key`'s slot; without `force`, False while a batch row still names it.

        The frontend knows better than the rows: a finished request keeps its (stale) row until the next
        step removes it, which on an idle engine never comes. The frontend, which counts in-flight
        requests (preempted ones included), passes force=True once none holds the key; stale rows are
        removed before any later forward, so they never read the freed slot.
        """
        st = _state()
        return st.table.evict(key, in_use=set() if force else st.routing.slots_in_use())

    def aligner_counters(self) -> dict:
        """The few counters the server's /metrics pulls on each scrape (cheap: no key list)."""
        return {"unknown_key_events": _state().routing.unknown_key_events}

    def aligner_stats(self) -> dict:
        st = _state()
        return {**st.table.stats(), "kernel": st.kernel(), "kv_dtype": str(st.table.k.dtype).removeprefix("torch."), "op_seconds": st.op_seconds, "unknown_key_events": st.routing.unknown_key_events,
                "keys": st.table.keys()}  # fmt: skip


def _state():
    st = worker_state()
    if st is None:
        raise RuntimeError("this engine was not started with an Aligner model architecture")
    return st
