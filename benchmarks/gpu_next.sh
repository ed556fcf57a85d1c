#!/usr/bin/env bash
# For the next GPU session: the benchmark of record with the HSTU rows (about 5 minutes), then the
# GPU tests this session could not fit (every head dim for sigmoid/SiLU, fp16 large shapes).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 420 python3 -m omniattn.cli bench --gpu-suite --no-progress --json $OUT/h100.json > $OUT/bench.log 2>&1
echo "bench rc=$? after $(( $(date +%s) - t0 ))s"; grep -A200 "^problem" $OUT/bench.log | grep -i "hstu" | head -40
timeout $(( 580 - ($(date +%s) - t0) )) python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_triton.py > $OUT/tests.log 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 ))s"; tail -5 $OUT/tests.log
