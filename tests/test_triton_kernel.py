"""The fused Triton Aligner kernel against the torch paths (`delta_general`, `delta_reference`).

The GPU tests need a CUDA device and skip without one. On CPU, the launch geometry is checked, and, when
triton is installed, the kernel itself runs under triton's interpreter (TRITON_INTERPRET=1) in a
subprocess, so the kernel's math is exercised even on machines without a GPU.

Imports only torch-level modules (no vllm, no safetensors).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from server.engine.aligner_math import delta_general, delta_reference
from server.engine.kernels.triton import MAX_BLOCK_N, MAX_TILE, aligner_delta_triton, launch_params, triton_available

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not (HAS_CUDA and triton_available()),
    reason="no CUDA device (or no triton) on this machine: the Triton kernel's GPU tests run only where a GPU is present",
)

# Tolerances on the final `out` (after rounding into its dtype) against out0 + fp32 reference.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def random_layer(
    S: int, KVH: int, Nmax: int, D: int, G: int, *, seed: int | None = None, generator=None, device="cpu", ntok=None
):
    """One layer of a table laid out like AdapterTable: slot 0 empty, padding rows zero and masked -inf.
    Drawn from `generator` (which it advances) or a fresh one seeded with `seed`. Also bench/gpu/triton_check.py's."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    k = torch.randn(S, KVH, Nmax, D, generator=gen)
    v = torch.randn(S, KVH, Nmax, D, generator=gen)
    gate = torch.rand(S, KVH, G, generator=gen) * 2 - 1
    if ntok is None:
        ntok = [0] + torch.randint(1, Nmax + 1, (S - 1,), generator=gen).tolist()
    mask = torch.full((S, Nmax), float("-inf"))
    mask[:, 0] = 0.0
    for s, n in enumerate(ntok):
        mask[s, :n] = 0.0
        k[s, :, n:] = 0.0
        v[s, :, n:] = 0.0
    k[0], v[0], gate[0] = 0.0, 0.0, 0.0
    dev = torch.device(device)
    return k.to(dev), v.to(dev), mask.to(dev), gate.to(dev), ntok


# ---------------------------------------------------------------- CPU: launch geometry


def test_launch_params_shapes():
    p = launch_params(4096, 9, 3, 64, 16)
    assert p.grid == (4096, 3) and p.group == 3 and p.block_g == 4 and p.block_d == 64 and p.block_n == 16
    assert p.num_chunks == 1
    p = launch_params(32, 32, 8, 128, 4)
    assert p.grid == (32, 8) and p.group == 4 and p.block_g == 4 and p.block_d == 128 and p.block_n == 4
    p = launch_params(1, 8, 8, 64, 1)
    assert p.group == 1 and p.block_g == 1 and p.block_n == 1
    # non-power-of-two head dim and prefix: blocks round up
    p = launch_params(3, 6, 2, 80, 5)
    assert p.block_d == 128 and p.block_n == 8 and p.block_g == 4 and p.num_chunks == 1
    assert launch_params(3, 6, 2, 64, 40).num_chunks == 3  # 16-key chunks
    assert launch_params(3, 6, 2, 64, 4, num_warps=8).num_warps == 8


@pytest.mark.parametrize("G,D,N", [(1, 64, 1), (3, 64, 100), (4, 128, 16), (8, 128, 64), (16, 256, 64), (64, 256, 3)])
def test_launch_params_blocks_bounded(G, D, N):
    p = launch_params(7, 2 * G, 2, D, N)
    for b in (p.block_g, p.block_d, p.block_n):
        assert b >= 1 and b & (b - 1) == 0  # powers of two (tl.arange needs them)
    assert p.block_g >= G and p.block_d >= D
    assert 1 <= p.block_n <= MAX_BLOCK_N
    assert p.block_n == 1 or p.block_g * p.block_n * p.block_d <= MAX_TILE
    assert p.num_warps in (1, 2)
    assert p.num_chunks * p.block_n >= N and (p.num_chunks - 1) * p.block_n < N  # every key read, no empty chunk
    assert p.grid == (7, 2)  # fixed by T and KVH only: CUDA-graph friendly


def test_launch_params_rejects_bad_heads():
    with pytest.raises(ValueError):
        launch_params(4, 9, 2, 64, 4)
    with pytest.raises(ValueError):
        launch_params(4, 8, 2, 0, 4)


def test_triton_available_is_false_without_cuda():
    if not HAS_CUDA:
        assert triton_available() is False


def test_launcher_rejects_bad_shapes_without_launching():
    k, v, mask, gate, _ = random_layer(3, 2, 4, 16, 2, seed=0)
    out = torch.zeros(5, 2 * 2 * 16)
    with pytest.raises(ValueError):
        aligner_delta_triton(out, torch.zeros(5, 63), torch.zeros(5, dtype=torch.long), k, v, mask, gate, 0.25, 4)
    with pytest.raises(ValueError):
        aligner_delta_triton(
            out[:, :32], torch.zeros(5, 32), torch.zeros(5, dtype=torch.long), k, v, mask, gate, 0.25, 4
        )
    # T == 0 launches nothing and returns out unchanged
    empty = torch.zeros(0, 64)
    assert (
        aligner_delta_triton(empty, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), k, v, mask, gate, 0.25, 4)
        is empty
    )


