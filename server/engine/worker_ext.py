"""Methods vLLM mixes into every worker (`worker_extension_cls`), called through `collective_rpc`.

Arguments travel as untyped msgpack, so adapters arrive as their aligner/v1 file bytes, never tensors.
"""

from __future__ import annotations

from aligner_core.adapter_format import decode
from server.engine.op import worker_state


class AlignerWorkerExtension:
    def aligner_load(self, key: str, data: bytes, scale: float = 1.0) -> int:
        """Make `key` resident (idempotent), at `scale` (`config.scaled_key` names it); returns its slot. Raises
        TableFull when no slot is free."""
        return _state().load(key, decode(data), scale)

    def aligner_load_many(self, items: list[tuple[str, bytes]]) -> int:
        """Bulk `aligner_load` (warming a replica, benchmarks); returns how many are resident afterwards."""
        return _state().load_many((key, decode(data)) for key, data in items)

    def aligner_unload(self, key: str, force: bool = False) -> bool:
        """Free `key`'s slot; without `force`, False while a batch row still names it.

        The frontend knows better than the rows: a finished request keeps its (stale) row until the next
        step removes it, which on an idle engine never comes. The frontend, which counts in-flight
        requests (preempted ones included), passes force=True once none holds the key; stale rows are
        removed before any later forward, so they never read the freed slot.
        """
        return _state().evict(key, force=force)

    def aligner_counters(self) -> dict:
        """The few counters the server's /metrics pulls on each scrape (cheap: no key list)."""
        return _state().counters()

    def aligner_stats(self) -> dict:
        return _state().stats()


def _state():
    st = worker_state()
    if st is None:
        raise RuntimeError("this engine was not started with an Aligner model architecture")
    return st
