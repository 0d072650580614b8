"""What the graph-safe op's always-on launch costs when no token has an adapter, on this CPU.

Under CUDA graphs the op cannot skip a forward with no adapted token (a captured graph replays the launch
whatever the routing; server/engine/op.py), so it pays one launch per adapted layer on every forward. This
measures, per layer, on SmolLM2-135M's shapes (9 query / 3 kv heads of 64, the default table: 64 hot slots,
N up to 16), float32, at 64 and 256 tokens:

- `eager_none`: the eager op with no adapted token (it returns after a cached check): what CPU serving pays;
- `graph_none`: the graph-safe launch with no adapted token (the torch twin of the Triton kernel, the only
  graph-safe kernel that runs on a CPU): every token computed against slot 0;
- `graph_all` / `eager_all`: every token adapted (8 adapters, N = 4), graph-safe launch and the eager op's
  best path on this machine (the C kernel where it builds).

On a GPU the Triton kernel's slot-0 programs exit at once, so its empty launch is one kernel launch per layer
(a few microseconds inside a graph); that figure needs a GPU (bench/gpu/) and is not measured here.

    .venv/bin/python bench/graph_launch.py        # writes results/graph-launch.json and .png
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from aligner_core.adapter_format import Adapter
from aligner_core.model_spec import ModelSpec
from server.engine import kernels, op
from server.engine.routing import Routing
from server.engine.table import AdapterTable, LayerHandle, TableShape

SPEC = ModelSpec(
    name="SmolLM2-135M-shapes",
    fingerprint="0" * 12,
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
)
RESULTS = Path(__file__).parent / "results"


def _state(*, graph: bool) -> op.WorkerState:
    torch.manual_seed(0)
    H, KVH, D = SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim
    layers = [
        LayerHandle(i, torch.nn.Linear(SPEC.hidden_size, (H + 2 * KVH) * D), None, H * D, KVH * D)
        for i in range(SPEC.num_layers)
    ]
    table = AdapterTable(
        TableShape.unsharded(SPEC, max_slots=64, max_tokens=16), layers, device=torch.device("cpu"), dtype=torch.float32
    )
    kernel = "torch" if graph else kernels.choose("auto", torch.device("cpu"), torch.float32, D, 16)
    st = op.WorkerState(table=table, routing=Routing(256), scale=1 / math.sqrt(D), kernel=kernel)
    if graph:
        st.enable_graphs(512)
    for i in range(8):
        st.load(f"k{i}", Adapter.random(SPEC, tokens=4, start_layer=2, seed=i, gate_scale=0.3))
    return st


def _per_layer_us(st: op.WorkerState, tokens: np.ndarray | None, T: int, reps: int) -> float:
    """Median over `reps` forwards of the op's time per adapted layer, in microseconds."""
    H, D = SPEC.num_heads, SPEC.head_dim
    q, out = torch.randn(T, H * D), torch.zeros(T, H * D)
    adapted = sorted(st.table.adapted_layers)
    times = []
    op.set_worker_state(st)
    try:
        for rep in range(reps + 2):
            st.set_tokens(tokens)
            st._cached = None  # a new forward
            t0 = time.perf_counter()
            for layer in adapted:
                op.apply_term(out, q, layer)
            if rep >= 2:  # two warm-up forwards
                times.append((time.perf_counter() - t0) / len(adapted))
    finally:
        op.set_worker_state(None)
    return float(np.median(times) * 1e6)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for T in (64, 256):
        reps = 30 if T == 64 else 15
        mixed = np.array([1 + i % 8 for i in range(T)], dtype=np.int64)
        graph, eager = _state(graph=True), _state(graph=False)
        row = {
            "tokens": T,
            "eager_none_us": _per_layer_us(eager, None, T, reps),
            "graph_none_us": _per_layer_us(graph, None, T, reps),
            "graph_all_us": _per_layer_us(graph, mixed, T, reps),
            "eager_all_us": _per_layer_us(eager, mixed, T, reps),
            "eager_kernel": eager.kernel,
        }
        rows.append(row)
        print(json.dumps(row))
    result = {
        "benchmark": "graph_launch",
        "what": "per adapted layer, microseconds; SmolLM2-135M shapes, float32, 1 thread, table 64 slots x N 16",
        "machine": {"cpu": platform.processor() or platform.machine(), "load_avg": list(__import__("os").getloadavg())},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "graph-launch.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, RESULTS / "graph-launch.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["eager_none_us", "graph_none_us", "graph_all_us", "eager_all_us"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.2
    for i, key in enumerate(keys):
        ax.bar([j + i * width for j in range(len(rows))], [r[key] for r in rows], width, label=key.removesuffix("_us"))
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], [f"{r['tokens']} tokens" for r in rows])
    ax.set_ylabel("µs per adapted layer (CPU)")
    ax.set_yscale("log")
    ax.set_title("Aligner op: always-on graph-safe launch vs eager")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
