"""tta, ensemble, train --members and evaluate with several models, on real tiny models and files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from cvtool.cli import app
from tests.conftest import colour_image

runner = CliRunner()
NAMES = ["blue", "green", "red"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def probs_by_path(path: Path) -> dict[str, dict[str, float]]:
    """{image: {class: score}} from a predictions CSV written with --top-k covering every class."""
    out = {}
    for r in read_csv(path):
        cells = {r["label"]: float(r["score"])}
        i = 2
        while f"label_{i}" in r:
            cells[r[f"label_{i}"]] = float(r[f"score_{i}"])
            i += 1
        out[r["path"]] = cells
    return out


def as_matrix(table: dict[str, dict[str, float]]) -> np.ndarray:
    return np.array([[table[p][c] for c in NAMES] for p in sorted(table)])


def run(*args: str) -> None:
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output


def save_run(model, run_dir: Path, class_names: list[str], size: int) -> Path:
    from cvtool.bundle import save_model, write_meta

    save_model(model, run_dir / "model.keras")
    write_meta(run_dir, {"task": "classification", "class_names": class_names, "image_size": [size, size]})
    return run_dir


def colour_model(run_dir: Path, class_names: list[str], size: int, seed: int, scale: float, offset: float) -> Path:
    """An untrained but decisive model (mean colour -> random dense -> softmax) with its own size and preprocessing."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(scale, offset)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(class_names), "softmax", kernel_initializer=keras.initializers.RandomNormal(0, 2))(
        x
    )
    return save_run(keras.Model(inputs, outputs), run_dir, class_names, size)


def permuted_copy(trained_run: Path, run_dir: Path, class_names: list[str]) -> Path:
    """``trained_run`` whose output columns (and class names) are listed in another order."""
    import keras

    from cvtool.bundle import load_classifier

    base = load_classifier(trained_run)
    order = [base.class_names.index(n) for n in class_names]
    perm = keras.layers.Dense(len(order), use_bias=False, trainable=False)
    outputs = perm(base.model.output)
    perm.set_weights([np.eye(len(order), dtype="float32")[:, order]])
    return save_run(keras.Model(base.model.input, outputs), run_dir, class_names, base.image_size[0])


@pytest.fixture(scope="module")
def members(trained_run, tmp_path_factory) -> list[Path]:
    """Three members: the trained small-cnn (32 px), and two colour models at 48 and 24 px with their own
    preprocessing and class orders."""
    root = tmp_path_factory.mktemp("members")
    return [
        trained_run,
        colour_model(root / "b", ["red", "green", "blue"], 48, seed=1, scale=1 / 255, offset=0.0),
        colour_model(root / "c", ["green", "blue", "red"], 24, seed=2, scale=1 / 127.5, offset=-1.0),
    ]


@pytest.fixture(scope="module")
def loaded(members) -> list:
    """The members loaded once (Python API), so each test does not reload them."""
    from cvtool.bundle import load_classifier

    return [load_classifier(m) for m in members]


@pytest.fixture(scope="module")
def member_preds(loaded, colour_data, tmp_path_factory) -> list[np.ndarray]:
    from cvtool.predict import predict

    root = tmp_path_factory.mktemp("member_preds")
    out = []
    for i, m in enumerate(loaded):
        predict(m, colour_data / "validation", root / f"{i}.csv", top_k=3, quiet=True)
        out.append(as_matrix(probs_by_path(root / f"{i}.csv")))
    return out


def expected(rule: str, p: np.ndarray, weights=(0.5, 0.3, 0.2)) -> np.ndarray:
    """The rules written out independently of cvtool.combine; ``p`` is [members, images, classes]."""
    if rule == "mean":
        return p.mean(axis=0)
    if rule == "weighted":
        w = np.array(weights) / sum(weights)
        return np.tensordot(w, p, axes=1)
    if rule == "geometric":
        g = np.exp(np.log(p).mean(axis=0))
        return g / g.sum(axis=1, keepdims=True)
    votes = np.stack([(p.argmax(axis=2) == c).sum(axis=0) for c in range(p.shape[2])], axis=1)
    return (votes + p.mean(axis=0)) / (p.shape[0] + 1)


