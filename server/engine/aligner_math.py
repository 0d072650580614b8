"""The Aligner term, as the engine computes it: one general path and its fast twins.

Per adapted layer and token t (DESIGN.md section 2):
    a_t = softmax_N(q_t @ K_p.T / sqrt(D)) @ V_p      # separate softmax over the N prefix keys
    out_t += g[head] * a_t                             # per head, before o_proj

The reference of the term is `aligner_term`, written once in `aligner_core.reference` (the HF forward and
training compute it too) and re-exported here; `delta_reference` applies it token by token, each token with
its own adapter, and is what the fast paths, the Triton kernel and the C kernel are tested against.
"""

from __future__ import annotations

import numpy as np
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


def add_term_torch(
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
    """The graph launch's torch twin, with the Triton kernel's signature (`aligner_delta_triton`): every token
    computed, no host sync, no shape that depends on the routing, so a recorded call is right at replay for
    any `tok_slot` and table contents (tests/test_graph_replay.py). Returns `out`."""
    T = out.shape[0]
    S, KVH, N, D = k_layer.shape
    n = min(int(n_max_used), N)
    qg = q.reshape(T, KVH, -1, D).float()  # [T, KVH, G, D]
    k, v = k_layer[tok_slot, :, :n], v_layer[tok_slot, :, :n]  # [T, KVH, n, D]
    delta = delta_general(qg, k, v, mask[tok_slot, :n], gate_layer[tok_slot], scale)  # [T, KVH, G, D]
    return out.add_(delta.reshape(T, -1).to(out.dtype))


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


def delta_chunked(
    q: torch.Tensor,  # [T, KVH, G, D]
    rows: torch.Tensor,  # [M*C] token index of each chunk row; T marks padding
    chunk_slot: torch.Tensor,  # [M] slot of each chunk
    inverse: torch.Tensor,  # [T] row of each token in the chunks; M*C for tokens without an adapter
    k_table: torch.Tensor,  # [S, KVH, Nmax, D] one layer of the table
    v_table: torch.Tensor,  # [S, KVH, Nmax, D]
    mask_table: torch.Tensor,  # [S, Nmax]
    gate_table: torch.Tensor,  # [S, KVH, G]
    scale: float,
    n: int,  # keys to use (the step's largest N)
) -> torch.Tensor:  # [T, KVH, G, D]
    """Like `delta_general`, with the tokens regrouped into chunks of C tokens sharing one adapter
    (`chunk_layout`): each chunk reads its adapter's keys once and multiplies [C*G, D] by [D, n], instead of
    gathering [n, D] keys and values for every token. Cheaper on CPU when n is large (fewer bytes moved,
    larger matrix products)."""
    T, KVH, G, D = q.shape
    M = chunk_slot.shape[0]
    C = rows.shape[0] // M
    pad = q.new_zeros(1, KVH, G, D)
    qc = torch.cat([q, pad])[rows].view(M, C, KVH, G, D).transpose(1, 2).reshape(M, KVH, C * G, D)
    scores = torch.matmul(qc, k_table[chunk_slot, :, :n].transpose(-1, -2)).mul_(scale)  # [M, KVH, C*G, n]
    scores.add_(mask_table[chunk_slot, :n][:, None, None, :])
    a = torch.matmul(_softmax_small(scores), v_table[chunk_slot, :, :n])  # [M, KVH, C*G, D]
    a = a.view(M, KVH, C, G, D).mul_(gate_table[chunk_slot][:, :, None, :, None])
    return torch.cat([a.transpose(1, 2).reshape(M * C, KVH, G, D), pad])[inverse]


def chunk_layout(tok_slot: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adapted tokens grouped by slot (stable) and cut into chunks of `chunk` rows, padded with index T.
    Returns (rows [M*chunk], chunk_slot [M], inverse [T]) for `delta_chunked`."""
    T = len(tok_slot)
    adapted = np.flatnonzero(tok_slot)
    order = adapted[np.argsort(tok_slot[adapted], kind="stable")]
    slots = tok_slot[order]
    starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if len(order) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, len(order)])
    per_group = -(-sizes // chunk)  # chunks per slot group
    group = np.repeat(np.arange(len(starts)), per_group)  # [M] slot group of each chunk
    chunk_slot = slots[starts][group]
    # row r of chunk c of group g holds token order[starts[g] + c*chunk + r] when that is inside the group
    c = np.arange(len(group)) - (np.cumsum(per_group) - per_group)[group]  # [M] chunk index within its group
    pos = (starts[group] + c * chunk)[:, None] + np.arange(chunk)[None, :]  # [M, chunk]
    end = (starts + sizes)[group]
    inside = pos < end[:, None]
    rows = np.full(pos.shape, T, dtype=np.int64)
    rows[inside] = order[pos[inside]]
    rows = rows.reshape(-1)
    inverse = np.full(T, len(rows), dtype=np.int64)
    real = rows < T
    inverse[rows[real]] = np.flatnonzero(real)
    return rows, chunk_slot.astype(np.int64), inverse


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
