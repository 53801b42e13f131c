"""imagenet:NAME models, offline: full keras.applications networks built with weights=None,
their weights saved to a local file by the test, then used through `imagenet:NAME --weights FILE`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app
from tests.conftest import colour_image

runner = CliRunner()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def saved_application(constructor: str, module: str, path: Path, seed: int):
    """A full application (1000-class top) with weights=None, saved to ``path``.

    Freshly initialised, such a deep network's features shrink to ~1e-11 and
    every image gets the same scores; so its BatchNorm statistics are set from
    one batch of random images (as precise BN does), which makes the scores
    depend clearly on the image, and a wrong preprocessing visible.
    """
    import keras

    keras.utils.set_random_seed(seed)  # the same initial weights in every run and test order (no flaky scores)
    net = getattr(keras.applications, constructor)(weights=None)
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, (8, 224, 224, 3)).astype("float32")
    batch[:4] = batch[:4] * 0.2 + rng.integers(0, 200, (4, 1, 1, 3))  # some flat-coloured images too
    bns = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    net(getattr(keras.applications, module).preprocess_input(batch), training=True)
    net.save_weights(path)
    return net


@pytest.fixture(scope="session")
def mobilenet_v2(tmp_path_factory):
    """(plain keras MobileNetV2, its saved weights file), built once per session."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.weights.h5"
    return saved_application("MobileNetV2", "mobilenet_v2", path, seed=0), path


@pytest.fixture(scope="session")
def imagenet_classifier(mobilenet_v2):
    from cvtool.bundle import load_classifier

    return load_classifier("imagenet:mobilenet_v2", weights=mobilenet_v2[1])


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Five images of different sizes and modes (the loader resizes them to 224x224)."""
    folder = tmp_path_factory.mktemp("photos")
    sizes = [(40, 32), (300, 200), (224, 224), (64, 96), (120, 80)]
    for i, (size, rgb) in enumerate(zip(sizes, [(200, 40, 40), (40, 180, 60), (40, 60, 200), (220, 220, 30)] * 2)):
        colour_image(rgb, size=size, seed=i).save(folder / f"img{i}.png")
    Image.fromarray(np.full((50, 70), 128, np.uint8), "L").save(folder / "grey.jpg")
    return folder


def reference_probs(net, module: str, folder: Path) -> dict[str, np.ndarray]:
    """What the plain Keras model gives with its own preprocess_input, on cvtool's resized pixels."""
    import keras

    from cvtool.images import list_images, load_image

    preprocess = getattr(keras.applications, module).preprocess_input
    items = list_images(folder)
    pixels = np.stack([load_image(item.path, (224, 224)) for item in items]).astype("float32")
    probs = np.asarray(net(preprocess(pixels.copy()), training=False))
    return {item.rel: p for item, p in zip(items, probs)}


def test_class_index_ships_in_the_package_with_1000_wordnet_classes():
    from importlib import resources

    from cvtool import imagenet

    assert resources.files("cvtool").joinpath("resources", "imagenet_class_index.json").is_file()
    index = imagenet.class_index()
    assert len(index) == 1000
    assert index[0] == ("n01440764", "tench")
    assert index[207] == ("n02099601", "golden_retriever")
    assert index[999] == ("n15075141", "toilet_tissue")
    ids = imagenet.wnids()
    assert ids == sorted(ids) and len(set(ids)) == 1000  # ImageNet's class order is WordNet-id order
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in ids)


def test_every_imagenet_name_preprocesses_like_its_keras_function():
    import keras

    from cvtool import imagenet
    from cvtool.backbones import BACKBONES
    from cvtool.layers import Preprocess

    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype("float32")
    for name in ("vgg16", "resnet50", "inception_v3", "xception", "mobilenet_v2", "mobilenet_v3_large"):
        assert name in imagenet.NAMES
    for name in ("efficientnet_b0", "convnext_tiny"):
        assert name in imagenet.NAMES
    for name in imagenet.NAMES:
        expected = getattr(keras.applications, imagenet.KERAS_MODULES[name]).preprocess_input(pixels.copy())
        got = np.asarray(Preprocess(BACKBONES[name].preprocess)(pixels))
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=name)
    assert {n: BACKBONES[n].size for n in ("inception_v3", "xception", "resnet50")} == {
        "inception_v3": 299,
        "xception": 299,
        "resnet50": 224,
    }