@pytest.mark.parametrize("rule", ["mean", "weighted", "vote", "geometric"])
def test_ensemble_scores_equal_the_rule_applied_to_members_predictions(
    rule, loaded, member_preds, colour_data, tmp_path
):
    from cvtool.ensemble import ensemble

    out = tmp_path / "ens.csv"
    weights = [0.5, 0.3, 0.2] if rule == "weighted" else None
    if rule == "geometric":
        # The CSV rounds scores to 6 decimals: the trained model's near-zero scores would make log() meaningless.
        loaded, member_preds = loaded[1:], member_preds[1:]
    result = ensemble(loaded, colour_data / "validation", out, rule=rule, rule_weights=weights, top_k=3, quiet=True)
    assert result.exit_code == 0 and result.processed == 36
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label", "score", "label_2", "score_2", "label_3", "score_3"]
    got = as_matrix(probs_by_path(out))
    want = expected(rule, np.stack(member_preds))
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert [r["label"] for r in rows] == [NAMES[i] for i in want.argmax(axis=1)]
    if rule == "vote":
        # The vote rule's label is the majority of the members' own top-1 labels.
        top1 = np.stack(member_preds).argmax(axis=2)
        for j, r in enumerate(rows):
            counts = np.bincount(top1[:, j], minlength=3)
            assert counts[NAMES.index(r["label"])] == counts.max()


def test_members_listed_in_another_class_order_are_aligned_by_name(trained_run, colour_data, tmp_path):
    reordered = permuted_copy(trained_run, tmp_path / "reordered", ["red", "blue", "green"])
    single, ens = tmp_path / "single.csv", tmp_path / "ens.csv"
    run("predict", str(trained_run), str(colour_data / "validation"), "--out", str(single), "--top-k", "3")
    run("ensemble", str(trained_run), str(reordered), str(colour_data / "validation"), "--out", str(ens),
        "--top-k", "3", "--rule", "geometric")  # fmt: skip
    np.testing.assert_allclose(as_matrix(probs_by_path(ens)), as_matrix(probs_by_path(single)), atol=2e-6)
    assert [r["label"] for r in read_csv(ens)] == [r["label"] for r in read_csv(single)]


def test_members_with_a_different_class_set_are_refused_before_any_work(members, colour_data, tmp_path):
    other = colour_model(tmp_path / "other", ["blue", "green", "yellow"], 32, seed=3, scale=1 / 255, offset=0.0)
    out = tmp_path / "ens.csv"
    result = runner.invoke(app, ["ensemble", str(members[0]), str(other), str(colour_data), "--out", str(out)])
    assert result.exit_code == 3
    assert "class set" in result.output and "yellow" in result.output
    assert not out.exists() and not (tmp_path / "ens.errors.csv").exists()
    assert "Traceback" not in result.output


def test_tta_identity_hflip_equals_mean_of_predict_on_images_and_mirrored_copies(trained_run, loaded, tmp_path):
    images, mirrored = tmp_path / "images", tmp_path / "mirrored"
    images.mkdir()
    mirrored.mkdir()
    for i, rgb in enumerate([(200, 40, 40), (40, 180, 60), (40, 60, 200), (120, 120, 40), (90, 30, 160)]):
        img = colour_image(rgb, size=(40, 32), seed=50 + i)
        img.save(images / f"img{i}.png")
        ImageOps.mirror(img).save(mirrored / f"img{i}.png")
    from cvtool.predict import predict

    for name, folder in (("plain", images), ("mirror", mirrored)):
        predict(loaded[0], folder, tmp_path / f"{name}.csv", top_k=3, quiet=True)
    run("tta", str(trained_run), str(images), "--out", str(tmp_path / "tta.csv"), "--transforms", "identity,hflip",
        "--top-k", "3", "--batch-size", "2")  # fmt: skip
    want = (as_matrix(probs_by_path(tmp_path / "plain.csv")) + as_matrix(probs_by_path(tmp_path / "mirror.csv"))) / 2
    got = as_matrix(probs_by_path(tmp_path / "tta.csv"))
    np.testing.assert_allclose(got, want, atol=2e-3)
    plain, mirror = as_matrix(probs_by_path(tmp_path / "plain.csv")), as_matrix(probs_by_path(tmp_path / "mirror.csv"))
    assert np.abs(plain - mirror).max() > 1e-5  # the flip changed the scores, so the equality above says something


