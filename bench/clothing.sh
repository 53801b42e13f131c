#!/usr/bin/env bash
# clothing-small validation accuracy for `cvtool train` small-cnn, with and without label smoothing,
# and with a stronger augmentation recipe. Usage: bench/clothing.sh [DATA] [WORK]
set -euo pipefail
DATA=${1:-/work/shared/datasets/clothing-small}
WORK=${2:-/tmp/cvtool-clothing}
PY=${PY:-python}
EPOCHS=${EPOCHS:-15}
mkdir -p "$WORK"
common=(--image-size 64 --epochs "$EPOCHS" --overwrite)
$PY -m cvtool train "$DATA" --out "$WORK/plain" "${common[@]}"
$PY -m cvtool train "$DATA" --out "$WORK/ls01" "${common[@]}" --label-smoothing 0.1
$PY -m cvtool train "$DATA" --out "$WORK/ls01-aug" "${common[@]}" --label-smoothing 0.1 \
  --rotation 0.03 --zoom 0.1 --shift 0.1 --crop 0.1
