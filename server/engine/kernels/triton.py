"""A fused Triton kernel for the Aligner term: one launch per layer, reading the slot table directly.

For every token t whose slot s = tok_slot[t] is > 0, and every query head h = kvh * G + g (GQA):

    out[t, h*D:(h+1)*D] += gate[s, kvh, g] * softmax_n(q[t, h] . k[s, kvh, n] * scale + mask[s, n]) @ v[s, kvh, n]

over n < n_max_used. Tokens of slot 0 are left untouched (not even re-written). This is the same math as
`aligner_math.delta_general`, without its [T, KVH, Nmax, D] gathers: each program reads its adapter's
K/V rows straight from the table (tokens sharing an adapter hit L2), accumulates in float32 with an
online softmax over chunks of the prefix, and adds into `out` (fp16, bf16 or fp32) in place.

CUDA-graph friendly: the launcher does no host syncs and reads no device values; the grid is fixed by
(T, KVH), so a captured launch replays with whatever tok_slot / table contents hold at replay time.

This module imports on machines without triton or without a GPU; `triton_available()` says whether the
kernel can run. Triton is imported lazily, on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from server.engine.kernels import LayerLaunch

MAX_BLOCK_N = 16  # prefix keys per online-softmax chunk; longer prefixes loop
MAX_TILE = 8192  # BLOCK_G * BLOCK_N * BLOCK_D: the broadcast product held in registers per chunk


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@dataclass(frozen=True)
class LaunchParams:
    grid: tuple[int, int]  # (T, KVH): one program per token and kv head
    group: int  # G = H // KVH query heads per kv head
    block_g: int  # next power of two >= G
    block_d: int  # next power of two >= D
    block_n: int  # prefix keys per chunk (power of two)
    num_chunks: int  # ceil(n_max_used / block_n): a compile-time trip count (unrolled)
    num_warps: int


def launch_params(
    num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, n_max_used: int, num_warps: int | None = None
) -> LaunchParams:
    """Pure-Python launch geometry (no torch / triton needed)."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if head_dim <= 0 or n_max_used < 0 or num_tokens < 0:
        raise ValueError("head_dim must be > 0, n_max_used and num_tokens >= 0")
    group = num_heads // num_kv_heads
    block_g = _next_pow2(group)
    block_d = _next_pow2(head_dim)
    block_n = min(_next_pow2(max(n_max_used, 1)), MAX_BLOCK_N, max(1, MAX_TILE // (block_g * block_d)))
    block_n = max(block_n, 1)
    num_chunks = max(1, -(-max(n_max_used, 1) // block_n))
    if num_warps is None:
        # H100, bf16 (bench/gpu/triton_check.py warps sweep): one warp per program was fastest once the grid
        # fills the chip (T=4096 Llama-8B N=16: 127 us vs 346 us with 4 warps); two warps for tiny grids.
        num_warps = 1 if num_tokens * num_kv_heads >= 1024 else 2
    return LaunchParams((num_tokens, num_kv_heads), group, block_g, block_d, block_n, num_chunks, num_warps)


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken install: the kernel is just unavailable
        return None
    return triton


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present."""
    return torch.cuda.is_available() and _triton() is not None


@functools.lru_cache(maxsize=1)
def _kernel():
    """Build the @triton.jit kernel on first use, so importing this module never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _aligner_delta_kernel(
        out_ptr,
        q_ptr,
        slot_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        gate_ptr,
        stride_ot,
        stride_qt,
        stride_ks,
        stride_kh,
        stride_kn,
        stride_vs,
        stride_vh,
        stride_vn,
        stride_ms,
        stride_gs,
        stride_gh,
        n_used,
        scale,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NUM_CHUNKS: tl.constexpr,
    ):
        t = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.load(slot_ptr + t).to(tl.int64)
        if s > 0:
            offs_g = tl.arange(0, BLOCK_G)
            offs_d = tl.arange(0, BLOCK_D)
            gmask = offs_g < G
            dmask = offs_d < D
            gd_mask = gmask[:, None] & dmask[None, :]
            col = (kvh * G + offs_g)[:, None] * D + offs_d[None, :]  # [BG, BD] offset within a row of H*D

            q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + col, mask=gd_mask, other=0.0).to(tl.float32)
            q = q * scale

            m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            k_base = k_ptr + s * stride_ks + kvh * stride_kh
            v_base = v_ptr + s * stride_vs + kvh * stride_vh
            m_base = mask_ptr + s * stride_ms
            for c in tl.static_range(NUM_CHUNKS):  # NUM_CHUNKS * BLOCK_N >= n_used; the rest is masked
                offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
                nmask = offs_n < n_used
                nd_mask = nmask[:, None] & dmask[None, :]
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=nd_mask, other=0.0)
                k = k.to(tl.float32)
                scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BG, BN]
                madd = tl.load(m_base + offs_n, mask=nmask, other=float("-inf")).to(tl.float32)
                scores = scores + madd[None, :]
                m_new = tl.maximum(m_i, tl.max(scores, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-padding chunk stays finite
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(scores - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=nd_mask, other=0.0)
                v = v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [BG, BD]
                m_i = m_new

            gate = tl.load(gate_ptr + s * stride_gs + kvh * stride_gh + offs_g, mask=gmask, other=0.0)
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            delta = acc * (gate.to(tl.float32) / l_safe)[:, None]
            o_ptrs = out_ptr + t.to(tl.int64) * stride_ot + col
            o = tl.load(o_ptrs, mask=gd_mask, other=0.0)
            tl.store(o_ptrs, (o.to(tl.float32) + delta).to(o.dtype), mask=gd_mask)

    return _aligner_delta_kernel


def aligner_delta_triton(
    out: torch.Tensor,  # [T, H*D] fp16/bf16/fp32 attention output before o_proj; updated in place
    q: torch.Tensor,  # [T, H*D] post-RoPE queries, any float dtype; rows may be strided (a qkv slice)
    tok_slot: torch.Tensor,  # [T] int32/int64 slot of each token, 0 = no adapter
    k_layer: torch.Tensor,  # [S, KVH, Nmax, D] float32: one layer of AdapterTable.k
    v_layer: torch.Tensor,  # [S, KVH, Nmax, D] float32: one layer of AdapterTable.v
    mask: torch.Tensor,  # [S, Nmax] float32: 0 for real prefix tokens, -inf for padding (mask[:, 0] == 0)
    gate_layer: torch.Tensor,  # [S, KVH, G] float32: one layer of AdapterTable.gate
    scale: float,  # 1 / sqrt(D)
    n_max_used: int,  # keys 0..n_max_used-1 are read (the step's longest prefix, <= Nmax)
    *,
    num_warps: int | None = None,  # tuning override; None = launch_params' choice
) -> torch.Tensor:
    """Add the Aligner term of every adapted token into `out`, in one launch. Returns `out`."""
    T = out.shape[0]
    S, KVH, n_max, D = k_layer.shape
    G = gate_layer.shape[-1]
    H = KVH * G
    if out.dim() != 2 or out.shape[1] != H * D or out.stride(1) != 1:
        raise ValueError(f"out must be [T, {H * D}] with a contiguous last dim, got {tuple(out.shape)}")
    if q.dim() != 2 or tuple(q.shape) != (T, H * D) or q.stride(1) != 1:
        raise ValueError(f"q must be [{T}, {H * D}] with a contiguous last dim, got {tuple(q.shape)}")
    if tok_slot.shape != (T,) or not tok_slot.is_contiguous():
        raise ValueError("tok_slot must be a contiguous [T] tensor")
    if v_layer.shape != k_layer.shape or mask.shape != (S, n_max) or gate_layer.shape != (S, KVH, G):
        raise ValueError("table tensors disagree on shape")
    for name, x in (("k_layer", k_layer), ("v_layer", v_layer)):
        if x.stride(3) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    if mask.stride(1) != 1 or gate_layer.stride(2) != 1:
        raise ValueError("mask and gate_layer need a contiguous last dim")
    n_used = min(int(n_max_used), n_max)
    if T == 0 or n_used <= 0:
        return out
    p = launch_params(T, H, KVH, D, n_used, num_warps)
    _kernel()[p.grid](
        out,
        q,
        tok_slot,
        k_layer,
        v_layer,
        mask,
        gate_layer,
        out.stride(0),
        q.stride(0),
        k_layer.stride(0),
        k_layer.stride(1),
        k_layer.stride(2),
        v_layer.stride(0),
        v_layer.stride(1),
        v_layer.stride(2),
        mask.stride(0),
        gate_layer.stride(0),
        gate_layer.stride(1),
        n_used,
        float(scale),
        G=G,
        D=D,
        BLOCK_G=p.block_g,
        BLOCK_D=p.block_d,
        BLOCK_N=p.block_n,
        NUM_CHUNKS=p.num_chunks,
        num_warps=p.num_warps,
    )
    return out


class TritonKernel(LayerLaunch):
    name = "triton"
    launch = staticmethod(aligner_delta_triton)
