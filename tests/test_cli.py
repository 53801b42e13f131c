"""The command line itself: registered variants in --help, plain metavars, ensemble's arguments and old spellings."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvtool.cam import METHODS
from cvtool.cli import COMMAND_ORDER, app
from cvtool.imagenet import LABEL_FORMATS
from cvtool.rules import ENSEMBLE_RULES, VIEW_REDUCERS
from cvtool.runtimes import RUNTIMES
from cvtool.tta import TRANSFORMS
from tests.conftest import colour_image

runner = CliRunner()
WIDE = {"COLUMNS": "220", "TERM": "dumb"}


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], env=WIDE)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one")
    colour_image((255, 0, 0)).save(folder / "a.png")
    return folder


# (command, option, registry, extra arguments a name needs to get past the option checks)
REGISTERED = [
    ("tta", "--transforms", TRANSFORMS, {}),
    ("tta", "--reduce", VIEW_REDUCERS, {}),
    ("ensemble", "--reduce", VIEW_REDUCERS, {"": ["--tta"]}),
    ("ensemble", "--rule", ENSEMBLE_RULES, {"weighted": ["--rule-weights", "1,1"]}),
    ("evaluate", "--rule", ENSEMBLE_RULES, {"weighted": ["--rule-weights", "1,1"]}),
    ("gradcam", "--method", METHODS, {}),
    ("predict", "--label-format", LABEL_FORMATS, {}),
    ("predict", "--runtime", RUNTIMES, {}),
]


def _run_with(command: str, option: str, value: str, extra: list, input: Path, tmp_path: Path):
    """The command with ``option value``, on a model that does not exist: an accepted value gets as far as
    loading the model; a refused one stops at the option."""
    missing = tmp_path / "no-such-model"
    models = [missing, missing] if command in ("ensemble", "evaluate") else [missing]
    out = tmp_path / ("out" if command in ("evaluate", "gradcam") else "out.csv")
    return cli(command, *models, input, "--out", out, option, value, *extra)


@pytest.mark.parametrize(
    ("command", "option", "registry", "needs"), REGISTERED, ids=[f"{c}{o}" for c, o, *_ in REGISTERED]
)
def test_every_registered_name_is_accepted_by_its_command_and_listed_in_its_help(
    command, option, registry, needs, one_image, tmp_path
):
    assert len(registry) >= 2
    help_text = cli(command, "--help").output
    for name in registry:
        assert re.search(rf"(?<![\w+-]){re.escape(name)}(?![\w+-])", help_text), f"{name} not in {command} --help"
        extra = needs.get(name, needs.get("", []))
        result = _run_with(command, option, name, extra, one_image, tmp_path)
        assert result.exit_code == 2 and "model not found" in result.output, (name, result.output)
    refused = _run_with(command, option, "no-such-variant", needs.get("", []), one_image, tmp_path)
    assert refused.exit_code == 2 and "no-such-variant" in refused.output and "model not found" not in refused.output


@pytest.mark.parametrize("command", COMMAND_ORDER)
def test_help_shows_plain_metavars(command):
    text = cli(command, "--help").output
    assert not re.search(r"<(bool|str|int|float|path|list)[^>]*>", text), text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    arguments = usage.split(command, 1)[1].replace("[OPTIONS]", "").split()
    assert "{" not in usage and all(re.fullmatch(r"\[?[A-Z_]+(\.\.\.)?\]?(\.\.\.)?", a) for a in arguments), usage


def test_top_level_help_shows_no_value_placeholder_after_its_flags():
    text = cli("--help").output
    assert not re.search(r"<(bool|str|int|float|path|list)[^>]*>", text), text
    assert re.search(r"--version\s+Print", text), text


def test_flags_show_no_value_placeholder():
    text = cli("predict", "--help").output
    overwrite = next(line for line in text.splitlines() if "--overwrite" in line)
    assert re.search(r"--overwrite\s+Replace", overwrite), overwrite


def test_ensemble_takes_input_as_its_last_argument_and_old_spellings_with_one_deprecation_line(
    trained_run, colour_data, tmp_path
):
    data = colour_data / "validation"
    new = cli("ensemble", trained_run, trained_run, data, "--out", tmp_path / "new.csv",
              "--rule", "weighted", "--rule-weights", "2,1", "-q")  # fmt: skip
    assert new.exit_code == 0, new.output
    assert "deprecated" not in new.output
    old = cli("ensemble", trained_run, trained_run, "--input", data, "--out", tmp_path / "old.csv",
              "--rule", "weighted", "--weights", "2,1", "-q")  # fmt: skip
    assert old.exit_code == 0, old.output
    deprecations = [line for line in old.output.splitlines() if "deprecated" in line]
    assert len(deprecations) == 2 and any("--input" in d for d in deprecations)
    assert any("--rule-weights" in d for d in deprecations)
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "old.csv").read_bytes()


def test_ensemble_weights_is_an_imagenet_weights_file_not_rule_weights(trained_run, colour_data, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    result = cli("ensemble", trained_run, trained_run, colour_data, "--out", tmp_path / "e.csv", "--weights", folder)
    assert result.exit_code == 2 and "imagenet:NAME" in result.output, result.output
    assert not (tmp_path / "e.csv").exists()


# --- frictions a new user met --------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_warning_during_a_bar_gets_its_own_line_and_the_finished_bar_stays(monkeypatch):
    from cvtool.progress import Progress, warn

    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    with Progress(3, "predict") as progress:
        progress.update(1)
        warn("hat/bad.jpg")
        progress.update(2)
    shown = [line.rsplit("\r", 1)[-1] for line in screen.getvalue().split("\n")]  # what a terminal keeps
    assert "warning: hat/bad.jpg" in shown, shown
    last = [line for line in shown if line.strip()][-1]
    assert "100%" in last and "3/3" in last, shown


def test_evaluate_quiet_still_prints_its_summary(trained_run, colour_data, tmp_path):
    result = cli("evaluate", trained_run, colour_data, "--out", tmp_path / "report", "-q")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "precision" in result.stdout


def test_a_model_that_does_not_load_leaves_no_empty_out_folder(tmp_path, one_image):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a keras file")
    for command in ("evaluate", "gradcam"):
        out = tmp_path / f"{command}-out"
        data = one_image if command == "gradcam" else _labelled(tmp_path)
        result = cli(command, broken, data, "--out", out)
        assert result.exit_code == 3, result.output
        assert not out.exists(), f"{command} left {out}"


def _labelled(tmp_path: Path) -> Path:
    data = tmp_path / "labelled"
    for name, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (data / name).mkdir(parents=True, exist_ok=True)
        colour_image(rgb).save(data / name / "a.png")
    return data


def test_gradcam_refuses_an_existing_output_before_importing_tensorflow(tmp_path, one_image):
    out = tmp_path / "maps"
    out.mkdir()
    (out / "gradcam.csv").write_text("path,class\n")
    code = (
        "import sys\n"
        "from cvtool.cli import main\n"
        f"sys.argv = ['cvtool', 'gradcam', 'no-model', {str(one_image)!r}, '--out', {str(out)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "already exists" in done.stderr, done.stderr
    assert done.stdout.split() == ["exit", "2", "False"], done.stdout


def test_evaluate_labels_csv_reads_path_cells_as_cvtool_writes_them(trained_run, tmp_path):
    from cvtool.evaluate import evaluate
    from cvtool.outputs import path_cell

    flat = tmp_path / "flat"
    flat.mkdir()
    colour_image((255, 0, 0), seed=3).save(flat / "tmp.png")
    os.rename(flat / "tmp.png", os.fsencode(flat) + b"/caf\xe9.png")
    colour_image((0, 0, 255), seed=4).save(flat / "plain.png")
    cell = path_cell(os.fsdecode(b"caf\xe9.png"))
    assert cell == "caf\\xe9.png"
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{cell},red\nplain.png,blue\n", encoding="utf-8")
    result = evaluate(trained_run, flat, tmp_path / "report", labels=labels, quiet=True)
    assert result.failed == 0 and result.metrics["samples"] == 2
    rows = (tmp_path / "report" / "predictions.csv").read_text(encoding="utf-8")
    assert cell in rows


def test_ensemble_rule_weights_given_with_both_spellings_is_a_usage_error(trained_run, colour_data, tmp_path):
    args = ["ensemble", str(trained_run), str(trained_run), str(colour_data / "validation"), "--out"]
    result = cli(*args, str(tmp_path / "e.csv"), "--rule", "weighted", "--weights", "1,2", "--rule-weights", "1,2")
    assert result.exit_code == 2 and "once" in result.stderr, result.stderr
    assert not (tmp_path / "e.csv").exists()
