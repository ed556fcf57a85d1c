#!/usr/bin/env bash
# HSTU vs SASRec on MovieLens-100K at an equal budget: same epochs, batch, width, depth, lr,
# negatives, temperature; two seeds each. Writes one JSON per run beside this script.
cd "$(dirname "$0")/../.."
EPOCHS=${EPOCHS:-150}
for seed in 0 1; do
  for model in hstu sasrec; do
    python3 -m omniattn.cli recsys train --dataset ml-100k --model $model --epochs $EPOCHS --seed $seed \
      --dim 50 --blocks 2 --heads 1 --max-len 200 --dropout 0.2 --lr 1e-3 --negatives 128 --temperature 0.05 \
      --no-progress --json benchmarks/recsys/ml100k_${model}_seed${seed}.json > benchmarks/recsys/ml100k_${model}_seed${seed}.log 2>&1
  done
done
