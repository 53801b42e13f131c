"""cvtool visualize: activation grids and filter patterns, on small-cnn runs, nested backbones and imagenet:NAME."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app

runner = CliRunner()


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def grid_size(tiles: int, tile: int, columns: int) -> tuple[int, int]:
    """(height, width) of a grid of square tiles with 2-pixel gaps."""
    rows = -(-tiles // columns)
    return rows * (tile + 2) - 2, columns * (tile + 2) - 2


def test_small_cnn_run_gives_one_grid_per_conv_block_and_filter_patterns(trained_run, colour_data, tmp_path):
    image = colour_data / "validation" / "red" / "red_00.png"
    out = tmp_path / "viz"
    args = ["visualize", str(trained_run), str(image), "--out", str(out), "--filters", "4", "--steps", "10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    blocks = ("block1_relu2", "block2_relu2", "block3_relu2")
    assert ", ".join(blocks) in result.output  # the last layer of each convolution block
    # block1_relu2: 32 channels of 32x32 -> 2 rows of 16; block2_relu2: 64 of 16x16 and block3_relu2 the
    # first 64 (--channels' default) of its 128 at 8x8, enlarged to 32.
    for layer, channels in zip(blocks, (32, 64, 64)):
        grid = png(out / f"red_00.{layer}.activations.png")
        assert grid.shape[:2] == grid_size(channels, 32, 16)
        tiles = [grid[r * 34 : r * 34 + 32, c * 34 : c * 34 + 32] for r in range(channels // 16) for c in range(16)]
        assert np.std(grid) > 20 and len({t.tobytes() for t in tiles}) > channels // 2  # channels differ
        patterns = png(out / f"{layer}.filters.png")
        assert patterns.shape[:2] == grid_size(4, 32, 2) and np.std(patterns) > 20
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"red_00.{n}.activations.png" for n in blocks] + [f"{n}.filters.png" for n in blocks]
    )
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    bad = runner.invoke(app, [*args, "--overwrite", "--layers", "nope"])
    assert bad.exit_code == 2 and "no layer named 'nope'" in bad.output


def test_filter_patterns_raise_their_filters_activation(trained_run):
    from cvtool.bundle import load_classifier
    from cvtool.visualize import _layer_model, climb_path, filter_patterns

    clf = load_classifier(trained_run)
    assert climb_path(clf.model, ["block2_relu2"]) == ["block2_bn2"]  # a ReLU climbs on its input
    assert climb_path(clf.model, ["block2_bn2"]) == ["block2_bn2"]
    layer = _layer_model(clf.model, climb_path(clf.model, ["block2_relu2"]))
    filters = [0, 1, 2, 3]
    start = filter_patterns(layer, filters, (32, 32), steps=0)
    climbed = filter_patterns(layer, filters, (32, 32), steps=15)

    def mean_activation(images):
        acts = np.asarray(layer(images.astype(np.float32), training=False))
        return np.array([acts[i, 2:-2, 2:-2, f].mean() for i, f in enumerate(filters)])

    assert (mean_activation(climbed) > mean_activation(start) + 0.1).all()
    assert len({np.round(p, 2).tobytes() for p in climbed}) == len(filters)  # each filter its own pattern


def test_nested_backbone_and_a_folder_with_a_bad_file(colour_data, tmp_path):
    from cvtool.bundle import save_model, write_meta
    from tests.test_gradcam import nested_object_model

    run = tmp_path / "run"
    save_model(nested_object_model(), run / "model.keras")  # the finetune shape: a nested 'backbone' model
    write_meta(run, {"class_names": ["blue", "green", "red"], "image_size": [32, 32]})
    photos = tmp_path / "photos"
    shutil.copytree(colour_data / "validation" / "green", photos / "sub")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "viz"
    result = runner.invoke(app, ["visualize", str(run), str(photos), "--out", str(out), "--filters", "2", "--quiet"])
    assert result.exit_code == 1, result.output
    with open(out / "errors.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["broken.jpg"]
    # Default layers reach into the backbone: its last layer at 32x32 and at 16x16.
    for layer, channels, tile in (("backbone.conv2", 32, 32), ("backbone.conv3", 32, 32)):
        for i in range(12):
            grid = png(out / "sub" / f"green_{i:02d}.{layer}.activations.png")
            assert grid.shape[:2] == grid_size(channels, tile, 16)
        assert png(out / f"{layer}.filters.png").shape[:2] == grid_size(2, 32, 2)


def test_imagenet_model_named_layer_and_default_layers(tmp_path, colour_data):
    from cvtool.bundle import load_classifier
    from cvtool.cam import _layer_at
    from cvtool.visualize import default_layers
    from tests.test_imagenet import saved_application

    weights = tmp_path / "mobilenet_v2.weights.h5"
    saved_application("MobileNetV2", "mobilenet_v2", weights, seed=0)
    clf = load_classifier("imagenet:mobilenet_v2", weights=weights)
    layers = default_layers(clf.model)
    sizes = [tuple(_layer_at(clf.model, p).output.shape[1:3]) for p in layers]
    assert sizes == [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)], (layers, sizes)
    # Squeeze-and-excitation branches (1x1 maps multiplied back) are not blocks of their own.
    from cvtool.architectures import backbone_classifier
    from cvtool.backbones import get_backbone

    se_model = backbone_classifier(get_backbone("mobilenet_v3_small"), 3, (64, 64))
    se_sizes = [tuple(_layer_at(se_model, p).output.shape[1:3]) for p in default_layers(se_model)]
    assert se_sizes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)], se_sizes
    out = tmp_path / "viz"
    args = ["visualize", "imagenet:mobilenet_v2", str(colour_data / "validation" / "blue" / "blue_00.png")]
    args += ["--weights", str(weights), "--out", str(out), "--layers", "block_3_expand_relu", "--channels", "8"]
    args += ["--filters", "2", "--steps", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # block_3_expand_relu: 144 channels of 56x56 (tiles at their own size), the first 8 shown.
    assert png(out / "blue_00.block_3_expand_relu.activations.png").shape[:2] == grid_size(8, 56, 8)
    assert png(out / "block_3_expand_relu.filters.png").shape[:2] == grid_size(2, 224, 2)


@pytest.mark.parametrize("extra", [["--step-size", "0"], ["--step-size", "nan"], ["--filters", "-1"]])
def test_bad_options_exit_2(trained_run, colour_data, tmp_path, extra):
    args = ["visualize", str(trained_run), str(colour_data / "validation"), "--out", str(tmp_path / "v"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output


def test_visualize_help_does_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        "sys.argv = ['cvtool', 'visualize', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_NOT_LOADED" in out.stdout and "--filters" in out.stdout and "--layers" in out.stdout
