#!/usr/bin/env bash
# First GPU session: a correctness smoke test, the tile-config sweep, then the GPU and kernel tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
timeout 150 python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_gpu.py -k "large_shapes and bfloat16" 2>&1 | tail -12
echo "smoke done at $(( $(date +%s) - t0 ))s"
timeout 300 python3 benchmarks/gpu_sweep.py --json $OUT/sweep.json > $OUT/sweep.log 2>&1
tail -30 $OUT/sweep.log
echo "sweep done at $(( $(date +%s) - t0 ))s"
timeout $(( 560 - ($(date +%s) - t0) )) python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton.py 2>&1 | tee $OUT/tests.log | tail -30
echo "all done at $(( $(date +%s) - t0 ))s"
