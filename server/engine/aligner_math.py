"""The Aligner term, as the engine's torch kernel computes it (`delta_general`), and its reference.

Per adapted layer and token t (DESIGN.md section 2):
    a_t = softmax_N(q_t @ K_p.T / sqrt(D)) @ V_p      # separate softmax over the N prefix keys
    out_t += g[head] * a_t                             # per head, before o_proj

The reference of the term is `aligner_term`, written once in `aligner_core.reference` (the HF forward and
training compute it too) and re-exported here; `delta_reference` applies it token by token, each token with
its own adapter, and is what every kernel (server/engine/kernels/) is tested against.
"""

from __future__ import annotations

import torch

from aligner_core.reference import aligner_term  # re-exported: the engine's tests compare against it


def delta_general(
    q: torch.Tensor,  # [T, KVH, G, D] float32, post-RoPE queries grouped by kv head
    k: torch.Tensor,  # [T, KVH, Nmax, D] each token's adapter keys (zeros past its N)
    v: torch.Tensor,  # [T, KVH, Nmax, D]
    mask: torch.Tensor,  # [T, Nmax] 0 for real prefix tokens, -inf for padding
    gate: torch.Tensor,  # [T, KVH, G] gate after activation
    scale: float,
) -> torch.Tensor:  # [T, KVH, G, D]
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask[:, None, None, :])  # [T, KVH, G, Nmax]
    return torch.matmul(_softmax_small(scores), v).mul_(gate[..., None])


def _softmax_small(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dim (the prefix tokens), in place: on CPU about 4x faster than
    torch.softmax, whose per-row set-up dominates when rows have a handful of entries. Every row has at
    least one finite entry (the mask keeps key 0)."""
    e = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def delta_reference(
    q: torch.Tensor,  # [T, H, D]
    kp: list[torch.Tensor | None],  # per token: [N, KVH, D] or None for no adapter
    vp: list[torch.Tensor | None],  # per token: [N, KVH, D]
    gates: list[torch.Tensor | None],  # per token: [H]
    scale: float,
) -> torch.Tensor:  # [T, H, D] float32
    """`aligner_term` token by token, each with its own adapter, in float32; exact zeros where a token has
    none. Slow; the ground truth."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    for t in range(T):
        k, v, g = kp[t], vp[t], gates[t]
        if k is None or v is None or g is None:
            continue
        out[t] = aligner_term(q[t, :, None].float(), k.float(), v.float(), g.float(), scale)[:, 0]  # q_t: [H, 1, D]
    return out
