"""finetune's head phase on cached features vs recomputing the frozen backbone every epoch (issue 18, item 5).

Both runs: clothing-small, MobileNetV2 at --size px with a local weights file (random
convolutions whose BatchNorm statistics are set from a batch of training images: no
download, and features that tell images apart), --no-hflip, --head-epochs N --epochs 0,
same seed. Prints each epoch's history.csv seconds and val_accuracy, and the ratio of the
median head-epoch seconds (cached / recomputed). Usage::

    python bench/cached_features.py [--size 128] [--epochs 3] [--work /tmp/cvtool-cached]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import CLOTHING, REPO, Timer, machine


def calibrated_weights(path: Path, size: int, data: Path) -> Path:
    """MobileNetV2 without top, random convolutions, BN statistics of 64 training images."""
    import keras
    import numpy as np

    from cvtool.backbones import get_backbone
    from cvtool.images import list_images, load_image
    from cvtool.layers import Preprocess

    keras.utils.set_random_seed(0)
    backbone = get_backbone("mobilenet_v2")
    net = backbone.build((size, size), weights=None)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    items = list_images(data / "train")[::48][:64]
    x = np.stack([load_image(i.path, (size, size)) for i in items]).astype(np.float32)
    net(Preprocess(backbone.preprocess)(x), training=True)
    net.save_weights(path)
    return path


def run(data: Path, out: Path, weights: Path, size: int, epochs: int, cache: str) -> float:
    args = [sys.executable, "-m", "cvtool", "finetune", str(data), "--out", str(out), "--backbone", "mobilenet_v2"]
    args += ["--weights", str(weights), "--image-size", str(size), "--head-epochs", str(epochs), "--epochs", "0"]
    args += ["--no-hflip", "--cache-features", cache, "--overwrite", "--quiet", "--seed", "1"]
    with Timer() as t:
        subprocess.run(args, check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), **_env()})
    return t.seconds


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cvtool-cached"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine(), flush=True)
    weights = calibrated_weights(args.work / "mobilenet_v2.weights.h5", args.size, CLOTHING)
    results = {}
    for cache in ("off", "on"):
        out = args.work / f"cache-{cache}"
        total = run(CLOTHING, out, weights, args.size, args.epochs, cache)
        rows = history(out)
        meta = json.loads((out / "cvtool.json").read_text())
        secs = [float(r["seconds"]) for r in rows]
        acc = [round(float(r["val_accuracy"]), 4) for r in rows]
        results[cache] = statistics.median(secs)
        print(
            f"cache {cache:<3}: s/epoch {secs}, val_accuracy {acc}, best {meta['metrics']['val_accuracy']:.4f}, "
            f"whole command {total:.1f} s, cached={meta['phases']['head_on_cached_features']}",
            flush=True,
        )
    ratio = results["on"] / results["off"]
    print(f"median head epoch: cached {results['on']:.2f} s / recomputed {results['off']:.2f} s = {ratio:.3f}x")


if __name__ == "__main__":
    main()
