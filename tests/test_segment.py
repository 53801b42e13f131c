"""`cvtool segment` on small real SavedModels and a Keras model whose masks are known exactly."""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cvtool.runtime  # noqa: F401 - quiet TensorFlow import
from cvtool.classmap import DEFAULT_MODEL, camvid, read_class_file
from cvtool.cli import app
from cvtool.segment import SegmentConfig, segment
from cvtool.segmodels import load_segmentation_model

runner = CliRunner()
SIZES = {"a.png": (32, 40), "b.jpg": (32, 40), "nested/deeper/c.png": (24, 36), "nested/d.png": (32, 40)}
BG_THRESHOLD = 0.3  # background score of the test models: wins where every channel is below it


def noise_image(size, seed) -> np.ndarray:
    h, w = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def expected_ids(rgb: np.ndarray, lut=(0, 1, 2), keep_background=False) -> np.ndarray:
    """What every test model predicts: the dominant colour channel, or background where all are dark."""
    ids = np.asarray(lut, dtype=np.uint8)[np.argmax(rgb, axis=-1)]
    if keep_background:
        ids[(rgb.astype(np.float32) * np.float32(1 / 255.0)).max(axis=-1) < np.float32(BG_THRESHOLD)] = 255
    return ids


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Noise images of two sizes in nested folders (PNG lossless; the JPEG is compared as decoded)."""
    root = tmp_path_factory.mktemp("photos")
    for n, (rel, size) in enumerate(SIZES.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(size, n)).save(root / rel)
    return root


def decoded(photos: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(photos / rel).convert("RGB"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """SavedModels called through predict / __call__ / serving_default, one with nothing callable, a .keras file."""
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("segmodels")
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)

    def scores(x, extra):  # [background 0.3, R, G, B, zeros...]
        background = tf.fill(tf.shape(x[..., :1]), BG_THRESHOLD)
        return tf.concat([background, x] + [tf.zeros_like(background)] * extra, axis=-1)

    # Like real models (HRNet), each holds a tf.Variable: a loader that drops the loaded object while
    # keeping one of its functions fails on it once the object is garbage collected.
    class HubLike(tf.Module):  # like HRNet: a predict method, [B,H,W,33] probabilities
        def __init__(self):
            super().__init__()
            self.sharpness = tf.Variable(50.0)

        @tf.function(input_signature=[spec])
        def predict(self, x):
            return tf.nn.softmax(scores(x, 29) * self.sharpness)

    class Callable(tf.Module):  # a plain callable: 4 logits (background + 3 classes)
        def __init__(self):
            super().__init__()
            self.scale = tf.Variable(1.0)

        @tf.function(input_signature=[spec])
        def __call__(self, x):
            return scores(x, 0) * self.scale

    class Signature(tf.Module):  # serving_default only: a map of class ids
        def __init__(self):
            super().__init__()
            self.gain = tf.Variable([1.0, 1.0, 1.0])

        @tf.function(input_signature=[spec])
        def ids(self, x):
            return {"class_ids": tf.argmax(x * self.gain, axis=-1, output_type=tf.int32)}

    class Nothing(tf.Module):
        def __init__(self):
            super().__init__()
            self.unused = tf.Variable(0.0)

    paths = {name: root / name for name in ("predict", "call", "signature", "nothing")}
    tf.saved_model.save(HubLike(), str(paths["predict"]))
    tf.saved_model.save(Callable(), str(paths["call"]))
    signature = Signature()
    tf.saved_model.save(signature, str(paths["signature"]), signatures={"serving_default": signature.ids})
    tf.saved_model.save(Nothing(), str(paths["nothing"]))

    inputs = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="identity")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3)])
    paths["keras"] = root / "seg.keras"
    model.save(paths["keras"])
    fixed = keras.Input((16, 16, 3))  # a fixed-size model: images are resized to 16x16 without --input-size
    paths["keras16"] = root / "seg16.keras"
    keras.Model(fixed, conv(fixed)).save(paths["keras16"])
    pooled = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs))
    paths["classifier"] = root / "classifier.keras"  # [B, classes]: not a segmentation model
    keras.Model(inputs, pooled).save(paths["classifier"])
    return paths


def test_hub_load_path_finds_predict_call_and_signature(models):
    assert load_segmentation_model(models["predict"]).how == "predict"
    assert load_segmentation_model(models["call"]).how == "__call__"
    assert load_segmentation_model(models["signature"]).how == "serving_default"
    assert load_segmentation_model(models["keras"]).how == "keras"
    assert load_segmentation_model(models["keras16"]).input_size == (16, 16)


@pytest.mark.parametrize("name", ["predict", "call", "signature", "keras"])
def test_loaded_model_with_variables_runs_after_garbage_collection(models, name):
    # The loaded object owns the variables its functions use: it must live as long as the model does.
    model = load_segmentation_model(models[name])
    gc.collect()
    batch = noise_image((8, 8), 0)[None].astype(np.float32) / 255.0
    out = model.run(batch)[0]
    if name == "signature":
        ids = out
    elif name == "keras":
        ids = np.argmax(out, axis=-1)
    else:  # channel 0 is the background score
        ids = np.argmax(out[..., 1:4], axis=-1)
    np.testing.assert_array_equal(ids, np.argmax(batch[0], axis=-1))


def test_masks_equal_expected_ids_at_input_size_and_mirror_paths(models, photos, tmp_path):
    out = tmp_path / "seg"
    result = segment(photos, out, config=SegmentConfig(model=str(models["predict"]), batch_size=2), quiet=True)
    assert (result.processed, result.failed, result.exit_code) == (4, 0, 0)
    for rel in SIZES:
        stem = out / rel.rsplit(".", 1)[0]
        mask = Image.open(f"{stem}.mask.png")
        assert mask.mode == "P" and mask.size == Image.open(photos / rel).size
        np.testing.assert_array_equal(np.asarray(mask), expected_ids(decoded(photos, rel)))
        assert Path(f"{stem}.color.png").exists() and Path(f"{stem}.overlay.jpg").exists()
    assert (out / "legend.png").exists()
    assert read_csv(out / "errors.csv") == []


def test_mask_png_round_trips_ids_and_palette(models, photos, tmp_path):
    out = tmp_path / "seg"
    segment(photos / "a.png", out, config=SegmentConfig(model=str(models["predict"]), overlay_format="png"), quiet=True)
    mask = Image.open(out / "a.mask.png")
    ids = np.asarray(mask)
    table = camvid()
    palette = np.asarray(mask.getpalette()[: 3 * 32]).reshape(32, 3)
    np.testing.assert_array_equal(palette, np.asarray(table.colors))
    colour = np.asarray(Image.open(out / "a.color.png"))
    np.testing.assert_array_equal(colour, np.asarray(table.colors, dtype=np.uint8)[ids])
    # Overlay in RGB order: image + 0.6 * class colour, saturated.
    image = decoded(photos, "a.png").astype(np.float32)
    expected = np.clip(np.rint(image + 0.6 * colour), 0, 255)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.overlay.png")), expected.astype(np.uint8))


def test_keep_background_marks_dark_pixels_255(models, photos, tmp_path):
    out = tmp_path / "seg"
    args = ["segment", str(photos), "--out", str(out), "--model", str(models["predict"]), "--keep-background", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    for rel in SIZES:
        mask = np.asarray(Image.open(out / f"{rel.rsplit('.', 1)[0]}.mask.png"))
        want = expected_ids(decoded(photos, rel), keep_background=True)
        assert (want == 255).any()
        np.testing.assert_array_equal(mask, want)
    rows = read_csv(out / "pixels.csv")
    assert "background" in {r["class"] for r in rows}


def test_pixels_csv_counts_every_pixel_with_class_names(models, photos, tmp_path):
    out = tmp_path / "seg"
    segment(photos, out, config=SegmentConfig(model=str(models["predict"])), quiet=True)
    rows = read_csv(out / "pixels.csv")
    assert list(rows[0]) == ["path", "class", "pixels", "fraction"]
    assert sorted({r["path"] for r in rows}) == sorted(SIZES)
    names = camvid().names
    for rel, (h, w) in SIZES.items():
        mine = [r for r in rows if r["path"] == rel]
        assert sum(int(r["pixels"]) for r in mine) == h * w
        assert abs(sum(float(r["fraction"]) for r in mine) - 1) < 1e-5
        counts = np.bincount(expected_ids(decoded(photos, rel)).ravel(), minlength=3)
        assert {r["class"]: int(r["pixels"]) for r in mine} == {names[i]: int(c) for i, c in enumerate(counts) if c}


def test_class_file_csv_with_background_channel(models, photos, tmp_path):
    classes = tmp_path / "rgb.csv"
    classes.write_text("id,name,r,g,b\n7,red,255,0,0\n8,green,0,255,0\n9,blue,0,0,255\n")
    out = tmp_path / "seg"
    segment(photos / "nested", out, config=SegmentConfig(model=str(models["call"]), classes=classes), quiet=True)
    mask = np.asarray(Image.open(out / "deeper" / "c.mask.png"))
    np.testing.assert_array_equal(mask, expected_ids(decoded(photos, "nested/deeper/c.png"), lut=(7, 8, 9)))
    assert {r["class"] for r in read_csv(out / "pixels.csv")} <= {"red", "green", "blue"}
    kept = tmp_path / "kept"
    cfg = SegmentConfig(model=str(models["call"]), classes=classes, drop_background=False)
    segment(photos / "nested", kept, config=cfg, quiet=True)
    want = expected_ids(decoded(photos, "nested/deeper/c.png"), lut=(7, 8, 9), keep_background=True)
    np.testing.assert_array_equal(np.asarray(Image.open(kept / "deeper" / "c.mask.png")), want)


def test_keras_model_with_json_class_file(models, photos, tmp_path):
    classes = tmp_path / "rgb.json"
    entries = [{"id": 3, "name": "red", "color": "#ff0000"}, {"id": 1, "name": "green", "color": [0, 255, 0]}]
    classes.write_text(json.dumps(entries + [{"id": 5, "name": "blue", "color": [0, 0, 255]}]))
    out = tmp_path / "seg"
    cfg = SegmentConfig(model=str(models["keras"]), classes=classes, input_range="0-255")
    result = segment(photos / "a.png", out, config=cfg, quiet=True)
    assert result.exit_code == 0
    # Channels follow ascending ids: channel 0 -> id 1 (green), 1 -> id 3 (red), 2 -> id 5 (blue).
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "a.mask.png")), expected_ids(decoded(photos, "a.png"), (1, 3, 5))
    )
    mask = Image.open(out / "a.mask.png")
    assert mask.getpalette()[3:6] == [0, 255, 0] and mask.getpalette()[9:12] == [255, 0, 0]


def test_serving_default_id_map_gets_numbered_classes(models, photos, tmp_path):
    out = tmp_path / "seg"
    segment(photos / "nested" / "d.png", out, config=SegmentConfig(model=str(models["signature"])), quiet=True)
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "d.mask.png")), expected_ids(decoded(photos, "nested/d.png"))
    )
    assert {r["class"] for r in read_csv(out / "pixels.csv")} <= {"0", "1", "2"}


def halves_image(size) -> Image.Image:
    h, w = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2, 0] = 200
    arr[:, w // 2 :, 2] = 200
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "option", [{"input_size": (16, 16)}, {"max_side": 16}, {"model": "keras16", "classes": "rgb.csv"}]
)
def test_resized_model_input_gives_mask_at_original_size(models, tmp_path, option):
    halves_image((48, 64)).save(tmp_path / "wide.png")
    (tmp_path / "rgb.csv").write_text("id,name,r,g,b\n0,red,255,0,0\n1,green,0,255,0\n2,blue,0,0,255\n")
    option = {**option, "model": str(models[option.get("model", "predict")])}
    if "classes" in option:
        option["classes"] = tmp_path / option["classes"]
    out = tmp_path / "seg"
    segment(tmp_path / "wide.png", out, config=SegmentConfig(**option), quiet=True)
    mask = np.asarray(Image.open(out / "wide.mask.png"))
    assert mask.shape == (48, 64)
    assert (mask[:, :32] == 0).all() and (mask[:, 32:] == 2).all()


def test_bad_files_are_reported_and_the_rest_segmented(models, photos, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "nested" / "notes.png").write_text("not a PNG")
    out = tmp_path / "seg"
    args = ["segment", str(folder), "--out", str(out), "--model", str(models["predict"])]
    result = runner.invoke(app, [*args, "--batch-size", "1"])  # the last batch: nested/notes.png, failures only
    assert result.exit_code == 1, result.output
    errors = read_csv(out / "errors.csv")
    assert sorted(e["path"] for e in errors) == ["empty.jpg", "nested/notes.png"]
    assert (out / "nested" / "d.mask.png").exists() and not (out / "empty.mask.png").exists()
    assert "Traceback" not in result.output


def test_existing_results_need_overwrite(models, photos, tmp_path):
    out = tmp_path / "seg"
    args = ["segment", str(photos / "a.png"), "--out", str(out), "--model", str(models["predict"]), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "a.mask.png").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "a.mask.png").read_bytes() == before
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_output_folder_inside_input_is_not_segmented_again(models, photos, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    args = ["segment", str(folder), "--out", str(folder / "seg"), "--model", str(models["predict"]), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert not list((folder / "seg").rglob("*.mask.mask.png"))


def test_unusable_models_exit_3_with_one_line(models, photos, tmp_path):
    def run(model: str):
        return runner.invoke(app, ["segment", str(photos / "a.png"), "--out", str(tmp_path / "o"), "--model", model])

    nothing = run(str(models["nothing"]))
    assert nothing.exit_code == 3 and "no predict method" in nothing.output
    (tmp_path / "empty").mkdir()
    assert run(str(tmp_path / "empty")).exit_code == 3
    classifier = run(str(models["classifier"]))
    assert classifier.exit_code == 3 and "expected [batch, height, width, classes]" in classifier.output
    offline = run("https://nonexistent.invalid/segmenter/1")
    assert offline.exit_code == 3 and "--model" in offline.output and "TFHUB_CACHE_DIR" in offline.output
    assert len(offline.output.strip().splitlines()) == 1
    assert run(str(tmp_path / "missing")).exit_code == 2


def test_class_count_mismatch_is_exit_3(models, photos, tmp_path):
    classes = tmp_path / "two.csv"
    classes.write_text("id,name,r,g,b\n0,a,1,2,3\n1,b,4,5,6\n")
    args = ["segment", str(photos / "a.png"), "--out", str(tmp_path / "o"), "--model", str(models["predict"])]
    result = runner.invoke(app, [*args, "--classes", str(classes)])
    assert result.exit_code == 3 and "outputs 33 classes" in result.output


def test_bad_class_files_are_usage_errors(tmp_path):
    from cvtool.errors import UsageError

    bad = {
        "a.json": '[{"id": 0, "name": "x"}]',
        "b.json": "{not json",
        "c.csv": "id,name,r,g,b\n0,x,1,2,300\n",
        "d.csv": "id,label\n0,x\n",
        "e.csv": "id,name,r,g,b\n0,x,1,2,3\n0,y,1,2,3\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError):
            read_class_file(tmp_path / name)


def test_default_handle_loads_from_tfhub_cache_dir(models, photos, tmp_path, monkeypatch):
    # An offline machine with the model in its hub cache: <TFHUB_CACHE_DIR>/<sha1 of the handle>/.
    cache = tmp_path / "hub"
    shutil.copytree(models["predict"], cache / hashlib.sha1(DEFAULT_MODEL.encode()).hexdigest())
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    out = tmp_path / "seg"
    result = runner.invoke(app, ["segment", str(photos / "a.png"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.mask.png")), expected_ids(decoded(photos, "a.png")))


def test_batches_hold_one_image_size_and_keep_input_order(tmp_path):
    from cvtool.batches import batched
    from cvtool.images import InputItem

    shapes = [(2, 2), (2, 2), (3, 3), (2, 2), (2, 2), (2, 2)]
    items = [InputItem(tmp_path / f"{i}.png", f"{i}.png") for i in range(len(shapes))]
    batches = list(batched(items, lambda item: np.zeros(shapes[int(item.rel[0])]), 2, key=lambda a: a.shape))
    assert [[item.rel[0] for item in b.items] for b in batches] == [["0", "1"], ["2"], ["3", "4"], ["5"]]


def test_output_names_keep_the_extension_only_when_stems_collide():
    from cvtool.images import InputItem
    from cvtool.segment import output_names

    rels = ["a.jpg", "a.png", "sub/a.jpg", "sub/b.tif"]
    names = output_names([InputItem(Path(r), r) for r in rels])
    assert names == {"a.jpg": "a.jpg", "a.png": "a.png", "sub/a.jpg": "sub/a", "sub/b.tif": "sub/b"}


def test_segment_help_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        "sys.argv = ['cvtool', 'segment', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_NOT_LOADED" in out.stdout and "--alpha" in out.stdout
