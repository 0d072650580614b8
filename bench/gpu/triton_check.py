"""GPU check of the fused Triton Aligner kernel: a correctness sweep, then kernel vs torch timings.

Run by bench/gpu/run_triton_check.sh on a lent GPU machine (needs torch + triton + CUDA, and pytest: the
correctness sweep draws its tables with tests/test_triton_kernel.py's `random_layer`; no vllm, no
safetensors). Writes $OUT/triton_check.json (or ./triton_check.json) and prints a table.

Timed, per layer call, in bf16 (q/out), one layer of a 65-slot table (64 adapters + slot 0):
  triton       aligner_delta_triton (eager launch)
  triton_graph the same launch replayed from a CUDA graph (no launch overhead: what decode under graphs sees)
  gather       the op's general path: [T, KVH, n, D] gathers + delta_general + out.add_ (eager)
  gather_graph the same, replayed from a CUDA graph
  bias         N == 1 only: the exact constant term, out.add_(bias[slots]) (the op's former N = 1 path)
Layouts: decode = each token an independent request on a random slot (1/8 of them slot 0);
prefill = the same slots sorted, i.e. contiguous runs per adapter.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_triton_kernel import random_layer  # noqa: E402  the tests' table layer: one layout for both

from server.engine.aligner_math import delta_general  # noqa: E402
from server.engine.kernels.triton import aligner_delta_triton, launch_params, triton_available  # noqa: E402

CORR_T = 257  # tokens per correctness case
SHAPES = {"smollm2": dict(H=9, KVH=3, D=64), "llama8b": dict(H=32, KVH=8, D=128)}
TS = (32, 512, 4096)
NS = (1, 4, 16)
ADAPTERS = 64
NMAX = 16


def make_table(H, KVH, D, ntok, *, seed, dev):
    """One layer, laid out like AdapterTable: k/v [S, KVH, Nmax, D], mask [S, Nmax], gate [S, KVH, G], bias [S, H*D]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, G = ADAPTERS + 1, H // KVH
    k = torch.randn(S, KVH, NMAX, D, generator=g)
    v = torch.randn(S, KVH, NMAX, D, generator=g)
    gate = torch.tanh(torch.randn(S, KVH, G, generator=g))
    mask = torch.full((S, NMAX), float("-inf"))
    mask[:, 0] = 0.0
    for s in range(1, S):
        n = ntok if isinstance(ntok, int) else ntok[s]
        mask[s, :n] = 0.0
        k[s, :, n:] = 0.0
        v[s, :, n:] = 0.0
    k[0], v[0], gate[0] = 0.0, 0.0, 0.0
    bias = (gate[..., None] * v[:, :, 0, None, :]).reshape(S, -1)
    return [x.to(dev).contiguous() for x in (k, v, mask, gate, bias)]


def make_slots(T, layout, *, seed):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(1, ADAPTERS + 1, (T,), generator=g)
    slots[torch.rand(T, generator=g) < 0.125] = 0
    if layout == "prefill":
        slots = torch.sort(slots).values
    return slots


def gather_path(out, q, slots, k, v, mask, gate, scale, n, KVH, D):
    T = q.shape[0]
    qg = q.view(T, KVH, -1, D).float()
    d = delta_general(qg, k[slots, :, :n], v[slots, :, :n], mask[slots, :n], gate[slots], scale)
    out.add_(d.reshape(T, -1).to(out.dtype))


def time_eager(fn, *, target_ms=3.0, repeats=7):
    """Median ms per call, CUDA events around a loop sized to ~target_ms."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6) * 1e3
    iters = int(min(200, max(1, target_ms / one)))
    res = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        res.append(a.elapsed_time(b) / iters)
    return statistics.median(res)


def time_graph(fn, *, iters=20, repeats=7):
    """Median ms per call from replays of a graph holding `iters` calls."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    res = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        res.append(a.elapsed_time(b) / iters)
    del graph
    return statistics.median(res)


