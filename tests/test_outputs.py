"""What every command that writes an output must do: one writer at a time, refuse an impossible --out
before any model is loaded, and write every file name (not valid UTF-8 ones included) reversibly."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvtool.cli import app
from cvtool.outputs import cell_path, path_cell
from tests.conftest import COLOURS, colour_image
from tests.test_hostile import read_rows

runner = CliRunner()
CAFE = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: not valid UTF-8


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def all_commands(model: Path, data: Path, segmodel: Path, out: Path, missing: Path) -> dict[str, list]:
    """Each command with its output at ``out`` (a file name, or a folder for the folder commands)."""
    return {
        "predict": ["predict", model, data, "--out", out / "p.csv"],
        "tta": ["tta", model, data, "--out", out / "p.csv"],
        "ensemble": ["ensemble", model, model, data, "--out", out / "p.csv"],
        "evaluate": ["evaluate", model, data, "--out", out],
        "gradcam": ["gradcam", model, data, "--out", out],
        "segment": ["segment", data, "--model", segmodel, "--out", out],
        "merge": ["merge", out / "p.csv", missing],
        "train": ["train", data, "--out", out, "--epochs", "1"],
        "finetune": ["finetune", data, "--out", out, "--weights", "none"],
    }


def target(command: str, out: Path) -> Path:
    return out / "p.csv" if command in ("predict", "tta", "ensemble", "merge") else out


# --- one writer per output ------------------------------------------------------------------------------


@contextmanager
def held_by_another_process(path: Path, folder: bool):
    """The output lock on ``path``, held by another live process until the block ends."""
    code = (
        "import sys; from cvtool.locks import OutputLock; "
        "lock = OutputLock(sys.argv[1], folder=sys.argv[2] == '1').acquire(); print('held', flush=True); "
        "sys.stdin.read(); lock.release()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), "1" if folder else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_every_command_refuses_an_output_that_another_run_is_writing(trained_run, colour_data, tools, tmp_path):
    missing = tmp_path / "no-such-shard.csv"
    for command, args in all_commands(trained_run, colour_data, tools["segmodel"], tmp_path / "out", missing).items():
        path = target(command, tmp_path / "out")
        with held_by_another_process(path, folder=path.suffix != ".csv") as holder:
            result = cli(*args)
        assert result.exit_code == 2, (command, result.output)
        assert f"another run (pid {holder.pid} on " in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.output
        assert not path.with_name(path.name + ".lock").exists()  # the holder's lock went with it
        assert not (tmp_path / "out" / "p.csv").exists() and not (tmp_path / "out" / "metrics.json").exists()


# --- impossible outputs -----------------------------------------------------------------------------------


def test_an_output_under_a_file_is_a_usage_error_before_any_model_is_loaded(colour_data, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    missing = tmp_path / "no-such-model"  # the output is checked first: this is never looked at
    commands = all_commands(missing, colour_data, missing, blocker / "sub", tmp_path / "no-such-shard.csv")
    for command, args in commands.items():
        result = cli(*args)
        assert result.exit_code == 2, (command, result.output)
        assert f"{blocker} is a file, not a folder" in result.stderr, (command, result.stderr)
        assert "unexpected" not in result.output and result.stderr.count("\n") == 1
    # The folder commands' --out itself a file; the file commands' --out a folder.
    for command in ("evaluate", "gradcam", "segment", "train", "finetune"):
        result = cli(*all_commands(missing, colour_data, missing, blocker, missing)[command])
        assert result.exit_code == 2 and f"--out {blocker} is a file; give a folder" in result.stderr, command
    result = cli("predict", missing, colour_data, "--out", tmp_path)
    assert result.exit_code == 2 and f"{tmp_path} is a folder; give a file name" in result.stderr


def test_a_read_only_output_folder_is_a_usage_error_before_any_model_is_loaded(colour_data, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) may write to read-only folders")
        missing = tmp_path / "no-such-model"
        for command, args in all_commands(missing, colour_data, missing, folder / "x", missing).items():
            result = cli(*args)
            assert result.exit_code == 2 and "permission denied" in result.stderr, (command, result.output)
        result = cli("evaluate", missing, colour_data, "--out", folder)
        assert result.exit_code == 2 and f"cannot write to {folder}: permission denied" in result.stderr
    finally:
        folder.chmod(0o755)


# --- file names that are not UTF-8 ------------------------------------------------------------------------


def test_path_cells_are_utf8_and_reversible():
    names = [b"caf\xe9.jpg", b"a\\b.jpg", b"a\\xe9.jpg", b"\\\xff\\", b"sub/x y.jpg", "ünï 日本.png".encode()]
    for raw in names:
        rel = os.fsdecode(raw)
        cell = path_cell(rel)
        cell.encode("utf-8")
        assert cell_path(cell) == rel
    assert path_cell(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg" and path_cell("a/b c.jpg") == "a/b c.jpg"
    assert cell_path("C:\\photos\\b.jpg") == "C:\\photos\\b.jpg"  # a backslash that starts no escape is kept


@pytest.fixture
def latin1_names(tmp_path) -> Path:
    """A labelled folder (red/, green/, blue/) whose red/ holds a file named b'caf\\xe9.png' and 'cafz.png'.

    Escaped, ``caf\\xe9.png`` sorts before ``cafz.png``; as a file name it sorts after it.
    """
    root = tmp_path / "latin1"
    for c, (name, rgb) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(3):
            colour_image(rgb, seed=50 + 10 * c + i).save(root / name / f"{name}_{i}.png")
    colour_image(COLOURS["red"], seed=7).save(root / "red" / "cafe.png")
    os.rename(root / "red" / "cafe.png", os.fsencode(root / "red") + b"/caf\xe9.png")
    colour_image(COLOURS["red"], seed=8).save(root / "red" / "cafz.png")
    return root


def test_files_named_in_latin1_are_processed_by_every_command_and_written_escaped(
    latin1_names, trained_run, tools, tmp_path
):
    cafe = "red/caf\\xe9.png"
    for command in ("predict", "tta", "ensemble"):
        out = tmp_path / f"{command}.csv"
        args = [command, trained_run, *([trained_run] if command == "ensemble" else []), latin1_names]
        result = cli(*args, "--out", out, "-q")
        assert result.exit_code == 0, (command, result.output)
        paths = [r[0] for r in read_rows(out)]
        assert cafe in paths and len(paths) == 11 and paths.index("red/cafz.png") < paths.index(cafe)

    result = cli("evaluate", trained_run, latin1_names, "--out", tmp_path / "eval", "-q")
    assert result.exit_code == 0, result.output
    assert cafe in [r[0] for r in read_rows(tmp_path / "eval" / "predictions.csv")]

    result = cli("gradcam", trained_run, latin1_names, "--out", tmp_path / "cam", "-q")
    assert result.exit_code == 0, result.output
    row = next(r for r in read_rows(tmp_path / "cam" / "gradcam.csv") if r[0] == cafe)
    assert row[3] == "red/caf\\xe9.gradcam.jpg"
    assert os.path.isfile(os.fsencode(tmp_path / "cam") + b"/red/caf\xe9.gradcam.jpg")  # the picture keeps the name

    result = cli("segment", latin1_names, "--model", tools["segmodel"], "--out", tmp_path / "seg", "-q")
    assert result.exit_code == 0, result.output
    assert cafe in [r[0] for r in read_rows(tmp_path / "seg" / "pixels.csv")]
    assert os.path.isfile(os.fsencode(tmp_path / "seg") + b"/red/caf\xe9.mask.png")


def test_latin1_names_resume_and_merge_like_any_other(latin1_names, trained_run, tmp_path):
    out = tmp_path / "p.csv"
    assert cli("predict", trained_run, latin1_names, "--out", out, "-q").exit_code == 0
    whole = read_rows(out)
    # A partial that holds every row (killed just before the rename): --resume adds no second row.
    out.rename(tmp_path / "p.csv.part")
    (tmp_path / "p.errors.csv").rename(tmp_path / "p.errors.csv.part")
    assert cli("predict", trained_run, latin1_names, "--out", out, "--resume", "-q").exit_code == 0
    assert read_rows(out) == whole
    # Shards merge back into the unsharded order, although the escaped cells sort otherwise.
    shards = [tmp_path / f"s{k}.csv" for k in range(3)]
    for k, shard in enumerate(shards):
        assert cli("predict", trained_run, latin1_names, "--out", shard, "--shard", f"{k}/3", "-q").exit_code == 0
    merged = cli("merge", tmp_path / "merged.csv", *shards)
    assert merged.exit_code == 0, merged.stderr
    assert [r[:2] for r in read_rows(tmp_path / "merged.csv")] == [r[:2] for r in whole]


# --- ensemble weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rule", "weighted", "--rule-weights", "nan,1"], "must be finite"),
        (["--rule", "weighted", "--rule-weights", "1,inf"], "must be finite"),
        (["--rule", "mean", "--rule-weights", "5,1"], "--rule mean does not use them"),
        (["--rule", "vote", "--rule-weights", "1,1"], "--rule vote does not use them"),
    ],
)
def test_ensemble_refuses_weights_that_are_not_finite_or_that_its_rule_ignores(
    trained_run, colour_data, tmp_path, options, message
):
    out = tmp_path / "p.csv"
    result = cli("ensemble", trained_run, trained_run, colour_data, "--out", out, *options)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not out.exists()
    evaluate_options = [o if o != "--weights" else "--rule-weights" for o in options]
    result = cli("evaluate", trained_run, trained_run, colour_data, "--out", tmp_path / "ev", *evaluate_options)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_combining_refuses_weights_that_are_not_finite_or_that_the_rule_ignores(trained_run):
    from cvtool.bundle import load_models
    from cvtool.errors import UsageError
    from cvtool.scoring import build_scorer

    sets = [load_models(trained_run), load_models(trained_run)]
    with pytest.raises(UsageError, match="finite"):
        build_scorer(sets, "weighted", [float("nan"), 1.0])
    with pytest.raises(UsageError, match="does not use them"):
        build_scorer(sets, "geometric", [1.0, 2.0])
    assert build_scorer(sets, "weighted", [3.0, 1.0]).rule_weights == [3.0, 1.0]


def test_training_lists_a_broken_file_with_a_latin1_name_in_its_errors_csv(tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.train import train
    from tests.conftest import make_colour_dataset

    data = make_colour_dataset(tmp_path / "data", per_class=3)
    colour_image(COLOURS["red"], seed=9).save(data / "train" / "red" / "cafe.png")
    os.rename(data / "train" / "red" / "cafe.png", os.fsencode(data / "train" / "red") + b"/caf\xe9.png")
    with open(os.fsencode(data / "train" / "red") + b"/bad\xe9.png", "wb") as f:
        f.write(b"not an image")
    result = train(data, tmp_path / "run", cfg=TrainConfig(epochs=1, image_size=16, batch_size=4), quiet=True)
    assert result.failures and read_rows(tmp_path / "run" / "errors.csv")[0][0] == "train/red/bad\\xe9.png"
