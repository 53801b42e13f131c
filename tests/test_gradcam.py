"""cvtool gradcam: the maths on a model that must look at one small object, and the command's outputs."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app

runner = CliRunner()

OBJECT_COLOURS = {"blue": (40, 60, 230), "green": (40, 210, 60), "red": (230, 40, 40)}
IMAGE_W, IMAGE_H, OBJECT = 48, 40, 7  # input images are not square and not the model's size


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def object_image(colour, rng) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Gray noise with one small coloured square at a random place; returns the image and the box (x0, y0, x1, y1)."""
    arr = rng.normal(128, 35, (IMAGE_H, IMAGE_W, 3))
    x, y = int(rng.integers(0, IMAGE_W - OBJECT + 1)), int(rng.integers(0, IMAGE_H - OBJECT + 1))
    arr[y : y + OBJECT, x : x + OBJECT] = np.array(colour) + rng.normal(0, 10, (OBJECT, OBJECT, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), (x, y, x + OBJECT, y + OBJECT)


def make_object_set(root: Path, per_class: int, seed: int) -> dict[str, tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    boxes = {}
    for name, colour in OBJECT_COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, box = object_image(colour, rng)
            img.save(root / name / f"{i:03d}.png")
            boxes[f"{name}/{i:03d}.png"] = box
    return boxes


def nested_object_model(size: int = 32):
    """Input -> Preprocess -> nested functional 'backbone' (3 convs) -> pooling -> softmax: the finetune shape."""
    import keras
    from keras import layers

    from cvtool.layers import Preprocess

    bb_in = keras.Input((size, size, 3))
    y = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(bb_in)
    y = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(y)
    y = layers.MaxPooling2D(2, name="pool1")(y)
    y = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv3")(y)
    backbone = keras.Model(bb_in, y, name="backbone")
    inputs = keras.Input((size, size, 3), name="image")
    x = Preprocess("rescale", name="preprocess")(inputs)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(0.1, name="head_dropout")(x)
    outputs = layers.Dense(len(OBJECT_COLOURS), activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def train_object_model(root: Path) -> tuple[Path, Path, dict, float]:
    """Train the nested-backbone model on generated object images; (run dir, test folder, boxes, test accuracy)."""
    import keras

    from cvtool.bundle import save_model, write_meta
    from cvtool.images import list_images, load_image

    make_object_set(root / "train", per_class=80, seed=1)
    boxes = make_object_set(root / "test", per_class=15, seed=2)
    names = sorted(OBJECT_COLOURS)
    items = list_images(root / "train")
    x = np.stack([load_image(item.path, (32, 32)) for item in items]).astype(np.float32)
    y = np.array([names.index(item.rel.split("/")[0]) for item in items])
    keras.utils.set_random_seed(0)
    model = nested_object_model()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=8, verbose=0, shuffle=True)
    x_test = np.stack([load_image(root / "test" / rel, (32, 32)) for rel in boxes]).astype(np.float32)
    y_test = np.array([names.index(rel.split("/")[0]) for rel in boxes])
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
    run = root / "run"
    save_model(model, run / "model.keras")
    write_meta(run, {"class_names": names, "image_size": [32, 32]})
    return run, root / "test", boxes, accuracy


@pytest.fixture(scope="module")
def object_run(tmp_path_factory):
    """A nested-backbone model trained until it tells the object colours apart; its run dir and test images."""
    run, test_dir, boxes, accuracy = train_object_model(tmp_path_factory.mktemp("objects"))
    assert accuracy >= 0.9, f"the object model did not learn (accuracy {accuracy:.2f})"
    return run, test_dir, boxes


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "positive-gradients", "guided-gradcam"])
def test_heatmap_peak_falls_on_the_object(object_run, tmp_path, method):
    from cvtool.gradcam import gradcam

    run, test_dir, boxes = object_run
    out = tmp_path / "cams"
    result = gradcam(run, test_dir, out, method=method, npy=True, quiet=True)
    assert result.exit_code == 0 and result.processed == len(boxes)
    hits = 0
    for rel, (x0, y0, x1, y1) in boxes.items():
        heat = np.load(out / rel.replace(".png", ".heatmap.npy"))
        assert heat.shape == (IMAGE_H, IMAGE_W) and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0
        py, px = np.unravel_index(np.argmax(heat), heat.shape)
        margin = 2  # one feature-map cell is 3 x 2.5 input pixels
        hits += x0 - margin <= px < x1 + margin and y0 - margin <= py < y1 + margin
    assert hits >= 0.85 * len(boxes), f"{method}: peak on the object in {hits}/{len(boxes)} images"


