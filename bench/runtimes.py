"""Runtimes: predict throughput through tf, tflite fp32, tflite int8 and onnx, and one-image start-up.

python bench/runtimes.py [--epochs 6] [--small-run PATH] [--images 256] [--repeat 3]

Two models: MobileNetV2 224 (weights=None: speed only) and small-cnn 64 trained on clothing-small
(its int8 export's top-1 agreement and accuracy drop are measured on clothing-small validation by
`cvtool export` itself). Throughput: the model alone on the same decoded batches of 32 (best of
--repeat passes), images/s and the ratio against tf measured in the same run. Start-up: wall time of
`cvtool predict MODEL one.jpg` in a fresh process per runtime (best of --repeat), ratio against tf.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import CLOTHING, REPO, default_folder, machine, mobilenet_run, row

RUNTIMES = ("tf", "tflite", "tflite-int8", "onnx")


def export_all(run: Path, calibration: Path, samples: int) -> None:
    from cvtool.export import export

    for fmt, int8 in (("tflite", False), ("tflite", True), ("onnx", False)):
        result = export(
            run, format=fmt, int8=int8, calibration=calibration, samples=samples, overwrite=True, quiet=True
        )
        print("  " + result.summary(), flush=True)


def load(run: Path, runtime: str):
    from cvtool.bundle import load_classifier, load_exported

    if runtime == "tflite-int8":
        return load_exported(run / "export" / "model-int8.tflite")
    return load_classifier(run, runtime=runtime)


def throughput(classifier, pixels: np.ndarray, repeat: int, batch: int = 32) -> float:
    classifier.predict(pixels[:batch])  # warm-up: tracing, interpreter allocation
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(0, len(pixels), batch):
            classifier.predict(pixels[i : i + batch])
        best = min(best, time.perf_counter() - start)
    return len(pixels) / best


def startup(model: Path, runtime: str, image: Path, tmp: Path, repeat: int) -> float:
    if runtime == "tflite-int8":
        model, runtime = model / "export" / "model-int8.tflite", "auto"
    cmd = [sys.executable, "-m", "cvtool", "predict", str(model), str(image), "--out", str(tmp / "one.csv")]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([*cmd, "--runtime", runtime, "--overwrite", "-q"], check=True, cwd=REPO, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def bench(name: str, run: Path, images: list[Path], repeat: int, tmp: Path) -> None:
    from cvtool.images import load_image

    size = tuple(json.loads((run / "cvtool.json").read_text())["image_size"])
    pixels = np.stack([load_image(p, size) for p in images])
    print(f"\n## {name}: model alone, {len(pixels)} images in batches of 32 (best of {repeat})", flush=True)
    speeds = {}
    for runtime in RUNTIMES:
        speeds[runtime] = throughput(load(run, runtime), pixels, repeat)
        row(f"{name} {runtime}", speeds[runtime], "images/s", "tf", speeds["tf"] if runtime != "tf" else None)
    print(f"\n## {name}: `cvtool predict` on one image, fresh process (best of {repeat})", flush=True)
    first = {}
    for runtime in RUNTIMES:
        first[runtime] = startup(run, runtime, images[0], tmp, repeat)
        row(f"{name} start-up {runtime}", first[runtime], "s", "tf", first["tf"] if runtime != "tf" else None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6, help="small-cnn 64 training epochs on clothing-small")
    parser.add_argument("--small-run", type=Path, help="reuse this small-cnn run instead of training one")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-mobilenet", action="store_true")
    parser.add_argument("--samples", type=int, default=1000, help="parity images (default: all 341 of validation)")
    args = parser.parse_args()
    print(f"# runtimes on {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="cvtool-bench-runtimes-"))
    validation = default_folder("validation")
    images = sorted(validation.rglob("*.jpg"))[: args.images]
    classes = sorted(d.name for d in validation.iterdir() if d.is_dir())
    calibration = default_folder("train")
    try:
        small = args.small_run
        if small is None:
            from cvtool.config import TrainConfig
            from cvtool.train import train

            small = tmp / "small"
            print(f"training small-cnn 64 on {CLOTHING} ({args.epochs} epochs)...", flush=True)
            train(CLOTHING, small, cfg=TrainConfig(epochs=args.epochs, image_size=64, seed=1), quiet=True)
        print("exporting small-cnn 64 (parity on clothing-small validation):", flush=True)
        export_all(small, calibration, args.samples)
        bench("small-cnn 64", small, images, args.repeat, tmp)
        if not args.skip_mobilenet:
            mobilenet = mobilenet_run(tmp / "mobilenet", classes)
            print("\nexporting MobileNetV2 224 (weights=None: speed only):", flush=True)
            export_all(mobilenet, calibration, args.samples)
            bench("MobileNetV2 224", mobilenet, images, args.repeat, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
