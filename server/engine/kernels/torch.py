"""The torch kernel: the general path in torch ops, the reference twin of the fused kernels.

Every token is computed (slot 0's zero gates add exact zeros), with gathers of each token's K_p/V_p rows:
no host sync and no shape that depends on the routing, so it is graph-safe, and with the Triton kernel's
signature (`add_term`), so a test can stand it in for Triton on a CPU."""

from __future__ import annotations

import torch

from server.engine.aligner_math import delta_general
from server.engine.kernels import LayerLaunch


def add_term(
    out: torch.Tensor,  # [T, H*D] attention output before o_proj; updated in place
    q: torch.Tensor,  # [T, H*D] post-RoPE queries
    tok_slot: torch.Tensor,  # [T] long slot of each token, 0 = no adapter (zero gates: adds exact zeros)
    k_layer: torch.Tensor,  # [S, KVH, Nmax, D] float32: one layer of AdapterTable.k
    v_layer: torch.Tensor,  # [S, KVH, Nmax, D] float32
    mask: torch.Tensor,  # [S, Nmax] float32: 0 for real prefix tokens, -inf for padding (mask[:, 0] == 0)
    gate_layer: torch.Tensor,  # [S, KVH, G] float32
    scale: float,
    n_max_used: int,  # keys 0..n_max_used-1 are read
) -> torch.Tensor:
    """out += the term of one layer for every token; returns `out`."""
    T = out.shape[0]
    S, KVH, N, D = k_layer.shape
    n = min(int(n_max_used), N)
    qg = q.reshape(T, KVH, -1, D).float()  # [T, KVH, G, D]
    k, v = k_layer[tok_slot, :, :n], v_layer[tok_slot, :, :n]  # [T, KVH, n, D]
    delta = delta_general(qg, k.float(), v.float(), mask[tok_slot, :n], gate_layer[tok_slot], scale)  # [T, KVH, G, D]
    return out.add_(delta.reshape(T, -1).to(out.dtype))


class TorchKernel(LayerLaunch):
    name = "torch"
    launch = staticmethod(add_term)