def test_guided_relu_passes_gradients_only_where_input_and_gradient_are_positive():
    import tensorflow as tf

    from cvtool.guided_backprop import guided_relu

    x = tf.constant([-2.0, -1.0, 0.5, 1.0, 3.0, 7.0])
    dy = tf.constant([1.0, -1.0, 2.0, -3.0, 4.0, 5.0])
    for cap, want_y, want_grad in (
        (None, [0, 0, 0.5, 1, 3, 7], [0, 0, 2, 0, 4, 5]),
        (6.0, [0, 0, 0.5, 1, 3, 6], [0, 0, 2, 0, 4, 0]),  # ReLU6: no gradient above the cap either
    ):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = guided_relu(x, max_value=cap)
        np.testing.assert_allclose(y.numpy(), want_y)
        np.testing.assert_allclose(tape.gradient(y, x, output_gradients=dy).numpy(), want_grad)


def test_guided_gradcam_is_pixel_sharp_and_differs_from_gradcam(object_run, tmp_path):
    from cvtool.bundle import load_classifier
    from cvtool.cam import CamModel
    from cvtool.guided_backprop import guided_clone
    from cvtool.images import list_images, load_image

    run, test_dir, boxes = object_run
    clf = load_classifier(run)
    items = list_images(test_dir)[::4]
    images = np.stack([load_image(item.path, (32, 32)) for item in items])
    # The guided copy computes what the model computes; only its ReLU gradients differ.
    clone = guided_clone(clf.model)
    np.testing.assert_allclose(clone.predict(images.astype(np.float32), verbose=0), clf.predict(images), atol=1e-5)
    guided = CamModel(clf, method="guided-gradcam").compute(images)
    plain = CamModel(clf, method="gradcam").compute(images)
    assert guided.maps.shape == (len(images), 1, 32, 32) and plain.maps.shape == (len(images), 1, 16, 16)
    np.testing.assert_array_equal(guided.classes, plain.classes)
    upsampled = np.repeat(np.repeat(plain.maps, 2, axis=2), 2, axis=3)
    assert np.abs(guided.maps - upsampled).mean() > 0.05
    # Guided backpropagation keeps the map on the object's pixels: little of its mass lies outside the box.
    inside = []
    for item, cam in zip(items, guided.maps[:, 0]):
        x0, y0, x1, y1 = (round(v * 32 / s) for v, s in zip(boxes[item.rel], (IMAGE_W, IMAGE_H) * 2))
        mask = np.zeros_like(cam, bool)
        mask[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
        inside.append(cam[mask].sum() / cam.sum())
    assert np.median(inside) > 0.5, inside


def test_guided_is_an_alias_of_positive_gradients(object_run, tmp_path):
    from cvtool.cam import METHODS
    from cvtool.gradcam import gradcam

    run, test_dir, _ = object_run
    assert "positive-gradients (alias guided;" in METHODS.described() and "guided" not in METHODS.names()
    for method in ("guided", "positive-gradients"):
        result = gradcam(run, test_dir, tmp_path / method, method=method, npy=True, quiet=True)
        assert result.exit_code == 0
    for npy in sorted((tmp_path / "guided").rglob("*.npy")):
        twin = tmp_path / "positive-gradients" / npy.relative_to(tmp_path / "guided")
        np.testing.assert_array_equal(np.load(npy), np.load(twin))
    assert (tmp_path / "guided" / "gradcam.csv").read_bytes() == (
        tmp_path / "positive-gradients" / "gradcam.csv"
    ).read_bytes()


def test_default_layer_is_found_inside_the_nested_backbone(object_run):
    from cvtool.bundle import load_classifier
    from cvtool.cam import CamModel

    run, _, _ = object_run
    clf = load_classifier(run)
    cams = CamModel(clf)
    assert cams.path == ["backbone", "conv3"]
    assert CamModel(clf, layer="conv2").path == ["backbone", "conv2"]
    assert CamModel(clf, layer="backbone/conv1").path == ["backbone", "conv1"]


def test_batched_maps_equal_one_image_at_a_time_with_own_classes(object_run):
    from cvtool.bundle import load_classifier
    from cvtool.cam import CamModel
    from cvtool.images import list_images, load_image

    run, test_dir, _ = object_run
    clf = load_classifier(run)
    cams = CamModel(clf, method="gradcam++")
    images = np.stack([load_image(item.path, (32, 32)) for item in list_images(test_dir)[::5]])
    classes = np.arange(len(images)) % 3  # each image its own target, not always its top-1
    batch = cams.compute(images, classes)
    assert batch.maps.shape == (len(images), 1, 16, 16)
    np.testing.assert_array_equal(batch.classes[:, 0], classes)
    np.testing.assert_allclose(batch.probs, clf.predict(images), atol=1e-5)
    for i in range(len(images)):
        one = cams.compute(images[i : i + 1], classes[i : i + 1])
        np.testing.assert_allclose(one.maps[0], batch.maps[i], atol=1e-4)
        np.testing.assert_allclose(one.scores[0], batch.scores[i], atol=1e-6)
    # Different target classes give different maps for the same image.
    other = cams.compute(images[:1], [(classes[0] + 1) % 3])
    assert not np.allclose(other.maps[0], batch.maps[0], atol=1e-3)
    # --top-k: ranks by probability, and each rank's map is that class's map.
    top = cams.compute(images, top_k=2)
    np.testing.assert_array_equal(top.classes, np.argsort(-batch.probs, axis=1, kind="stable")[:, :2])
    for rank in range(2):
        fixed = cams.compute(images, top.classes[:, rank])
        np.testing.assert_allclose(top.maps[:, rank], fixed.maps[:, 0], atol=1e-4)


def add_bad_files(folder: Path) -> None:
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.png").write_text("hello")


def test_cli_on_a_train_model_mirrors_paths_and_reports_bad_files(trained_run, colour_data, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(colour_data / "validation", src)
    add_bad_files(src / "red")
    out = tmp_path / "cams"
    res = runner.invoke(app, ["gradcam", str(trained_run), str(src), "--out", str(out), "--save-heatmap", "-q"])
    assert res.exit_code == 1, res.output
    rows = read_csv(out / "gradcam.csv")
    assert len(rows) == 36 and rows[0]["path"] == "blue/blue_00.png"
    assert {r["class"] for r in rows} <= {"blue", "green", "red"}
    for row in rows:
        assert row["output"] == row["path"].replace(".png", ".gradcam.jpg")
        with Image.open(out / row["output"]) as im:
            assert im.size == (40, 32) and im.format == "JPEG"
        with Image.open(out / row["path"].replace(".png", ".heatmap.png")) as hm:
            assert hm.size == (40, 32) and hm.mode == "L"
        assert 0.0 <= float(row["score"]) <= 1.0
    errors = read_csv(out / "errors.csv")
    assert {e["path"] for e in errors} == {"red/broken.jpg", "red/notes.png"}
    assert "broken.jpg" in res.output
    assert not list(out.rglob("*.part"))
    # Results are not replaced without --overwrite.
    again = runner.invoke(app, ["gradcam", str(trained_run), str(src), "--out", str(out), "-q"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_panel_top_k_png_and_fixed_class(trained_run, colour_data, tmp_path):
    src = colour_data / "validation" / "green"
    out = tmp_path / "panel"
    args = ["gradcam", str(trained_run), str(src), "--out", str(out), "--layout", "panel", "--top-k", "2"]
    res = runner.invoke(app, [*args, "--format", "png", "--colormap", "viridis", "-q"])
    assert res.exit_code == 0, res.output
    rows = read_csv(out / "gradcam.csv")
    assert len(rows) == 24
    assert [r["output"] for r in rows[:2]] == ["green_00.top1.gradcam.png", "green_00.top2.gradcam.png"]
    assert rows[0]["class"] != rows[1]["class"] and float(rows[0]["score"]) >= float(rows[1]["score"])
    with Image.open(out / rows[0]["output"]) as im:
        assert im.size == (3 * 40, 32) and im.format == "PNG"
        panel = np.asarray(im)
    with Image.open(src / "green_00.png") as original:
        np.testing.assert_array_equal(panel[:, :40], np.asarray(original))  # left pane: the input as it is
    fixed = tmp_path / "fixed"
    res = runner.invoke(app, ["gradcam", str(trained_run), str(src), "--out", str(fixed), "--class", "red", "-q"])
    assert res.exit_code == 0, res.output
    assert {r["class"] for r in read_csv(fixed / "gradcam.csv")} == {"red"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--colormap", "rainbowz"], "--colormap"),
        (["--layer", "nope"], "no layer named"),
        (["--layer", "fc"], "not 4-D"),
        (["--class", "purple"], "--class"),
        (["--method", "cam"], "--method"),
        (["--alpha", "1.5"], "--alpha"),
        (["--layout", "grid"], "--layout"),
    ],
)
def test_bad_options_exit_2(trained_run, colour_data, tmp_path, extra, message):
    res = runner.invoke(
        app, ["gradcam", str(trained_run), str(colour_data / "validation"), "--out", str(tmp_path), *extra]
    )
    assert res.exit_code == 2 and message in res.output, res.output


def test_mobilenet_backbone_classifier_run(colour_data, tmp_path):
    from cvtool.architectures import backbone_classifier
    from cvtool.backbones import get_backbone
    from cvtool.bundle import load_classifier, save_model, write_meta
    from cvtool.cam import CamModel
    from cvtool.gradcam import gradcam

    run = tmp_path / "mnv2"
    model = backbone_classifier(get_backbone("mobilenet_v2"), 3, (64, 64), weights=None)
    save_model(model, run / "model.keras")
    write_meta(run, {"class_names": ["blue", "green", "red"], "image_size": [64, 64]})
    clf = load_classifier(run)
    assert CamModel(clf).path == ["backbone", "out_relu"]
    out = tmp_path / "cams"
    result = gradcam(clf, colour_data / "validation" / "red", out, layer="block_13_expand_relu", quiet=True)
    assert result.exit_code == 0 and result.processed == 12
    with Image.open(out / "red_00.gradcam.jpg") as im:
        assert im.size == (40, 32)
    # Guided Grad-CAM through a nested backbone of ReLU6 layers: the guided copy is checked against the model.
    maps = CamModel(clf, method="guided-gradcam").compute(np.full((1, 64, 64, 3), 128, np.uint8)).maps
    assert maps.shape == (1, 1, 64, 64) and np.isfinite(maps).all()


def test_plain_sequential_keras_file(colour_data, tmp_path):
    import keras
    from keras import layers

    from cvtool.layers import Preprocess

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            Preprocess("rescale"),
            layers.Conv2D(8, 3, activation="relu", name="conv_a"),
            layers.Conv2D(8, 3, activation="relu", name="conv_b"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2, activation="softmax"),
        ]
    )
    path = tmp_path / "plain.keras"
    model.save(path)
    out = tmp_path / "cams"
    res = runner.invoke(app, ["gradcam", str(path), str(colour_data / "validation" / "blue"), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = read_csv(out / "gradcam.csv")
    assert len(rows) == 12 and {r["class"] for r in rows} <= {"0", "1"}
    with Image.open(out / rows[0]["output"]) as im:
        assert im.size == (40, 32)


def test_empty_maps_are_counted_in_one_warning(colour_data, tmp_path):
    """Class 0's weights are negative on every channel of a ReLU layer: its Grad-CAM is zero everywhere (the
    paper's ReLU), and the run says how many maps are empty; class 1's maps are not."""
    import keras
    from keras import layers

    from cvtool.layers import Preprocess

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            Preprocess("rescale"),
            layers.Conv2D(8, 3, activation="relu", name="conv_a", bias_initializer="ones"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2, activation="softmax", name="head"),
        ]
    )
    model.get_layer("head").set_weights([np.stack([-np.ones(8), np.ones(8)], axis=1), np.zeros(2)])
    path = tmp_path / "signs.keras"
    model.save(path)
    photos = colour_data / "validation" / "blue"
    for cls, expected in (("0", "12 of 12 maps are empty"), ("1", None)):
        out = tmp_path / f"cams-{cls}"
        res = runner.invoke(app, ["gradcam", str(path), str(photos), "--out", str(out), "--class", cls, "--npy"])
        assert res.exit_code == 0, res.output
        maps = [np.load(f) for f in sorted(out.glob("*.npy"))]
        assert len(maps) == 12
        if expected:
            assert expected in res.output and "layer conv_a" in res.output
            assert all(m.max() == 0 for m in maps)
        else:
            assert "maps are empty" not in res.output and all(m.max() > 0 for m in maps)


def test_default_method_keeps_maps_that_plain_gradcam_leaves_empty(colour_data, tmp_path):
    """A Flatten head that weighs most positions against class 0 and one position for it (as a Dense layer
    after max pooling can): Grad-CAM's mean gradient is negative, so its map is empty; the default,
    Grad-CAM++, weighs the positive gradient and keeps a map."""
    import keras
    from keras import layers

    from cvtool.layers import Preprocess

    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            Preprocess("rescale"),
            layers.Conv2D(1, 1, activation="relu", name="conv_a", kernel_initializer="zeros", bias_initializer="ones"),
            layers.Flatten(),
            layers.Dense(2, activation="softmax", name="head"),
        ]
    )
    against = -np.ones(64)
    against[27] = 1.0
    model.get_layer("head").set_weights([np.stack([against, -against], axis=1), np.zeros(2)])
    path = tmp_path / "flatten.keras"
    model.save(path)
    photos = colour_data / "validation" / "blue"
    for extra, method, empty in (([], "gradcam++", False), (["--method", "gradcam"], "gradcam", True)):
        out = tmp_path / f"cams-{method}"
        args = ["gradcam", str(path), str(photos), "--out", str(out), "--class", "0", "--npy", *extra]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert f"method {method}" in res.output
        maps = [np.load(f) for f in sorted(out.glob("*.npy"))]
        assert len(maps) == 12
        if empty:
            assert "12 of 12 maps are empty: gradcam found" in res.output and "(gradcam++)" in res.output
            assert all(m.max() == 0 for m in maps)
        else:
            assert "maps are empty" not in res.output and all(m.max() > 0 for m in maps)


