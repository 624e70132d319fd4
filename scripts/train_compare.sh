#!/usr/bin/env bash
# Training with FlowCut, in miniature (the paper's Table 6): two arms from the same stage-1 projector, the same
# batches in the same order, the same number of projector + LoRA steps; one unpruned, one with FlowCut keeping
# 64 of 256 tokens in the tower. Then both arms' test accuracy at 256 (unpruned) and 64 tokens, and the report.
# Resumable after the training: the evaluation cells are kept in $OUT/eval-<arm>/cells. The trained weights are
# not committed (gitignored); without them the script trains again and drops the old evaluation cells.
# About 30 min of training and 20 min of evaluation on a 2-core CPU with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/training/compare}
STEPS=${STEPS:-100}
N=${N:-400}
if [ ! -f "$OUT/unpruned.safetensors" ] || [ ! -f "$OUT/flowcut64.safetensors" ]; then
  rm -rf "$OUT/eval-unpruned" "$OUT/eval-flowcut64"
  python -m vlmcut.zoo.train --compare flowcut@64 --init docs/training/stage1-projector.safetensors \
    --stage2-steps "$STEPS" --warmup 10 --turns 12 --seed 1 --scenes-images 2000 --easy-vqa-images 1200 \
    --time-budget-s 14400 --out "$OUT"
fi
for arm in unpruned flowcut64; do
  vlmcut eval --sweep --weights "$OUT/$arm.safetensors" --data scenes easy-vqa --split test --n "$N" \
    --methods flowcut --keeps 64 --threads 2 --out "$OUT/eval-$arm"
done
python -m vlmcut.zoo.train --compare-report unpruned flowcut64 --out "$OUT"