def correctness(dev):
    """Max abs error per case: the kernel vs delta_general (fp32 reference on the same q values)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for D in (64, 128):
            for G in (1, 3, 4):
                for N in (1, 4, 16):
                    KVH, S, T = 2, 9, CORR_T
                    H = KVH * G
                    seed = (
                        1000 * D
                        + 100 * G
                        + 10 * N
                        + (0, 1, 2)[(torch.float32, torch.bfloat16, torch.float16).index(dtype)]
                    )
                    gcpu = torch.Generator().manual_seed(seed)
                    ntok = [0] + torch.randint(1, N + 1, (S - 1,), generator=gcpu).tolist()
                    k, v, mask, gate, _ = random_layer(S, KVH, N, D, G, generator=gcpu, device=dev, ntok=ntok)
                    slots = torch.randint(0, S, (T,), generator=gcpu).to(dev)
                    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=gcpu).to(dev, dtype)
                    q = qkv[:, : H * D]
                    out = torch.randn(T, H * D, generator=gcpu).to(dev, dtype)
                    out0 = out.clone()
                    scale = 1 / math.sqrt(D)
                    aligner_delta_triton(out, q, slots, k, v, mask, gate, scale, N)
                    ref = delta_general(
                        q.float().view(T, KVH, G, D), k[slots], v[slots], mask[slots], gate[slots], scale
                    )
                    ref = ref.reshape(T, -1)
                    # the term alone, added into an fp32 zero buffer: isolates the kernel's arithmetic
                    d32 = torch.zeros(T, H * D, device=dev)
                    aligner_delta_triton(d32, q, slots, k, v, mask, gate, scale, N)
                    torch.cuda.synchronize()
                    row = dict(dtype=str(dtype).split(".")[-1], D=D, G=G, N=N)
                    row["max_abs_err_out"] = (out.float() - (out0.float() + ref)).abs().max().item()
                    # error beyond the unavoidable final rounding into dtype
                    row["max_abs_err_vs_rounded"] = (
                        (out.float() - (out0.float() + ref).to(dtype).float()).abs().max().item()
                    )
                    row["max_abs_err_delta_fp32"] = (d32 - ref).abs().max().item()
                    row["rel_err_delta"] = ((d32 - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                    row["slot0_untouched"] = bool(torch.equal(out[slots == 0], out0[slots == 0]))
                    row["finite"] = bool(torch.isfinite(out).all().item())
                    rows.append(row)
    return rows


def bench(dev):
    rows = []
    dtype = torch.bfloat16
    for name, sh in SHAPES.items():
        H, KVH, D = sh["H"], sh["KVH"], sh["D"]
        scale = 1 / math.sqrt(D)
        for N in NS:
            k, v, mask, gate, bias = make_table(H, KVH, D, N, seed=N, dev=dev)
            for T in TS:
                for layout in ("decode", "prefill"):
                    slots_cpu = make_slots(T, layout, seed=T + N)
                    slots = slots_cpu.to(dev)
                    runs = int((slots_cpu[1:] != slots_cpu[:-1]).sum()) + 1  # contiguous runs of one slot
                    gq = torch.Generator().manual_seed(T)
                    q = torch.randn(T, H * D, generator=gq).to(dev, dtype)
                    out = torch.randn(T, H * D, generator=gq).to(dev, dtype)
                    r = dict(model=name, H=H, KVH=KVH, D=D, N=N, T=T, layout=layout, runs=runs)
                    r["grid"] = list(launch_params(T, H, KVH, D, N).grid)

                    def f_tri():
                        aligner_delta_triton(out, q, slots, k, v, mask, gate, scale, N)

                    def f_gather():
                        gather_path(out, q, slots, k, v, mask, gate, scale, N, KVH, D)

                    def f_bias():
                        out.add_(bias[slots].to(out.dtype))

                    # quick agreement check on these very inputs (bf16 out, so loose)
                    o1 = out.clone()
                    o2 = out.clone()
                    aligner_delta_triton(o1, q, slots, k, v, mask, gate, scale, N)
                    gather_path(o2, q, slots, k, v, mask, gate, scale, N, KVH, D)
                    r["max_abs_diff_vs_gather_bf16"] = (o1.float() - o2.float()).abs().max().item()

                    r["triton_ms"] = time_eager(f_tri)
                    r["triton_graph_ms"] = time_graph(f_tri)
                    r["gather_ms"] = time_eager(f_gather)
                    r["gather_graph_ms"] = time_graph(f_gather)
                    r["bias_ms"] = time_eager(f_bias) if N == 1 else None
                    # bytes the kernel must at least move: q read, out read+write, K/V of the distinct slots used
                    distinct = int(torch.unique(slots_cpu[slots_cpu > 0]).numel())
                    nbytes = T * H * D * 2 * 3 + distinct * KVH * N * D * 4 * 2
                    r["min_bytes"] = nbytes
                    r["triton_graph_GBps"] = nbytes / (r["triton_graph_ms"] * 1e-3) / 1e9
                    rows.append(r)
                    print(fmt_row(r), flush=True)
    return rows


def warps_sweep(dev):
    """Graph-replay time of the kernel for each num_warps on a few configs (tuning data for launch_params)."""
    rows = []
    dtype = torch.bfloat16
    for name, N, T in (
        ("llama8b", 16, 4096),
        ("llama8b", 4, 512),
        ("smollm2", 16, 4096),
        ("smollm2", 4, 512),
        ("llama8b", 16, 32),
    ):
        sh = SHAPES[name]
        H, KVH, D = sh["H"], sh["KVH"], sh["D"]
        k, v, mask, gate, _ = make_table(H, KVH, D, N, seed=N, dev=dev)
        slots = make_slots(T, "decode", seed=T + N).to(dev)
        q = torch.randn(T, H * D, device=dev).to(dtype)
        out = torch.randn(T, H * D, device=dev).to(dtype)
        r = dict(model=name, N=N, T=T, default_warps=launch_params(T, H, KVH, D, N).num_warps)
        for nw in (1, 2, 4, 8):
            r[f"w{nw}_graph_ms"] = time_graph(
                lambda nw=nw: aligner_delta_triton(out, q, slots, k, v, mask, gate, 0.1, N, num_warps=nw)
            )
        rows.append(r)
        print("warps", r, flush=True)
    return rows


def fmt(x):
    return "    -   " if x is None else f"{x * 1e3:8.1f}"


HEADER = (
    f"{'model':8} {'N':>2} {'T':>5} {'layout':7} {'runs':>4} | {'triton':>8} {'tri_gr':>8} {'gather':>8} "
    f"{'gath_gr':>8} {'bias':>8} | {'x_gath':>6} (us per layer call)"
)


def fmt_row(r):
    sp_g = r["gather_ms"] / r["triton_ms"]
    return (
        f"{r['model']:8} {r['N']:>2} {r['T']:>5} {r['layout']:7} {r['runs']:>4} | {fmt(r['triton_ms'])} "
        f"{fmt(r['triton_graph_ms'])} {fmt(r['gather_ms'])} {fmt(r['gather_graph_ms'])} "
        f"{fmt(r['bias_ms'])} | {sp_g:6.1f}"
    )


def main():
    out_dir = Path(os.environ.get("OUT") or ".")
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"missing: {e}"
    if not triton_available():
        print("no CUDA device or no triton:", info)
        (out_dir / "triton_check.json").write_text(json.dumps(dict(info=info, error="unavailable"), indent=1))
        return 1
    dev = torch.device("cuda")
    info["device"] = torch.cuda.get_device_name(0)
    print(info, flush=True)
    t0 = time.time()
    corr = correctness(dev)
    worst = {}
    for c in corr:
        worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), c["max_abs_err_delta_fp32"])
    print(f"correctness: {len(corr)} cases in {time.time() - t0:.1f}s; worst |delta - ref| per q dtype: {worst}")
    print(
        "worst err beyond final rounding per dtype:",
        {d: max(c["max_abs_err_vs_rounded"] for c in corr if c["dtype"] == d) for d in worst},
    )
    print(
        "all slot-0 rows untouched:",
        all(c["slot0_untouched"] for c in corr),
        "all finite:",
        all(c["finite"] for c in corr),
    )
    t1 = time.time()
    print(HEADER, flush=True)
    rows = bench(dev)
    print(f"bench: {len(rows)} configs in {time.time() - t1:.1f}s")
    try:
        warps = warps_sweep(dev)
    except Exception as e:  # noqa: BLE001 - tuning data only
        warps = [dict(error=repr(e))]
        print("warps sweep failed:", e)
    (out_dir / "triton_check.json").write_text(
        json.dumps(dict(info=info, correctness=corr, bench=rows, warps=warps), indent=1)
    )
    print("\n" + HEADER)
    for r in rows:
        print(fmt_row(r))
    print(f"wrote {out_dir / 'triton_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