def test_output_folder_inside_input_is_not_read_back(trained_run, colour_data, tmp_path):
    from cvtool.gradcam import gradcam

    src = tmp_path / "in"
    shutil.copytree(colour_data / "validation" / "blue", src)
    out = src / "cams"
    first = gradcam(trained_run, src, out, quiet=True, fmt="png")
    second = gradcam(trained_run, src, out, quiet=True, fmt="png", overwrite=True)
    assert first.processed == second.processed == 12


def test_an_output_that_cannot_be_written_fails_that_input_only(trained_run, colour_data, tmp_path):
    from cvtool.gradcam import gradcam

    out = tmp_path / "cams"
    out.mkdir()
    (out / "blue").write_text("a file where the blue/ output folder should go")
    result = gradcam(trained_run, colour_data / "validation", out, quiet=True)
    assert result.exit_code == 1 and result.failed == 12 and result.processed == 24
    errors = read_csv(out / "errors.csv")
    assert len(errors) == 12 and all(e["error"].startswith("cannot write output") for e in errors)
    assert len(read_csv(out / "gradcam.csv")) == 24


def test_gradcam_help_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        "sys.argv = ['cvtool', 'gradcam', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_NOT_LOADED" in out.stdout and "--colormap" in out.stdout


def test_output_names_keep_full_name_only_on_collision():
    from cvtool.gradcam import output_bases
    from cvtool.images import InputItem

    items = [InputItem(Path(p), p) for p in ("a.jpg", "a.png", "sub/b.JPG", "sub/c.d.png")]
    assert output_bases(items) == {"a.jpg": "a.jpg", "a.png": "a.png", "sub/b.JPG": "sub/b", "sub/c.d.png": "sub/c.d"}