def test_imagenet_model_is_the_full_flat_application(imagenet_classifier):
    clf = imagenet_classifier
    assert clf.image_size == (224, 224)
    assert clf.num_classes == 1000 and clf.class_names[207] == "golden_retriever"
    assert clf.meta["wnids"][207] == "n02099601"
    model = clf.model
    assert model.inputs[0].name == "image"
    assert model.get_layer("preprocess").mode == "tf"
    # One flat graph: the last convolution is a top-level layer (what Grad-CAM hooks into).
    assert model.get_layer("Conv_1").output.shape[1:3] == (7, 7)


def test_predict_cli_matches_keras_with_its_preprocess_input(mobilenet_v2, photos, tmp_path):
    net, weights = mobilenet_v2
    out = tmp_path / "preds.csv"
    args = ["predict", "imagenet:mobilenet_v2", str(photos), "--out", str(out), "--weights", str(weights)]
    result = runner.invoke(app, [*args, "--top-k", "5", "-q"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    expected = reference_probs(net, "mobilenet_v2", photos)
    assert [r["path"] for r in rows] == sorted(expected)
    from cvtool.imagenet import class_names

    names = class_names()
    for row in rows:
        p = expected[row["path"]]
        top = np.argsort(-p, kind="stable")[:5]
        assert [row["label"], *(row[f"label_{i}"] for i in range(2, 6))] == [names[i] for i in top]
        assert float(row["score"]) == pytest.approx(float(p[top[0]]), abs=2e-6)
    # The scores really depend on the image, so a wrong preprocessing could not pass unnoticed.
    assert len({r["label"] for r in rows}) > 1


def test_gradcam_on_imagenet_mobilenet_v2_hooks_the_last_4d_layer(mobilenet_v2, photos, tmp_path, monkeypatch):
    _, weights = mobilenet_v2
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("img1.png", "grey.jpg"):
        shutil.copy(photos / name, folder / name)
    out = tmp_path / "cam"
    monkeypatch.setenv("CVTOOL_IMAGENET_WEIGHTS", str(tmp_path / "nowhere.h5"))  # --weights wins over it
    result = runner.invoke(
        app, ["gradcam", "imagenet:mobilenet_v2", str(folder), "--out", str(out), "--weights", str(weights)]
    )
    assert result.exit_code == 0, result.output
    assert "target layer out_relu" in result.output  # the last layer with a 4-D output, before pooling
    rows = read_csv(out / "gradcam.csv")
    assert [r["path"] for r in rows] == ["grey.jpg", "img1.png"]
    from cvtool.imagenet import class_index

    imagenet_names = {name for _, name in class_index()}
    assert all(r["class"] in imagenet_names for r in rows)
    for r in rows:  # overlays at each input's own size
        assert Image.open(out / r["output"]).size == Image.open(folder / r["path"]).size


def test_mobilenet_v3_normalises_inside_and_matches_keras(tmp_path, photos):
    from cvtool.bundle import load_classifier
    from cvtool.images import list_images, load_image

    path = tmp_path / "mnv3.weights.h5"
    net = saved_application("MobileNetV3Small", "mobilenet_v3", path, seed=1)
    clf = load_classifier("imagenet:mobilenet_v3_small", weights=path)
    assert clf.model.get_layer("preprocess").mode == "none"
    expected = reference_probs(net, "mobilenet_v3", photos)
    pixels = np.stack([load_image(item.path, clf.image_size) for item in list_images(photos)])
    np.testing.assert_allclose(clf.predict(pixels), np.stack(list(expected.values())), atol=1e-5)


def test_label_format_wnid_and_both(imagenet_classifier, photos, tmp_path):
    from cvtool.predict import predict

    predict(imagenet_classifier, photos, tmp_path / "names.csv", top_k=2, quiet=True)
    predict(imagenet_classifier, photos, tmp_path / "wnid.csv", top_k=2, quiet=True, label_format="wnid")
    predict(imagenet_classifier, photos, tmp_path / "both.csv", top_k=2, quiet=True, label_format="both")
    names, wnids, both = (read_csv(tmp_path / f"{n}.csv") for n in ("names", "wnid", "both"))
    index = dict((name, wnid) for wnid, name in imagenet_classifier_index())
    for n, w, b in zip(names, wnids, both):
        assert w["label"].startswith("n") and w["label"] == index[n["label"]]
        assert b["label"] == f"{w['label']} {n['label']}" and b["score_2"] == n["score_2"]


def test_shards_made_with_another_weights_file_or_label_format_refuse_to_merge(mobilenet_v2, photos, tmp_path):
    net, weights = mobilenet_v2
    head = net.layers[-1]
    kernel, bias = head.get_weights()
    other = tmp_path / "other.weights.h5"  # the same network with another head: another model
    head.set_weights([kernel, bias + 1.0])
    try:
        net.save_weights(other)
    finally:
        head.set_weights([kernel, bias])

    def shard(name: str, k: int, *options: str) -> str:
        out = tmp_path / f"{name}.csv"
        args = ["predict", "imagenet:mobilenet_v2", str(photos), "--out", str(out), "--shard", f"{k}/2", "-q"]
        result = runner.invoke(app, [*args, *options])
        assert result.exit_code == 0, result.output
        return str(out)

    first = shard("a", 0, "--weights", str(weights))
    for second, differs in (
        (shard("b", 1, "--weights", str(other)), "different model"),
        (shard("c", 1, "--weights", str(weights), "--label-format", "wnid"), "different label_format (name, now wnid)"),
    ):
        result = runner.invoke(app, ["merge", str(tmp_path / "m.csv"), first, second])
        assert result.exit_code == 3 and differs in result.output, result.output
    same = runner.invoke(app, ["merge", str(tmp_path / "m.csv"), first, shard("d", 1, "--weights", str(weights))])
    assert same.exit_code == 0, same.output


def imagenet_classifier_index():
    from cvtool.imagenet import class_index

    return class_index()


def test_label_format_wnid_refused_for_a_run_without_wordnet_ids(trained_run, colour_data, tmp_path):
    out = tmp_path / "p.csv"
    args = ["predict", str(trained_run), str(colour_data / "validation"), "--out", str(out), "--label-format", "wnid"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "WordNet" in result.output
    result = runner.invoke(app, [*args[:-2], "--label-format", "bogus"])
    assert result.exit_code == 2 and "--label-format" in result.output


def test_weights_resolution_option_then_environment_file_or_folder(tmp_path, monkeypatch):
    from cvtool.imagenet import weights_file

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "resnet50.h5").write_bytes(b"h5")
    (folder / "mobilenet_v2.weights.h5").write_bytes(b"h5")
    (folder / "mobilenet_v2.h5").write_bytes(b"h5")
    single = tmp_path / "vgg.h5"
    single.write_bytes(b"h5")
    monkeypatch.delenv("CVTOOL_IMAGENET_WEIGHTS", raising=False)
    assert weights_file("resnet50") is None  # Keras' own download and cache
    monkeypatch.setenv("CVTOOL_IMAGENET_WEIGHTS", str(folder))  # one folder serves several models
    assert weights_file("resnet50") == folder / "resnet50.h5"
    assert weights_file("mobilenet_v2") == folder / "mobilenet_v2.weights.h5"
    assert weights_file("vgg16", single) == single  # --weights wins over the environment
    monkeypatch.setenv("CVTOOL_IMAGENET_WEIGHTS", str(single))
    assert weights_file("vgg16") == single


def test_weights_folder_without_the_file_says_what_it_expects(tmp_path, photos):
    result = runner.invoke(
        app, ["predict", "imagenet:resnet50", str(photos), "--out", str(tmp_path / "p.csv"), "--weights", str(tmp_path)]
    )
    assert result.exit_code == 3
    assert "resnet50.weights.h5 or resnet50.h5" in result.output


def test_no_weights_offline_is_one_line_exit_3_telling_how(tmp_path, photos, monkeypatch):
    monkeypatch.delenv("CVTOOL_IMAGENET_WEIGHTS", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # empty cache
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):  # a closed local port: never reaches out
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", "imagenet:mobilenet_v2", str(photos), "--out", str(out), "-q"])
    assert result.exit_code == 3, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.output
    assert "--weights" in error[0] and "CVTOOL_IMAGENET_WEIGHTS" in error[0] and "keras" in error[0]
    assert not out.exists()


def test_unknown_name_and_weights_for_a_run_are_usage_errors(trained_run, tmp_path, photos):
    result = runner.invoke(app, ["predict", "imagenet:resnet5", str(photos), "--out", str(tmp_path / "a.csv")])
    assert result.exit_code == 2 and "imagenet:resnet50" in result.output
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"x")
    result = runner.invoke(
        app, ["predict", str(trained_run), str(photos), "--out", str(tmp_path / "b.csv"), "--weights", str(weights)]
    )
    assert result.exit_code == 2 and "imagenet:" in result.output


def test_a_wrong_weights_file_is_one_line_exit_3(tmp_path, photos):
    bad = tmp_path / "mobilenet_v2.weights.h5"
    bad.write_bytes(b"not an h5 file")
    out = tmp_path / "p.csv"
    result = runner.invoke(
        app, ["predict", "imagenet:mobilenet_v2", str(photos), "--out", str(out), "--weights", str(bad)]
    )
    assert result.exit_code == 3 and "cannot load weights" in result.output and "Traceback" not in result.output


def test_evaluate_takes_wordnet_ids_and_names_in_labels_csv(imagenet_classifier, mobilenet_v2, photos, tmp_path):
    from cvtool.evaluate import evaluate
    from cvtool.imagenet import class_index

    index = class_index()
    expected = reference_probs(mobilenet_v2[0], "mobilenet_v2", photos)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "synset"])
        for i, (rel, p) in enumerate(sorted(expected.items())):
            wnid, name = index[int(np.argmax(p))]
            writer.writerow([rel, wnid if i % 2 else name])  # the model's own top-1: ids and names mixed
        writer.writerow(["img0.png", "crane"])  # two ImageNet classes are called "crane"
    result = evaluate(
        imagenet_classifier,
        photos,
        tmp_path / "report",
        labels=labels,
        path_column="file",
        label_column="synset",
        top_k=1,
        ranks=(1, 5),
        quiet=True,
    )
    assert result.metrics["samples"] == len(expected) and result.metrics["accuracy"] == 1.0
    assert result.failed == 1 and result.exit_code == 1
    errors = read_csv(tmp_path / "report" / "errors.csv")
    assert "several" in errors[0]["error"]


