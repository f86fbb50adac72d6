#!/bin/bash
# head against 4 lanes a query everywhere (tile_lanes_per_query forced), tile_cases.py alternating
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
for v in head four; do
  mkdir -p /tmp/$v && tar -cf - csrc neusdf configs train.py benchmarks pyproject.toml | tar -x -C /tmp/$v
done
sed -i 's/  return n.P <= 4 \* n.Q \&\& n.B \* n.Q >= kTileTwoLaneQueries ? 2 : 4;/  return 4;/' /tmp/four/csrc/knn_search_cuda.cu
grep -n "return 4;" /tmp/four/csrc/knn_search_cuda.cu | head -2
for v in head four; do
  (cd /tmp/$v && MAX_JOBS=8 TORCH_EXTENSIONS_DIR=/tmp/ext_$v PYTHONPATH=/tmp/$v:/tmp/site python3 -m neusdf.ops.build 2>&1 | tail -1) &
done
wait
mkdir -p $OUT/lanes
for round in 1 2; do
  for v in head four; do
    (cd /tmp/$v && TORCH_EXTENSIONS_DIR=/tmp/ext_$v PYTHONPATH=/tmp/$v:/tmp/site timeout 120 python3 benchmarks/tile_cases.py $OUT/lanes/${v}_r$round.json --label $v 2>&1 | tail -10)
  done
done
