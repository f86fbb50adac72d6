#!/usr/bin/env bash
# One GPU-machine call for the op: build for sm_90, run the whole op test suite (CUDA tests
# included), compute-sanitizer on a small case, then the benchmark. Logs go to $OUT.
# Run from the repo root on the device machine:  bash benchmarks/gpu_op.sh
set -uo pipefail
# Hydra, OmegaConf and trimesh travel as wheels (shared/device/fetch-wheels.sh; carry .whl).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/neusdf-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m neusdf.ops.build 2>&1 | tee "$OUT/build.log" || exit 1
echo "build seconds: $(( $(date +%s) - t0 ))" | tee -a "$OUT/build.log"
# CUDA tests first, so that a crash elsewhere cannot hide their result.
python3 -m pytest tests/test_ops.py -q -p no:cacheprovider -m cuda ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest-cuda.log" | tail -15
python3 -m pytest tests/test_ops.py -q -p no:cacheprovider -m "not cuda" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest-cpu.log" | tail -8
cat > /tmp/sanitize_case.py <<'PY'
import torch
from neusdf.ops import knn_aggregate_aniso
from neusdf.ops.testing import make_inputs
for K, P in ((5, 37), (16, 300), (40, 50)):
    ins = make_inputs(2, 45, P, 33, device="cuda", requires_grad=True)
    f_out, w, d, idx = knn_aggregate_aniso(*ins, K)
    (gq,) = torch.autograd.grad((f_out.sum(-1) + w.sum(-1)).sum(), ins[0], create_graph=True)
    gq.square().sum().backward()
torch.cuda.synchronize()
print("sanitize case ok")
PY
for tool in memcheck racecheck; do
  timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 python3 /tmp/sanitize_case.py \
    > "$OUT/sanitizer-$tool.log" 2>&1
  echo "compute-sanitizer $tool exit: $?  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer-$tool.log" | tail -1)"
done
python3 -m neusdf.ops.benchmark --json "$OUT/op_benchmark.json" --profile --overhead ${BENCH_ARGS:-} 2>&1 | tee "$OUT/op_benchmark.log" | tail -40
