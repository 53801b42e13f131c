#!/usr/bin/env bash
# Transfer experiment with no downloads (issue 3): pretrain mobilenet_v2 from scratch on five
# clothing classes, save its backbone weights, then finetune on the other five classes with only
# 20 training images per class, from that weights file and from --weights none.
# Usage: bench/transfer.sh [DATA=/work/shared/datasets/clothing-small] [WORK=/tmp/cvtool-transfer]
set -euo pipefail
DATA=${1:-/work/shared/datasets/clothing-small}
WORK=${2:-/tmp/cvtool-transfer}
SIZE=${SIZE:-96}
PY=${PY:-python}
A=(dress hat longsleeve outwear pants)
B=(shirt shoes shorts skirt t-shirt)
rm -rf "$WORK" && mkdir -p "$WORK"
for c in "${A[@]}"; do
  mkdir -p "$WORK/pre/train" "$WORK/pre/validation"
  ln -s "$DATA/train/$c" "$WORK/pre/train/$c"; ln -s "$DATA/validation/$c" "$WORK/pre/validation/$c"
done
for c in "${B[@]}"; do
  mkdir -p "$WORK/few/train/$c" "$WORK/few/validation"
  ls "$DATA/train/$c" | sort | head -20 | while read -r f; do ln -s "$DATA/train/$c/$f" "$WORK/few/train/$c/$f"; done
  ln -s "$DATA/validation/$c" "$WORK/few/validation/$c"
done
$PY -m cvtool train "$WORK/pre" --out "$WORK/pre-run" --arch mobilenet_v2 --image-size "$SIZE" \
  --epochs "${PRE_EPOCHS:-10}" --zoom 0.1 --shift 0.1
$PY - "$WORK/pre-run/model.keras" "$WORK/backbone.weights.h5" <<'PYEOF'
import sys
from cvtool.bundle import load_keras_model
load_keras_model(sys.argv[1]).get_layer("backbone").save_weights(sys.argv[2])
PYEOF
for w in "$WORK/backbone.weights.h5" none; do
  name=$([ "$w" = none ] && echo none || echo pretrained)
  $PY -m cvtool finetune "$WORK/few" --out "$WORK/ft-$name" --backbone mobilenet_v2 --weights "$w" \
    --image-size "$SIZE" --head-epochs 10 --epochs 10 --batch-size 16 --unfreeze 30
done
# Second pair: a faster head (--lr 0.01; the fine-tune phase then runs at 0.001).
for w in "$WORK/backbone.weights.h5" none; do
  name=$([ "$w" = none ] && echo none || echo pretrained)
  $PY -m cvtool finetune "$WORK/few" --out "$WORK/ft-$name-lr01" --backbone mobilenet_v2 --weights "$w" \
    --image-size "$SIZE" --head-epochs 10 --epochs 10 --batch-size 16 --unfreeze 30 --lr 0.01
done
