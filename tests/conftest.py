"""Shared fixtures: small real images on disk and a small real trained model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "clothing"
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def colour_image(rgb, size=(40, 32), seed=0) -> Image.Image:
    """A noisy image dominated by ``rgb``, with a random darker square: easy but not trivial."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 30, (h, w, 3)), 0, 255)
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y : y + h // 3, x : x + w // 3] *= 0.5
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def make_colour_dataset(root: Path, per_class: int = 12, splits=("train", "validation")) -> Path:
    for s, split in enumerate(splits):
        for c, (name, rgb) in enumerate(COLOURS.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour_image(rgb, seed=1000 * s + 100 * c + i).save(folder / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """train/ and validation/ splits of three colour classes, 12 images each, 40x32 PNG."""
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def trained_run(colour_data, tmp_path_factory) -> Path:
    """A small-cnn run directory trained on ``colour_data`` at 32 px (read-only: copy before changing)."""
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path_factory.mktemp("runs") / "colours"
    train(colour_data, run, cfg=TrainConfig(epochs=4, image_size=32, batch_size=8, seed=1), quiet=True)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture(scope="session")
def tools(tmp_path_factory) -> dict[str, Path]:
    """The other models commands take: a 1x1-conv segmentation .keras file, a tiny TF-Hub feature extractor."""
    import keras

    from tests.test_finetune import make_hub_model

    root = tmp_path_factory.mktemp("tools")
    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="identity")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    model.save(root / "seg.keras")
    return {"segmodel": root / "seg.keras", "hub": make_hub_model(root / "hub")}
