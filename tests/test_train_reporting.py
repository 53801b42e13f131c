"""What training tells its user: progress inside long epochs without a terminal, and why it exits 1."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from tests.conftest import make_colour_dataset


def test_training_logs_batch_progress_inside_epochs_without_a_terminal(colour_data, tmp_path, monkeypatch, capsys):
    from cvtool.config import TrainConfig
    from cvtool.train import train

    monkeypatch.setenv("CVTOOL_LOG_INTERVAL", "0")  # a line at every batch instead of every ~10 s
    train(colour_data, tmp_path / "run", cfg=TrainConfig(epochs=1, image_size=16, batch_size=8))
    lines = capsys.readouterr().err.splitlines()  # captured: stderr is no terminal, as in cron
    epoch_line = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1: "))
    batch_lines = [line for line in lines[:epoch_line] if line.startswith("epoch 1/1 batches: ")]
    steps = 5  # 36 training images in batches of 8
    assert [re.match(r"epoch 1/1 batches: (\d+)/5 \(", line).group(1) for line in batch_lines] == [
        str(k) for k in range(1, steps + 1)
    ]


@pytest.fixture(scope="module")
def data_with_a_broken_file(tmp_path_factory):
    data = make_colour_dataset(tmp_path_factory.mktemp("broken"), per_class=3)
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return data


@pytest.mark.parametrize(
    "command, lists",
    [
        (["train"], ["errors.csv"]),
        (["train", "--members", "2"], ["member-1/errors.csv", "member-2/errors.csv"]),
        (
            [
                "finetune",
                "--backbone",
                "mobilenet_v3_small",
                "--weights",
                "none",
                "--head-epochs",
                "1",
                "--epochs",
                "0",
            ],
            ["errors.csv"],
        ),
    ],
)
def test_training_exit_1_says_how_many_files_were_skipped_and_where(data_with_a_broken_file, tmp_path, command, lists):
    from cvtool.cli import app

    run = tmp_path / "run"
    args = [command[0], str(data_with_a_broken_file), "--out", str(run), "--epochs", "1", "--image-size", "32", "-q"]
    result = CliRunner().invoke(app, [*args, *command[1:]])
    assert result.exit_code == 1, result.output
    where = ", ".join(str(run / path) for path in lists)
    assert f"1 file skipped: could not be read (see {where})" in result.output
    for path in lists:
        assert "broken.png" in (run / path).read_text()
