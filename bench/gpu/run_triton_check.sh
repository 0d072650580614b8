#!/usr/bin/env bash
# One prepared GPU check of the fused Triton Aligner kernel, for a lent machine (H100/H200), from the repo root:
#   bash bench/gpu/run_triton_check.sh
# 1. environment check (installs torch/triton/pytest only if missing and pip can reach a registry),
# 2. pytest tests/test_triton_kernel.py tests/test_gpu_op.py (GPU tests included: the kernel, and the whole
#    op on a two-tier table on CUDA),
# 3. bench/gpu/triton_check.py: correctness sweep + kernel vs torch timings -> $OUT/triton_check.json,
# 4. bench/gpu/op_check.py: the op per forward (30 layers), hot and cold adapters -> $OUT/op_check.json,
# 5. bench/gpu/graph_check.py: the graph-safe op captured in a CUDA graph and under torch.compile
#    reduce-overhead, replayed under three routings against the reference; op per layer -> $OUT/graph_check.json.
# Needs no vllm and no project virtualenv. Keeps to about 3 minutes.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/bench/gpu/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
if ! "$PY" -c "import torch, triton, pytest, numpy" 2>/dev/null; then
  echo "missing packages; trying pip"
  "$PY" -m pip install -q torch triton numpy pytest 2>&1 | tail -3 || true
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  2>&1 | tee "$OUT/env.txt"
"$PY" -c "import server.engine.kernels.triton as k; print('triton_available', k.triton_available())" || exit 2

echo "== pytest tests/test_triton_kernel.py tests/test_gpu_op.py"
t0=$(date +%s)
set -o pipefail
timeout 240 "$PY" -m pytest tests/test_triton_kernel.py tests/test_gpu_op.py -q -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 \
  | tee "$OUT/pytest.log" | tail -25
PYTEST_RC=$?
echo "pytest rc=$PYTEST_RC in $(( $(date +%s) - t0 ))s"

echo "== bench/gpu/triton_check.py"
t0=$(date +%s)
timeout 240 "$PY" bench/gpu/triton_check.py 2>&1 | tee "$OUT/bench.log" | tail -60
BENCH_RC=$?
echo "bench rc=$BENCH_RC in $(( $(date +%s) - t0 ))s"
echo "== bench/gpu/op_check.py"
t0=$(date +%s)
timeout 200 "$PY" bench/gpu/op_check.py 2>&1 | tee "$OUT/op.log" | tail -40
OP_RC=$?
echo "op rc=$OP_RC in $(( $(date +%s) - t0 ))s"
echo "== bench/gpu/graph_check.py"
t0=$(date +%s)
timeout 200 "$PY" bench/gpu/graph_check.py 2>&1 | tee "$OUT/graph.log" | tail -20
GRAPH_RC=$?
echo "graph rc=$GRAPH_RC in $(( $(date +%s) - t0 ))s"
echo "pytest_rc=$PYTEST_RC bench_rc=$BENCH_RC op_rc=$OP_RC graph_rc=$GRAPH_RC" > "$OUT/rc.txt"
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$OP_RC" -eq 0 ] && [ "$GRAPH_RC" -eq 0 ]