_INTERP_SCRIPT = textwrap.dedent(
    """
    import math, torch, sys
    sys.path.insert(0, {tests!r})
    from test_triton_kernel import random_layer
    from server.engine.aligner_math import delta_general
    from server.engine.kernels.triton import aligner_delta_triton
    worst = 0.0
    for N, G, D, KVH, n_used in [(1, 1, 16, 2, 1), (4, 3, 16, 2, 4), (16, 4, 32, 1, 16), (40, 3, 16, 2, 40), (8, 2, 16, 2, 5)]:
        S, T, H = 5, 9, KVH * G
        k, v, mask, gate, _ = random_layer(S, KVH, N, D, G, seed=N * 7 + G)
        slot = torch.tensor([0, 1, 2, 2, 0, 4, 3, 3, 1], dtype=torch.int32)
        qkv = torch.randn(T, (H + 2 * KVH) * D)
        q = qkv[:, : H * D]  # strided rows, like vLLM's qkv split
        out = torch.randn(T, H * D)
        out0 = out.clone()
        aligner_delta_triton(out, q, slot, k, v, mask, gate, 1 / math.sqrt(D), n_used)
        sl = slot.long()
        ref = delta_general(q.view(T, KVH, G, D), k[sl, :, :n_used], v[sl, :, :n_used], mask[sl, :n_used], gate[sl],
                            1 / math.sqrt(D)).reshape(T, -1)
        assert torch.equal(out[sl == 0], out0[sl == 0]), "slot-0 rows changed"
        err = (out - (out0 + ref)).abs().max().item()
        worst = max(worst, err)
        assert err < 1e-4, (N, G, D, err)
    print("INTERP_OK", worst)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed on this machine")
def test_kernel_under_triton_interpreter():
    """The real kernel, run by triton's CPU interpreter in a subprocess (TRITON_INTERPRET must be set first)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = _INTERP_SCRIPT.format(tests=str(ROOT / "tests"))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "INTERP_OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- GPU: the kernel against torch


def run_case(
    N: int,
    G: int,
    D: int,
    dtype: torch.dtype,
    *,
    KVH: int = 2,
    S: int = 7,
    T: int = 37,
    n_used=None,
    seed=0,
    strided_q: bool = True,
    slot_dtype=torch.int64,
):
    """Returns (out, expected fp32, out0, slots) for one random case on the GPU."""
    dev = torch.device("cuda")
    H = KVH * G
    k, v, mask, gate, _ = random_layer(S, KVH, N, D, G, seed=seed, device="cuda")
    gen = torch.Generator().manual_seed(seed + 1)
    slots = torch.randint(0, S, (T,), generator=gen)
    slots[: max(1, T // 5)] = 0  # a run of no-adapter tokens
    slots[-3:] = S - 1  # and a short run of one adapter
    slots = slots.to(dev, slot_dtype)
    if strided_q:
        q = torch.randn(T, (H + 2 * KVH) * D, generator=gen).to(dev, dtype)[:, : H * D]
    else:
        q = torch.randn(T, H * D, generator=gen).to(dev, dtype)
    out = torch.randn(T, H * D, generator=gen).to(dev, dtype)
    out0 = out.clone()
    n = N if n_used is None else n_used
    scale = 1 / math.sqrt(D)
    aligner_delta_triton(out, q, slots, k, v, mask, gate, scale, n)
    sl = slots.long()
    ref = delta_general(q.float().view(T, KVH, G, D), k[sl, :, :n], v[sl, :, :n], mask[sl, :n], gate[sl], scale)
    return out, out0.float() + ref.reshape(T, -1), out0, sl


@needs_gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("N", [1, 4, 16])
def test_kernel_matches_delta_general_fp32(N, G, D):
    out, expected, out0, sl = run_case(N, G, D, torch.float32, seed=N * 100 + G * 10 + D)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert torch.equal(out[sl == 0], out0[sl == 0])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G,N", [(1, 16), (3, 4), (4, 1), (4, 16)])
def test_kernel_matches_delta_general_half(N, G, D, dtype):
    out, expected, out0, sl = run_case(N, G, D, dtype, seed=N * 100 + G * 10 + D + 1)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])
    assert torch.equal(out[sl == 0], out0[sl == 0])  # bit-identical: never re-written


@needs_gpu
def test_kernel_delta_is_fp32_accurate_with_half_queries():
    """With an fp32 zero `out`, the added term itself matches the fp32 reference closely even for bf16 q."""
    dev = torch.device("cuda")
    KVH, G, D, N, S, T = 3, 3, 64, 16, 9, 64
    k, v, mask, gate, _ = random_layer(S, KVH, N, D, G, seed=5, device="cuda")
    q = torch.randn(T, KVH * G * D, device=dev).to(torch.bfloat16)
    slots = torch.randint(0, S, (T,), device=dev)
    out = torch.zeros(T, KVH * G * D, device=dev)
    aligner_delta_triton(out, q, slots, k, v, mask, gate, 0.125, N)
    ref = delta_general(q.float().view(T, KVH, G, D), k[slots], v[slots], mask[slots], gate[slots], 0.125).reshape(
        T, -1
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_gpu
@pytest.mark.parametrize("N,n_used", [(16, 5), (40, 40), (64, 33)])
def test_kernel_partial_prefix_and_long_prefix(N, n_used):
    """n_max_used < Nmax reads only the used keys; N > BLOCK_N loops over chunks (online softmax)."""
    S, KVH, G, D = 6, 2, 3, 64
    # tables whose adapters fit in n_used, as the routing guarantees
    k, v, mask, gate, _ = random_layer(
        S, KVH, N, D, G, seed=N, device="cuda", ntok=[0] + [max(1, n_used - i) for i in range(S - 1)]
    )
    dev = torch.device("cuda")
    T = 50
    slots = torch.randint(0, S, (T,), device=dev)
    q = torch.randn(T, KVH * G * D, device=dev)
    out = torch.randn(T, KVH * G * D, device=dev)
    out0 = out.clone()
    aligner_delta_triton(out, q, slots, k, v, mask, gate, 1 / 8, n_used)
    full = delta_general(q.view(T, KVH, G, D), k[slots], v[slots], mask[slots], gate[slots], 1 / 8).reshape(T, -1)
    torch.testing.assert_close(out, out0 + full, atol=2e-5, rtol=2e-5)


@needs_gpu
def test_kernel_matches_per_token_reference():
    """Against `delta_reference`: the plain per-token loop with the GQA repeat spelled out."""
    KVH, G, D, N, S, T = 2, 3, 64, 4, 5, 12
    H = KVH * G
    k, v, mask, gate, ntok = random_layer(S, KVH, N, D, G, seed=11)
    slots = torch.tensor([0, 1, 1, 2, 0, 3, 4, 4, 4, 0, 2, 1])
    q = torch.randn(T, H, D)
    kp, vp, gates = [], [], []
    for t in range(T):
        s = int(slots[t])
        if s == 0:
            kp.append(None), vp.append(None), gates.append(None)
            continue
        kp.append(k[s, :, : ntok[s]].transpose(0, 1))  # [N, KVH, D]
        vp.append(v[s, :, : ntok[s]].transpose(0, 1))
        gates.append(gate[s].reshape(H))  # h = kvh * G + g
    ref = delta_reference(q, kp, vp, gates, 1 / math.sqrt(D)).reshape(T, -1)
    out = torch.zeros(T, H * D, device="cuda")
    aligner_delta_triton(
        out, q.reshape(T, -1).cuda(), slots.cuda(), k.cuda(), v.cuda(), mask.cuda(), gate.cuda(), 1 / math.sqrt(D), N
    )
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=2e-5)


@needs_gpu
def test_kernel_int32_slots_and_contiguous_q():
    out, expected, out0, sl = run_case(4, 4, 128, torch.bfloat16, slot_dtype=torch.int32, strided_q=False, seed=3)
    torch.testing.assert_close(out.float(), expected, **TOL[torch.bfloat16])


@needs_gpu
def test_kernel_all_slot_zero_is_untouched():
    KVH, G, D, N, S, T = 2, 2, 64, 4, 3, 16
    k, v, mask, gate, _ = random_layer(S, KVH, N, D, G, seed=1, device="cuda")
    out = torch.randn(T, KVH * G * D, device="cuda", dtype=torch.float16)
    out0 = out.clone()
    aligner_delta_triton(
        out, torch.randn_like(out), torch.zeros(T, dtype=torch.long, device="cuda"), k, v, mask, gate, 0.125, N
    )
    assert torch.equal(out, out0)


@needs_gpu
def test_kernel_replays_under_cuda_graph():
    """Captured once, replayed after the slots and queries change: the launch reads them at replay time."""
    KVH, G, D, N, S, T = 3, 3, 64, 4, 6, 32
    H = KVH * G
    dev = torch.device("cuda")
    k, v, mask, gate, _ = random_layer(S, KVH, N, D, G, seed=2, device="cuda")
    q = torch.randn(T, H * D, device=dev, dtype=torch.bfloat16)
    slots = torch.randint(0, S, (T,), device=dev)
    out = torch.zeros(T, H * D, device=dev)
    aligner_delta_triton(out, q, slots, k, v, mask, gate, 0.125, N)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.zero_()
        aligner_delta_triton(out, q, slots, k, v, mask, gate, 0.125, N)
    for seed in range(3):
        torch.manual_seed(seed)
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        slots.copy_(torch.randint(0, S, (T,), device=dev))
        graph.replay()
        ref = delta_general(q.float().view(T, KVH, G, D), k[slots], v[slots], mask[slots], gate[slots], 0.125)
        torch.testing.assert_close(out, ref.reshape(T, -1), atol=2e-5, rtol=2e-5)
