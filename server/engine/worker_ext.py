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

    def aligner_unload(self, key: str) -> bool:
        """Free `key`'s slot; False while a batch row still uses it."""
        st = _state()
        return st.table.evict(key, in_use=st.routing.slots_in_use())

    def aligner_stats(self) -> dict:
        st = _state()
        return {**st.table.stats(), "unknown_key_events": st.routing.unknown_key_events, "keys": st.table.keys()}


def _state():
    st = worker_state()
    if st is None:
        raise RuntimeError("this engine was not started with an Aligner model architecture")
    return st
