"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLOTHING = REPO.parent / "shared" / "datasets" / "clothing-small"
if not CLOTHING.exists():
    CLOTHING = Path("/work/shared/datasets/clothing-small")


def default_folder(split: str = "validation") -> Path:
    """clothing-small/<split> when present, else the repo's samples (smaller, so noisier figures)."""
    folder = CLOTHING / split
    return folder if folder.exists() else REPO / "samples" / "clothing" / split


def machine() -> str:
    import tensorflow as tf

    import cvtool.runtime  # noqa: F401

    gpus = tf.config.list_physical_devices("GPU")
    accel = (
        f"{len(gpus)} GPU ({tf.config.experimental.get_device_details(gpus[0]).get('device_name', 'GPU')})"
        if gpus
        else "CPU"
    )
    return f"{platform.machine()}, {os.cpu_count()} cores, {accel}, TF {tf.__version__}"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def mobilenet_run(run_dir: Path, class_names: list[str], size: int = 224) -> Path:
    """A MobileNetV2 classifier (weights=None) saved as a cvtool run directory."""
    from cvtool.architectures import backbone_classifier
    from cvtool.backbones import get_backbone
    from cvtool.bundle import save_model, write_meta

    if (run_dir / "model.keras").exists():
        return run_dir
    model = backbone_classifier(get_backbone("mobilenet_v2"), len(class_names), (size, size))
    save_model(model, run_dir / "model.keras")
    write_meta(
        run_dir,
        {"task": "classification", "class_names": class_names, "image_size": [size, size], "arch": "mobilenet_v2"},
    )
    return run_dir


def row(name: str, value: float, unit: str, baseline_name: str | None = None, baseline: float | None = None) -> None:
    text = f"{name:<48} {value:10.2f} {unit}"
    if baseline:
        text += f"   ratio vs {baseline_name}: {value / baseline:.2f}x"
    print(text, flush=True)
