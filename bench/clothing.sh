#!/usr/bin/env bash
# clothing-small validation accuracy for `cvtool train` small-cnn at 64 px, without and with
# label smoothing 0.1 (both runs in parallel). Usage: bench/clothing.sh [DATA] [WORK]
# EPOCHS (default 8) and EXTRA (more options, e.g. augmentation) come from the environment.
# The augmented run of bench/README.md: EXTRA='--zoom 0.1 --shift 0.1 --crop 0.1' (with --label-smoothing 0.1).
set -euo pipefail
DATA=${1:-/work/shared/datasets/clothing-small}
WORK=${2:-/tmp/cvtool-clothing}
PY=${PY:-python}
EPOCHS=${EPOCHS:-8}
mkdir -p "$WORK"
common=(--image-size 64 --epochs "$EPOCHS" --overwrite ${EXTRA:-})
$PY -m cvtool train "$DATA" --out "$WORK/plain" "${common[@]}" > "$WORK/plain.log" 2>&1 &
$PY -m cvtool train "$DATA" --out "$WORK/ls01" "${common[@]}" --label-smoothing 0.1 > "$WORK/ls01.log" 2>&1 &
wait
for run in plain ls01; do
  $PY - "$WORK/$run" <<'PYEOF'
import csv, json, sys
run = sys.argv[1]
rows = list(csv.DictReader(open(f"{run}/history.csv")))
meta = json.load(open(f"{run}/cvtool.json"))
secs = [float(r["seconds"]) for r in rows]
print(run, "best epoch", meta["metrics"]["best_epoch"], "val_accuracy at best val_loss",
      round(meta["metrics"]["val_accuracy"], 4), "max val_accuracy", max(float(r["val_accuracy"]) for r in rows),
      "last", rows[-1]["val_accuracy"], "epochs", len(rows), "median s/epoch", sorted(secs)[len(secs) // 2])
PYEOF
done
