#!/usr/bin/env bash
# Final GPU session: the benchmark of record, memcheck on a subset of every kernel variant, GPU tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout 230 python3 -m omniattn.cli bench --gpu-suite --no-progress --json $OUT/h100.json > $OUT/bench.log 2>&1
echo "bench rc=$? after $(( $(date +%s) - t0 ))s"
timeout 160 compute-sanitizer --tool memcheck --print-limit 20 python3 benchmarks/memcheck_subset.py > $OUT/memcheck.log 2>&1
echo "memcheck rc=$? after $(( $(date +%s) - t0 ))s"; tail -4 $OUT/memcheck.log
timeout $(( 545 - ($(date +%s) - t0) )) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py -k "compile or opcheck or auto or sdpa or hstu or many_short or long_varlen" > $OUT/tests.log 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 ))s"; tail -12 $OUT/tests.log
python3 - <<'PY'
import json, os
rows = json.load(open(os.environ["OUT"] + "/h100.json"))["rows"]
for r in rows:
    if r["impl"] in ("omniattn", "flex", "sdpa-flash"):
        print(f"{r['op']:<8}{'V' if r.get('varlen') else ' '} {r['batch']:>3}x{r['seqlen']:<6}{'c' if r['causal'] else ' '} {r['mode']:<7}{r['impl']:<11}{r['tflops']!s:>8}")
PY