def large_photos(folder: Path) -> Path:
    """Camera-size JPEGs (where libjpeg's DCT-scaled decoding kicks in): upscaled sample photos.

    1600x1200 ones decode at 1/8 scale for any small model; the 400x300 ones at 1/4 for a 48 px model
    but 1/8 for a 24 px one.
    """
    from tests.conftest import SAMPLES

    folder.mkdir()
    sizes = [(1600, 1200), (1200, 1600), (400, 300), (300, 400)]
    for i, (src, size) in enumerate(zip(sorted(SAMPLES.rglob("*.jpg"))[::25], sizes)):
        with Image.open(src) as im:
            im.convert("RGB").resize(size, Image.BICUBIC).save(folder / f"photo{i}.jpg", quality=90)
    return folder


def test_gradcam_scores_equal_predict_scores_on_full_size_jpegs(trained_run, tmp_path):
    from cvtool.gradcam import gradcam
    from cvtool.predict import predict

    photos = large_photos(tmp_path / "photos")
    predict(trained_run, photos, tmp_path / "preds.csv", top_k=1, quiet=True)
    result = gradcam(trained_run, photos, tmp_path / "cams", quiet=True)
    assert result.exit_code == 0 and result.processed == 4
    predicted = {r["path"]: (r["label"], float(r["score"])) for r in read_csv(tmp_path / "preds.csv")}
    explained = {r["path"]: (r["class"], float(r["score"])) for r in read_csv(tmp_path / "cams" / "gradcam.csv")}
    assert predicted.keys() == explained.keys() and len(predicted) == 4
    for path, (label, score) in predicted.items():
        assert explained[path][0] == label
        assert abs(explained[path][1] - score) <= 1e-4, (path, score, explained[path][1])
    with Image.open(tmp_path / "cams" / "photo1.gradcam.jpg") as im:
        assert im.size == (1200, 1600)  # the overlay keeps the full size


