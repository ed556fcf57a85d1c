#!/usr/bin/env bash
# Benchmark of record after the config change, plus the GPU tests the change touches.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 200 python3 -m omniattn.cli bench --gpu-suite --no-progress --json $OUT/h100.json > $OUT/bench.log 2>&1
echo "bench rc=$? after $(( $(date +%s) - t0 ))s"
timeout $(( 390 - ($(date +%s) - t0) )) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py -k "compile or (large_shapes and dtype0) or (every_head_dim and softmax)" > $OUT/tests.log 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 ))s"; tail -4 $OUT/tests.log
python3 - <<'PY'
import json, os
rows = json.load(open(os.environ["OUT"] + "/h100.json"))["rows"]
print(len(rows), "rows")
for r in rows:
    if r["impl"] in ("omniattn", "flex") and r["causal"]:
        print(f"{r['op']:<8}{'V' if r.get('varlen') else ' '} {r['batch']:>3}x{r['seqlen']:<6} {r['mode']:<7}{r['impl']:<9}{r['tflops']!s:>8}")
PY
