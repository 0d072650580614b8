"""The Aligner term, as the engine computes it: one general path and its fast twins.

Per adapted layer and token t (DESIGN.md section 2):
    a_t = softmax_N(q_t @ K_p.T / sqrt(D)) @ V_p      # separate softmax over the N prefix keys
    out_t += g[head] * a_t                             # per head, before o_proj

`delta_reference` is the plain per-token loop that the fast paths are tested against.
"""

from __future__ import annotations

import torch


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


def delta_grouped(
    q: torch.Tensor,  # [T, KVH, G, D]
    tok_slot: torch.Tensor,  # [T] slot of each token (0 = no adapter)
    k_table: torch.Tensor,  # [S, KVH, Nmax, D] one layer of the table
    v_table: torch.Tensor,  # [S, KVH, Nmax, D]
    mask_table: torch.Tensor,  # [S, Nmax]
    gate_table: torch.Tensor,  # [S, KVH, G]
    scale: float,
    runs: list[tuple[int, int, int]],  # (start, end, slot): contiguous token runs of one adapter
) -> torch.Tensor:  # [T, KVH, G, D]
    """Like `delta_general` but per run of tokens sharing an adapter: no [T, Nmax, D] gathers.

    Tokens of one request are contiguous, so a long prefill is one run and reads its adapter's K/V once.
    """
    out = torch.zeros_like(q)
    for start, end, slot in runs:
        if slot == 0:
            continue
        scores = torch.matmul(q[start:end], k_table[slot].transpose(-1, -2)) * scale + mask_table[slot]
        out[start:end] = torch.matmul(torch.softmax(scores, dim=-1), v_table[slot]) * gate_table[slot][..., None]
    return out


def token_runs(tok_slot: list[int]) -> list[tuple[int, int, int]]:
    """[0,0,3,3,3,1] -> [(0,2,0), (2,5,3), (5,6,1)]."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(tok_slot) + 1):
        if i == len(tok_slot) or tok_slot[i] != tok_slot[start]:
            runs.append((start, i, tok_slot[start]))
            start = i
    return runs


def delta_single_token(
    bias: torch.Tensor,  # [T, H*D] the per-slot g * V_p of each token's adapter
) -> torch.Tensor:
    """N = 1: the softmax over one key is 1, so the term is the constant g * V_p (exact)."""
    return bias


def single_token_bias(
    v: torch.Tensor,  # [..., KVH, 1, D] V_p of one-token adapters in one layer
    gate: torch.Tensor,  # [..., KVH, G]
) -> torch.Tensor:  # [..., KVH*G*D]
    return (gate[..., None] * v[..., 0, None, :]).flatten(-3)


def delta_reference(
    q: torch.Tensor,  # [T, H, D]
    kp: list[torch.Tensor | None],  # per token: [N, KVH, D] or None for no adapter
    vp: list[torch.Tensor | None],  # per token: [N, KVH, D]
    gates: list[torch.Tensor | None],  # per token: [H]
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """Token by token, head by head, with the GQA repeat spelled out. Slow; the ground truth."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    for t in range(T):
        if kp[t] is None:
            continue
        group = H // kp[t].shape[1]
        for h in range(H):
            keys = kp[t][:, h // group, :].float()  # [N, D]
            vals = vp[t][:, h // group, :].float()
            p = torch.softmax(keys @ q[t, h].float() * scale, dim=0)  # [N]
            out[t, h] = gates[t][h] * (p @ vals)
    return out
