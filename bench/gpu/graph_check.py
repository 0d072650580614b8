"""The graph-safe Aligner op inside real CUDA graphs (issue "GPU-ready"), for a lent GPU (torch + triton; no vllm).

A stack of SmolLM2-135M-shaped layers calls the op (graph-safe mode: persistent token -> slot buffer, the
Triton kernel at the table's maximum N) and is captured once
  1. in a `torch.cuda.CUDAGraph`, and
  2. under `torch.compile(mode="reduce-overhead")` (the op through `torch.ops.aligner.apply_`),
with NO adapter routed at capture. Each is then replayed under three other routings (mixed adapters; one
adapter everywhere; an adapter loaded into a slot after the capture, another evicted), after the runner's
step (`WorkerState.set_tokens`, outside the graph), and compared with the reference term. Then the op's
time per layer, replaying a captured graph, at 64 and 256 tokens, with no adapted token and with all of them
adapted. Writes $OUT/graph_check.json; exit status 1 if any replay is off.

    python bench/gpu/graph_check.py              # on the GPU machine (bench/gpu/run_triton_check.sh runs it)
    python bench/gpu/graph_check.py --dry-run    # on a CPU: the same steps, eagerly, with the torch twin
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aligner_core.adapter_format import Adapter  # noqa: E402
from aligner_core.model_spec import ModelSpec  # noqa: E402
from server.engine import op  # noqa: E402
from server.engine.kernels import triton as triton_kernel  # noqa: E402
from server.engine.routing import Routing  # noqa: E402
from server.engine.table import AdapterTable, LayerHandle, TableShape, reference_term  # noqa: E402

SPEC = ModelSpec(
    name="smollm2-shape", hidden_size=576, num_layers=8, num_heads=9, num_kv_heads=3, head_dim=64, fingerprint="0" * 12
)
H, KVH, D = SPEC.num_heads, SPEC.num_kv_heads, SPEC.head_dim
DRY = "--dry-run" in sys.argv
DEV = torch.device("cpu" if DRY else "cuda")


LANES = 4  # the server's default ALIGNER_MAX_ADAPTERS_PER_REQUEST: in graph-safe mode every lane launches


def build() -> tuple[op.WorkerState, list[LayerHandle], dict[str, Adapter]]:
    torch.manual_seed(0)
    layers = [
        LayerHandle(i, torch.nn.Linear(SPEC.hidden_size, (H + 2 * KVH) * D).to(DEV), None, H * D, KVH * D)
        for i in range(SPEC.num_layers)
    ]
    table = AdapterTable(
        TableShape.unsharded(SPEC, max_slots=8, max_tokens=16), layers, device=DEV, dtype=torch.float32
    )
    st = op.WorkerState(
        table=table, routing=Routing(64, lanes=LANES), scale=1 / math.sqrt(D), kernel="torch" if DRY else "triton"
    )
    st.enable_graphs(512)
    adapters = {
        "a": Adapter.random(SPEC, tokens=1, start_layer=2, seed=1, gate_scale=0.5),
        "b": Adapter.random(SPEC, tokens=7, start_layer=0, gate_activation="tanh", seed=2, gate_scale=0.9),
        "c": Adapter.random(SPEC, tokens=16, start_layer=1, seed=3, gate_scale=0.5),
        "d": Adapter.random(SPEC, tokens=3, start_layer=0, seed=4, gate_scale=0.7),
    }
    for name in "abc":
        st.load(name, adapters[name])
    return st, layers, adapters


def stack(outs: list[torch.Tensor], q: torch.Tensor, *, via_op: bool = False) -> None:
    """The op at every layer (each layer its own output)."""
    for layer, out in enumerate(outs):
        if via_op:
            torch.ops.aligner.apply_(out, q, layer)
        else:
            op.apply_term(out, q, layer)


def route(st: op.WorkerState, names: list[str | None]) -> None:
    slots = [st.table.lookup(n) if n else 0 for n in names]
    st.set_tokens(np.array(slots, dtype=np.int64) if any(slots) else None)


def routings(T: int) -> list[tuple[str, list[str | None]]]:
    mixed: list[str | None] = [("a", "b", None, "c")[i % 4] for i in range(T - 3)]  # a short real batch
    return [
        ("mixed", mixed),
        ("one-adapter", ["c"] * T),
        ("after-table-change", [("d", None, "b", "a")[i % 4] for i in range(T)]),
    ]


def check(mode: str, T: int = 48) -> list[dict]:
    st, layers, adapters = build()
    op.set_worker_state(st)
    try:
        torch.manual_seed(1)
        q = torch.randn(T, H * D, device=DEV)
        base = torch.randn(SPEC.num_layers, T, H * D, device=DEV)
        out = base.clone()
        outs = list(out.unbind(0))
        route(st, [None] * T)  # the capture sees no adapter at all
        replay = capture(mode, outs, q)
        rows = []
        for name, names in routings(T):
            if name == "after-table-change":
                st.evict("a", force=True)
                st.load("d", adapters["d"])
                st.load("a", adapters["a"])
            route(st, names)
            q.copy_(torch.randn(T, H * D, device=DEV))
            out.copy_(base)
            replay()
            if DEV.type == "cuda":
                torch.cuda.synchronize()
            per_token = [adapters[n] if n else None for n in names] + [None] * (T - len(names))
            want = torch.stack([base[l] + reference_term(layers[l], q, per_token, D) for l in range(SPEC.num_layers)])
            err = float((out - want).abs().max())
            rows.append({"mode": mode, "routing": name, "tokens": T, "max_abs_err": err, "ok": err < 2e-4})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        op.set_worker_state(None)


def capture(mode: str, outs: list[torch.Tensor], q: torch.Tensor):
    """A callable replaying the stack as captured by `mode` (dry run: the stack itself, eagerly)."""
    if DRY:
        return lambda: stack(outs, q, via_op=mode == "compile")
    if mode == "cudagraph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as vLLM does before capture
            stack(outs, q)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            stack(outs, q)
        return graph.replay
    compiled = torch.compile(lambda: stack(outs, q, via_op=True), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # cudagraph trees record on the warm-up calls
        compiled()
    return compiled


def timing(T: int, adapted: bool) -> dict:
    st, _, _ = build()
    op.set_worker_state(st)
    try:
        q = torch.randn(T, H * D, device=DEV)
        outs = list(torch.zeros(SPEC.num_layers, T, H * D, device=DEV).unbind(0))
        route(st, [("a", "b", "c")[i % 3] for i in range(T)] if adapted else [None] * T)
        replay = capture("cudagraph", outs, q)
        times = []
        for _ in range(3):
            replay()
        for _ in range(20):
            if DEV.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1000)
            else:
                import time

                t0 = time.perf_counter()
                replay()
                times.append((time.perf_counter() - t0) * 1e6)
        return {"tokens": T, "adapted": adapted, "us_per_layer": statistics.median(times) / len(outs)}
    finally:
        op.set_worker_state(None)


def main() -> int:
    if not DRY and not (torch.cuda.is_available() and triton_kernel.triton_available()):
        print("no CUDA device with triton: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    replays = [row for mode in ("cudagraph", "compile") for row in check(mode)]
    times = [timing(T, adapted) for T in (64, 256) for adapted in (False, True)]
    for row in times:
        print(json.dumps(row), flush=True)
    device = "cpu (dry run)" if DRY else torch.cuda.get_device_name(0)
    # under torch.compile, cudagraph trees may decline to capture (e.g. mutated inputs): then the "compile"
    # replays ran eagerly and prove nothing about graphs; the counters say whether that happened
    skips = {k: v for k, v in torch._dynamo.utils.counters.get("inductor", {}).items() if "cudagraph" in k}
    result = {
        "device": device,
        "torch": torch.__version__,
        "replays": replays,
        "compile_cudagraph_counters": skips,
        "op_per_layer": times,
    }
    out = Path(os.environ.get("OUT", ROOT / "bench" / "gpu" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] for r in replays) else 1


if __name__ == "__main__":
    sys.exit(main())
