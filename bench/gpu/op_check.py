"""GPU timing of the whole Aligner op per forward (30 layers of SmolLM2-135M), hot and cold adapters.

Run by bench/gpu/run_triton_check.sh on a lent GPU (torch + triton + CUDA; no vllm). Writes
$OUT/op_check.json and prints a table. Per forward = routing plan (with cold staging) + the op on every
layer, timed with CUDA events, median of 20 after 3 warm-ups. For scale, "linears" is the bf16 time of
the model's own linear layers for the same tokens (qkv, o, gate/up, down; no attention, no lm_head): a lower
bound of a forward of the base model.

Cases: T tokens over K distinct adapters of N tokens, each hot (projections precomputed) or cold (raw P and
gates only, projected into scratch slots every forward), through the Triton kernel or the torch kernel
(the general path's gathers). The table holds COLD (default 100,000) cold
adapters resident on the GPU; their memory per adapter is reported.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aligner_core.adapter_format import Adapter  # noqa: E402
from aligner_core.model_spec import ModelSpec  # noqa: E402
from server.engine import op, routing  # noqa: E402
from server.engine.table import AdapterTable, LayerHandle, TableShape  # noqa: E402

SPEC = ModelSpec(
    name="smollm2-shape", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, fingerprint="0" * 12
)
H, KVH, D, HID, FF = 9, 3, 64, 576, 1536
COLD = int(os.environ.get("ALIGNER_GPU_COLD", "100000"))
HOT = 128  # filled by the 2 x 64 hot adapters, so every later put goes cold
DEV = torch.device("cuda")
_forward: list[object] = [None]
routing._current_forward_context = lambda: _forward[0]  # no vllm here: one fresh object per forward


def cuda_time(fn, reps=20, warm=3) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    bf = torch.bfloat16
    qkv = [nn.Linear(HID, (H + 2 * KVH) * D, bias=False).to(DEV, bf) for _ in range(SPEC.num_layers)]
    layers = [
        LayerHandle(index=i, qkv_proj=qkv[i], k_norm=None, q_size=H * D, kv_size=KVH * D)
        for i in range(SPEC.num_layers)
    ]
    shape = TableShape.unsharded(SPEC, max_slots=HOT, max_tokens=16, cold_slots=COLD, scratch=512)
    torch.cuda.synchronize()
    m0 = torch.cuda.memory_allocated()
    table = AdapterTable(shape, layers, device=DEV, dtype=bf)
    torch.cuda.synchronize()
    hot_bytes = torch.cuda.memory_allocated() - m0
    rt = routing.Routing(512)
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}

    pool = {
        n: [Adapter.random(SPEC, tokens=n, start_layer=2, seed=100 * n + i, gate_scale=0.3) for i in range(64)]
        for n in (1, 4)
    }
    hot = {n: [] for n in (1, 4)}
    for n in (1, 4):  # 64 hot adapters per N
        for i, a in enumerate(pool[n]):
            hot[n].append(table.put(f"hot-n{n}-{i}", a))
    t0 = time.perf_counter()
    m1 = torch.cuda.memory_allocated()
    cold = {n: [] for n in (1, 4)}
    for i in range(COLD):
        n = 4 if i < 64 else 1
        cid = table.put(f"cold-{i}", pool[n][i % 64])
        if len(cold[n]) < 64 and (n == 4 or i >= 64):
            cold[n].append(cid)
    torch.cuda.synchronize()
    results["cold_resident"] = COLD
    results["cold_load_s"] = round(time.perf_counter() - t0, 2)
    results["cold_bytes_per_adapter"] = round((torch.cuda.memory_allocated() - m1) / COLD, 1)
    results["hot_table_bytes"] = hot_bytes
    print(
        f"{COLD} cold adapters resident in {results['cold_load_s']} s, {results['cold_bytes_per_adapter']} B each on the GPU; "
        f"hot table {hot_bytes / 2**20:.1f} MiB for {HOT} slots"
    )

    w = {
        name: torch.randn(o, i, device=DEV, dtype=bf) * 0.02
        for name, (o, i) in {"qkv": (960, HID), "o": (HID, HID), "gu": (2 * FF, HID), "down": (HID, FF)}.items()
    }

    def linears(T):
        x = torch.randn(T, HID, device=DEV, dtype=bf)

        def run():
            for _ in range(SPEC.num_layers):
                x.matmul(w["qkv"].t())
                x.matmul(w["o"].t())
                y = x.matmul(w["gu"].t())
                y[:, :FF].matmul(w["down"].t())

        return run

    def forward(ids: np.ndarray, use_triton: bool):
        T = len(ids)
        q = torch.randn(T, H * D, device=DEV, dtype=bf)
        out = torch.zeros(T, H * D, device=DEV, dtype=bf)
        kernel = "triton" if use_triton else "torch"
        st = op.WorkerState(table=table, routing=rt, scale=1 / math.sqrt(D), kernel=kernel)

        def run():
            op.set_worker_state(st)
            st.set_tokens(ids)
            _forward[0] = object()
            for l in range(SPEC.num_layers):
                op.apply_(out, q, l)

        return run

    rng = np.random.default_rng(0)
    for T, K, layout in ((256, 64, "decode"), (64, 64, "decode"), (4096, 8, "prefill")):
        base = cuda_time(linears(T))
        for n in (1, 4):
            for tier in ("hot", "cold"):
                choice = np.array((hot if tier == "hot" else cold)[n][:K])
                ids = choice[rng.integers(0, K, T)]
                if layout == "prefill":
                    ids = np.sort(ids)
                for use_triton in (True, False):
                    ms = cuda_time(forward(ids, use_triton))
                    row = dict(T=T, K=K, N=n, layout=layout, tier=tier, path="triton" if use_triton else "torch")
                    row |= dict(
                        ms_per_forward=round(ms, 4), linears_ms=round(base, 4), ratio_to_linears=round(ms / base, 4)
                    )
                    results["cases"].append(row)
                    print(
                        f"T={T:5d} K={K:3d} N={n:2d} {layout:7s} {tier:4s} {row['path']:6s} {ms:8.3f} ms/forward "
                        f"(linears {base:.3f} ms, x{ms / base:.3f})"
                    )
    out = Path(os.environ.get("OUT", ".")) / "op_check.json"
    out.write_text(json.dumps(results, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
