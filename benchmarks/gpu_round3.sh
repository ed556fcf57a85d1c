#!/usr/bin/env bash
# memcheck on a subset of every kernel variant, then the GPU tests not yet run.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 200 compute-sanitizer --tool memcheck --print-limit 20 python3 benchmarks/memcheck_subset.py > $OUT/memcheck.log 2>&1
echo "memcheck rc=$? after $(( $(date +%s) - t0 ))s"; tail -6 $OUT/memcheck.log
timeout $(( ${TESTS_BUDGET:-420} - ($(date +%s) - t0) )) python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_gpu.py -k "compile or opcheck or auto or sdpa or hstu or many_short or long_varlen" > $OUT/tests.log 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 ))s"; tail -15 $OUT/tests.log
