"""Default `cvtool train` recipe and `train --members` diversity, before/after, on clothing-small.

Runs every recipe as its own `cvtool train` process, all at the same time (side by side, so the
shared machine's load falls on each alike), then prints validation accuracy and seconds with the
ratio to the old default measured in the same run. Judged on validation only.

    python bench/recipes.py                       # old vs new default (single models)
    python bench/recipes.py --recipes old prev new depth3-15
    python bench/recipes.py --members 5 --diversity seed scale   # ensembles: gain over the best member
    python bench/recipes.py --epochs 3 --limit 60             # quick look: fewer epochs, 60 images per class

Seconds are the sum of history.csv's per-epoch seconds (training + validation, no start-up or decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import CLOTHING, REPO

# The recipe before issue 18 (every option that changed, pinned) and candidates; "new" is today's default.
# "old" also runs the code of that time (BASELINE_REF: small-cnn with BatchNormalization after the ReLU),
# checked out with `git archive` into the work folder, so the baseline stays what users had. The first
# round of candidates was measured on the two-block small-cnn (pinned: --depth 2); "prev" is the default
# that round chose.
BASELINE_REF = "4a3cfd3"
OLD_CODE = {"old"}
_LS0 = "--lr-schedule cosine --label-smoothing 0 --depth 2"  # pinned: smoothing was the default for a while
_LS1 = "--lr-schedule cosine --label-smoothing 0.1 --depth 2"
RECIPES: dict[str, list[str]] = {
    name: spec.split()
    for name, spec in {
        "old": "--epochs 10 --lr-schedule constant --label-smoothing 0",
        "new": "",  # today's defaults: three-block Conv-BN-ReLU small-cnn, 12 epochs, cosine decay
        "prev": f"--epochs 15 {_LS0}",  # the default between the two rounds
        "cosine": f"--epochs 10 {_LS0}",
        "cosine-15-ls": f"--epochs 15 {_LS1}",
        "cosine-15-mixup": f"--epochs 15 {_LS0} --mixup 0.2",
        "cosine-15-ra": f"--epochs 15 {_LS0} --randaugment 0.3",
        "cosine-15-ls-ra": f"--epochs 15 {_LS1} --randaugment 0.3",
        "cosine-15-ls-crop": f"--epochs 15 {_LS1} --crop 0.1",
        "cosine-15-ls-zs": f"--epochs 15 {_LS1} --zoom 0.1 --shift 0.1",
        "cosine-15-ls-lr2": f"--epochs 15 {_LS1} --lr 0.002",
        "depth3-15": "--epochs 15 --depth 3",
        "depth3-mixup": "--epochs 15 --depth 3 --mixup 0.2",
    }.items()
}


def subset(data: Path, limit: int, work: Path) -> Path:
    """train/ with the first ``limit`` images per class (symlinks), validation/ whole."""
    out = work / f"data-{limit}"
    if out.exists():
        return out
    for split in ("train", "validation"):
        for cls in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            files = sorted(cls.iterdir())
            dest = out / split / cls.name
            dest.mkdir(parents=True)
            for f in files[:limit] if split == "train" else files:
                (dest / f.name).symlink_to(f)
    return out


def baseline_code(work: Path, ref: str) -> Path:
    """The cvtool package as it was at ``ref`` (git archive), for the "old" recipe."""
    out = work / f"code-{ref}"
    if not (out / "cvtool").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "cvtool"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def start(
    name: str, args: list[str], data: Path, work: Path, members: int, diversity: str | None, code: Path = REPO
) -> tuple:
    run = work / name
    cmd = [sys.executable, "-m", "cvtool", "train", str(data), "--out", str(run), "--overwrite", *args]
    if members > 1:
        cmd += ["--members", str(members), "--diversity", diversity]
    log = open(work / f"{name}.log", "w")
    env = {**os.environ, "PYTHONPATH": str(code)}
    return name, run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.monotonic()


def history_seconds(run: Path) -> float:
    import csv

    with open(run / "history.csv", newline="") as f:
        return sum(float(r["seconds"]) for r in csv.DictReader(f))


def single(run: Path) -> dict:
    meta = json.loads((run / "cvtool.json").read_text())
    return {
        "val_accuracy": meta["metrics"]["val_accuracy"],
        "best_epoch": meta["metrics"]["best_epoch"],
        "seconds": history_seconds(run),
    }


def ensemble(run: Path, data: Path) -> dict:
    """Each member's and the combination's accuracy on validation/ (cvtool evaluate)."""
    out = run.parent / f"{run.name}-eval"
    cmd = [sys.executable, "-m", "cvtool", "evaluate", str(run), str(data / "validation"), "--out", str(out)]
    subprocess.run([*cmd, "--overwrite", "--quiet"], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = json.loads((out / "metrics.json").read_text())
    members = sorted(p for p in run.iterdir() if p.name.startswith("member-"))
    alone = [json.loads((m / "cvtool.json").read_text())["metrics"]["val_accuracy"] for m in members]
    return {
        "val_accuracy": metrics["accuracy"],
        "best_member": max(alone),
        "members": alone,
        "seconds": sum(history_seconds(m) for m in members),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CLOTHING)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cvtool-recipes"))
    parser.add_argument("--recipes", nargs="+", default=["old", "new"], choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (quick looks)")
    parser.add_argument("--limit", type=int, help="training images per class (default: all)")
    parser.add_argument("--image-size", type=int, help="override every recipe's image size (quick looks)")
    parser.add_argument("--members", type=int, default=1, help="K > 1: train --members K of the recipe 'new'")
    parser.add_argument("--diversity", nargs="+", default=["seed", "scale"], help="with --members: modes compared")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="git commit whose code runs the 'old' recipe")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = subset(args.data, args.limit, args.work) if args.limit else args.data
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    extra += ["--image-size", str(args.image_size)] if args.image_size else []
    if args.members > 1:
        jobs = [(f"members-{d}", [*RECIPES["new"], *extra], d) for d in args.diversity]
    else:
        jobs = [(name, [*RECIPES[name], *extra], None) for name in args.recipes]
    old = baseline_code(args.work, args.baseline_ref)
    procs = [start(name, a, data, args.work, args.members, d, old if name in OLD_CODE else REPO) for name, a, d in jobs]
    rows = {}
    for name, run, proc, began in procs:
        if proc.wait() != 0:
            print(f"{name} failed: see {args.work / name}.log", file=sys.stderr)
            continue
        wall = time.monotonic() - began
        rows[name] = ensemble(run, data) if args.members > 1 else single(run)
        rows[name]["wall"] = wall
    base = rows.get(jobs[0][0])
    print(f"data {data}, {'all' if not args.limit else args.limit} training images per class, run side by side")
    if args.members > 1:
        print("| diversity | members alone (val acc) | best member | ensemble | gain over best | seconds |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, r in rows.items():
            alone = " ".join(f"{a:.3f}" for a in r["members"])
            gain = 100 * (r["val_accuracy"] - r["best_member"])
            print(
                f"| {name} | {alone} | {r['best_member']:.3f} | {r['val_accuracy']:.3f} | {gain:+.1f} points "
                f"| {r['seconds']:.0f} |"
            )
    else:
        print("| recipe | options | val accuracy (model.keras) | best epoch | seconds (epochs) | ratio to old |")
        print("| --- | --- | --- | --- | --- | --- |")
        for (name, a, _), r in ((j, rows[j[0]]) for j in jobs if j[0] in rows):
            ratio = r["seconds"] / base["seconds"] if base else float("nan")
            print(
                f"| {name} | `{' '.join(a) or '(defaults)'}` | {r['val_accuracy']:.3f} | {r['best_epoch']} "
                f"| {r['seconds']:.0f} | {ratio:.2f}x |"
            )
    if os.environ.get("KEEP_RUNS") != "1":
        for _, run, _, _ in procs:
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