def test_tta_views_crops_rotation_and_seeded_jitter():
    from cvtool.tta import TtaOptions, TtaViews, view_counts

    img = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3) * 7)
    opts = TtaOptions(("identity", "hflip", "vflip", "rot90", "crop", "scale", "brightness"), copies=3, seed=5)
    views = TtaViews(opts)(img, (24, 32), np.random.default_rng(1))
    assert len(views) == sum(view_counts(opts).values()) == 1 + 1 + 1 + 1 + 5 + 3 + 3
    assert all(v.shape == (24, 32, 3) and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[1], views[0][:, ::-1])
    np.testing.assert_array_equal(views[2], views[0][::-1])
    crops = views[4:9]
    assert len({c.tobytes() for c in crops}) == 5  # four corners and the centre differ
    again = TtaViews(opts)(img, (24, 32), np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(views, again))  # random views are seeded


def test_tta_reduce_vote_and_max_give_rows_that_sum_to_one_and_bad_files_exit_1(trained_run, colour_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for src in sorted((colour_data / "validation" / "red").iterdir())[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_text("not an image")
    for reduce in ("vote", "max"):
        out = tmp_path / f"{reduce}.csv"
        result = runner.invoke(app, ["tta", str(trained_run), str(folder), "--out", str(out), "--reduce", reduce,
                                     "--top-k", "3", "--transforms", "identity,hflip,crop,brightness"])  # fmt: skip
        assert result.exit_code == 1, result.output
        rows = probs_by_path(out)
        assert len(rows) == 3 and all(abs(sum(r.values()) - 1) < 1e-4 for r in rows.values())
        assert [e["path"] for e in read_csv(tmp_path / f"{reduce}.errors.csv")] == ["broken.jpg"]
    result = runner.invoke(app, ["tta", str(trained_run), str(folder), "--out", str(tmp_path / "x.csv"),
                                 "--transforms", "identity,twirl"])  # fmt: skip
    assert result.exit_code == 2 and "twirl" in result.output


def test_train_members_makes_a_run_usable_as_one_model(colour_data, tmp_path):
    ens = tmp_path / "ens"
    run("train", str(colour_data), "--out", str(ens), "--members", "2", "--epochs", "1", "--image-size", "32",
        "--batch-size", "16")  # fmt: skip
    manifest = json.loads((ens / "cvtool.json").read_text())
    assert manifest["ensemble"]["members"] == ["member-1", "member-2"]
    assert manifest["class_names"] == NAMES
    seeds = [json.loads((ens / m / "cvtool.json").read_text())["config"]["seed"] for m in ("member-1", "member-2")]
    assert seeds == [42, 43]

    validation = str(colour_data / "validation")
    run("predict", str(ens), validation, "--out", str(tmp_path / "ens.csv"), "--top-k", "3")
    from cvtool.bundle import load_models
    from cvtool.predict import predict

    loaded = load_models(ens)  # the manifest's members, in order
    assert [m.source for m in loaded.members] == [str(ens / "member-1"), str(ens / "member-2")]
    for name, m in zip(("member-1", "member-2"), loaded.members):
        predict(m, validation, tmp_path / f"{name}.csv", top_k=3, quiet=True)
    members_mean = np.mean([as_matrix(probs_by_path(tmp_path / f"{m}.csv")) for m in ("member-1", "member-2")], axis=0)
    np.testing.assert_allclose(as_matrix(probs_by_path(tmp_path / "ens.csv")), members_mean, atol=2e-6)

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(ens), str(colour_data), "--out", str(out), "--tta"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    table = metrics["comparison"]
    keys = [str(ens / "member-1"), str(ens / "member-2"), "ensemble"]
    assert set(keys) <= set(table) and "ensemble + tta" in table
    assert set(metrics["tta_gain"]) == {*keys}
    truth = [r["path"].split("/")[0] for r in read_csv(out / "predictions.csv")]
    member1 = read_csv(tmp_path / "member-1.csv")
    acc1 = np.mean([t == r["label"] for t, r in zip(truth, member1)])
    assert table[keys[0]]["accuracy"] == pytest.approx(acc1)
    assert metrics["accuracy"] == pytest.approx(table["ensemble + tta"]["accuracy"])
    assert metrics["tta_gain"]["ensemble"] == pytest.approx(
        table["ensemble + tta"]["accuracy"] - table["ensemble"]["accuracy"]
    )
    assert "ensemble + tta" in result.output and "tta gain" in result.output

    refused = runner.invoke(app, ["train", str(colour_data), "--out", str(ens), "--members", "2", "--epochs", "1"])
    assert refused.exit_code == 2


def test_evaluate_several_models_keeps_single_model_metrics(members, loaded, colour_data, tmp_path):
    from cvtool.evaluate import evaluate

    evaluate(loaded[0], colour_data, tmp_path / "one", quiet=True)
    run("evaluate", *map(str, members[:2]), str(colour_data), "--out", str(tmp_path / "two"), "--rule", "vote")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert "comparison" not in one and "tta_gain" not in one
    assert two["comparison"][str(members[0])]["accuracy"] == one["accuracy"]
    assert two["comparison"][str(members[0])]["top_k_accuracy"] == one["top_k_accuracy"]
    assert two["rule"] == "vote" and two["accuracy"] == two["comparison"]["ensemble"]["accuracy"]


def test_tta_and_ensemble_help_do_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        "for c in (['tta', '--help'], ['ensemble', '--help'], ['evaluate', '--help']):\n"
        "    sys.argv = ['cvtool', *c]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_NOT_LOADED" in out.stdout and "--transforms" in out.stdout and "[default: mean]" in out.stdout


def test_cli_tta_default_is_the_library_default_measured_to_help():
    """The CLI's --transforms default is tta.DEFAULT_TRANSFORMS: identity + hflip (crops hurt on real photos)."""
    from cvtool import cli
    from cvtool.tta import DEFAULT_TRANSFORMS, TtaOptions, parse_transforms, view_counts

    assert parse_transforms(cli.TTA_DEFAULT) == DEFAULT_TRANSFORMS == ("identity", "hflip")
    assert sum(view_counts(TtaOptions()).values()) == 2


def test_ensemble_members_of_other_sizes_see_predicts_pixels_on_full_size_jpegs(loaded, tmp_path):
    """Each member gets its own DCT-scaled decode: the 24 and 32 px members' scores equal their own predict's."""
    from cvtool.ensemble import ensemble
    from cvtool.predict import predict
    from tests.test_gradcam import large_photos

    photos = large_photos(tmp_path / "photos")
    alone = []
    for i, m in enumerate(loaded):
        predict(m, photos, tmp_path / f"{i}.csv", top_k=3, quiet=True)
        alone.append(as_matrix(probs_by_path(tmp_path / f"{i}.csv")))
    ensemble(loaded, photos, tmp_path / "ens.csv", rule="mean", top_k=3, quiet=True)
    np.testing.assert_allclose(as_matrix(probs_by_path(tmp_path / "ens.csv")), np.mean(alone, axis=0), atol=2e-5)
