"""Per-request routing on vLLM's V2 model runner (GPU with Triton). Code-complete, not run on CPU.

The model supplies its own ModelState: `add_request` sees each request's SamplingParams with its
persistent index (the row the worker state routes), and `prepare_inputs` (just before the forward) names
the rows of the coming batch and their tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.engine.op import worker_state
from server.engine.routing_v1 import adapter_key
from server.engine.vllm_glue import DefaultModelState

if TYPE_CHECKING:
    from server.engine.vllm_glue import InputBatch, NewRequestData


class AlignerModelState(DefaultModelState):
    def add_request(self, req_index: int, new_req_data: NewRequestData) -> None:
        super().add_request(req_index, new_req_data)
        st = worker_state()
        if st is not None:
            st.assign(req_index, adapter_key(new_req_data.sampling_params))

    def prepare_inputs(self, input_batch: InputBatch, req_states: Any) -> dict[str, Any]:
        st = worker_state()
        if st is not None:
            R = input_batch.num_reqs
            st.set_batch(input_batch.idx_mapping_np[:R], input_batch.query_start_loc_np[: R + 1])
        return super().prepare_inputs(input_batch, req_states)