def test_default_layer_of_a_small_cnn_is_its_last_conv_block_before_pooling(trained_run):
    from cvtool.bundle import load_classifier
    from cvtool.cam import CamModel

    clf = load_classifier(trained_run)
    cams = CamModel(clf)
    assert cams.path == ["block3_relu2"]  # Conv-BN-ReLU: the block's output, not block3_pool or block3_dropout
    pooled = clf.model.get_layer("block3_dropout").output.shape[1]
    maps = cams.compute(np.zeros((1, 32, 32, 3), np.uint8)).maps
    assert maps.shape[2:] == (2 * pooled, 2 * pooled) == (8, 8)


def test_default_layer_skips_pooling_and_dropout_and_keeps_residual_outputs():
    import keras
    from keras import layers

    from cvtool.cam import find_target_layer

    sequential = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3, padding="same", name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.ReLU(name="relu"),
            layers.MaxPooling2D(name="pool"),
            layers.SpatialDropout2D(0.2, name="drop"),
            layers.Flatten(),
            layers.Dense(2, activation="softmax"),
        ]
    )
    assert find_target_layer(sequential) == ["relu"]
    inputs = keras.Input((16, 16, 3))
    shortcut = layers.Conv2D(4, 1, name="shortcut")(inputs)
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Add(name="add")([shortcut, x])
    x = layers.Activation("relu", name="block_out")(x)
    x = layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)  # 4-D, but pooled to 1x1
    x = layers.Conv2D(2, 1, name="head_conv")(x)  # a 1x1 convolution on the pooled map: no spatial map left
    outputs = layers.Activation("softmax")(layers.Flatten()(x))
    residual = keras.Model(inputs, outputs)
    assert find_target_layer(residual) == ["block_out"]
