"""Per-request routing on vLLM's V1 model runner (CPU, and GPU without Triton).

A logits processor that never changes logits, used as a row-state tracker: `update_state` sees every
added, removed and moved batch row with its SamplingParams, after condense and reorder and before the
forward. Each row's adapter key (SamplingParams.extra_args["aligner"]) is handed to the worker state,
which routes the row to the key's table slot.
"""

from __future__ import annotations

import logging

import torch

from server.engine.config import EXTRA_ARGS_KEY
from server.engine.op import worker_state
from server.engine.vllm_glue import BatchUpdate, LogitsProcessor, MoveDirectionality, SamplingParams, VllmConfig

KEY_PREFIX_CHARS = 12  # enough of the sha256 key to find the adapter; names and tenants never reach the worker

log = logging.getLogger(__name__)


def adapter_key(params: SamplingParams | None) -> str | None:
    extra = getattr(params, "extra_args", None) or {}
    key = extra.get(EXTRA_ARGS_KEY)
    return key if isinstance(key, str) and key else None


class AlignerRoutingLP(LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._state = worker_state()

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        st = self._state or worker_state()
        if not batch_update or st is None:
            return
        self._state = st
        for row, params, _, _ in batch_update.added:
            key = adapter_key(params)
            if st.assign(row, key) == 0 and key:  # a logits processor cannot fail a request: run as base
                log.error(
                    "unknown adapter key %s: batch row %d runs as the base model (the frontend's lease "
                    "should have made it resident)",
                    key[:KEY_PREFIX_CHARS],
                    row,
                )
        for row in batch_update.removed:
            st.release(row)
        for src, dst, direction in batch_update.moved:
            st.move(src, dst, swap=direction == MoveDirectionality.SWAP)