def test_evaluate_reads_imagenet_style_wordnet_id_folders(imagenet_classifier, mobilenet_v2, photos, tmp_path):
    from cvtool.evaluate import evaluate
    from cvtool.imagenet import wnids

    expected = reference_probs(mobilenet_v2[0], "mobilenet_v2", photos)
    data = tmp_path / "val"
    for rel, p in expected.items():
        (data / wnids()[int(np.argmax(p))]).mkdir(parents=True, exist_ok=True)
        shutil.copy(photos / rel, data / wnids()[int(np.argmax(p))] / rel)
    result = evaluate(imagenet_classifier, data, tmp_path / "report", top_k=1, ranks=(1,), quiet=True)
    assert result.metrics["samples"] == len(expected) and result.metrics["accuracy"] == 1.0


def test_models_lists_imagenet_names_and_run_directories(trained_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "colours")
    (runs / "broken").mkdir()
    (runs / "broken" / "cvtool.json").write_text("{not json")
    result = runner.invoke(app, ["models", str(runs)])
    assert result.exit_code == 0, result.output
    out = result.output
    for name in ("imagenet:vgg16", "imagenet:resnet50", "imagenet:inception_v3", "imagenet:convnext_tiny"):
        assert name in out
    assert "299x299" in out and "keras.applications.ResNet50" in out
    assert str(runs / "colours") in out and "3 classes: blue, green, red" in out and "val_accuracy" in out
    assert "broken" in out and "skipped" in out  # a warning line, the listing goes on

    result = runner.invoke(app, ["models", str(runs), "--json"])
    listing = json.loads(result.stdout if hasattr(result, "stdout") else result.output)
    assert {n["model"] for n in listing["imagenet"]} >= {"imagenet:mobilenet_v2", "imagenet:xception"}
    (run,) = listing["runs"]
    meta = json.loads((trained_run / "cvtool.json").read_text())
    assert run["class_names"] == ["blue", "green", "red"] and run["metrics"] == meta["metrics"]
    assert run["image_size"] == [32, 32] and run["model_file_present"]


def test_models_without_folder_lists_only_imagenet_and_missing_folder_is_exit_2(tmp_path):
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "imagenet:efficientnet_b0" in result.output
    assert "Run directories" not in result.output
    assert runner.invoke(app, ["models", str(tmp_path / "nope")]).exit_code == 2


def test_models_help_does_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        "sys.argv = ['cvtool', 'models', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_NOT_LOADED" in out.stdout and "imagenet:NAME" in out.stdout
