#!/usr/bin/env bash
# The benchmark of record: omniattn bench --gpu-suite, rows written as they are measured.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv,noheader
timeout ${BENCH_TIMEOUT:-540} python3 -m omniattn.cli bench --gpu-suite --no-progress --json $OUT/h100.json > $OUT/bench.log 2>&1
echo "bench rc=$?"
python3 - <<'PY'
import json, os
rows = json.load(open(os.environ["OUT"] + "/h100.json"))["rows"]
print(len(rows), "rows")
for r in rows:
    print(f"{r['op']:<8}{'V' if r.get('varlen') else ' '} {r['batch']:>3}x{r['seqlen']:<6}{'c' if r['causal'] else ' '} {r['mode']:<7}{r['impl']:<15}"
          f"{r['tflops'] if r['tflops'] is not None else r.get('error','')!s:>8} {r['max_err']!s:>9}")
PY
