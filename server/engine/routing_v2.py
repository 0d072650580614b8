"""Per-request routing on vLLM's V2 model runner (GPU with Triton). Code-complete, not run on CPU.

The model supplies its own ModelState: `add_request` sees each request's SamplingParams with its
persistent index, and `prepare_inputs` (just before the forward) expands batch rows to tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from server.engine.op import worker_state
from server.engine.routing_v1 import adapter_key


class AlignerModelState(DefaultModelState):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._req_slot = np.zeros(self.max_num_reqs, dtype=np.int64)  # persistent request index -> slot

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        super().add_request(req_index, new_req_data)
        st = worker_state()
        key = adapter_key(new_req_data.sampling_params)
        slot = st.table.lookup(key, set(self._req_slot.tolist()) | st.routing.slots_in_use()) if (st and key) else 0
        if st and key and slot == 0:
            st.routing.unknown_key_events += 1
        self._req_slot[req_index] = slot

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> dict[str, Any]:
        st = worker_state()
        if st is not None:
            rows = self._req_slot[input_batch.idx_mapping_np[: input_batch.num_reqs]]  # [R]
            qsl = input_batch.query_start_loc_np[: input_batch.num_reqs + 1]
            st.routing.set_v2_tokens(np.repeat(rows, np.diff(qsl)) if rows.any() else None)
        return super().prepare_inputs(input_batch, req_states)
