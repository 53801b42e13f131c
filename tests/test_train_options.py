"""train and finetune options: each declared once, as a field of cvtool.config, and read back by field name.

No TensorFlow here: the command line is parsed, not run.
"""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from cvtool.cli import app
from cvtool.config import AugmentConfig, FinetuneConfig, TrainConfig, from_options, option_fields

COMMANDS = {"train": TrainConfig, "finetune": FinetuneConfig}


def _parse(name: str, args: list[str]) -> dict:
    command = typer.main.get_command(app).commands[name]
    return command.make_context(name, ["data", "--out", "run", *args]).params


@pytest.mark.parametrize("name", COMMANDS)
def test_every_config_field_is_an_option_with_its_default_and_help(name):
    cls = COMMANDS[name]
    params = {p.name: p for p in typer.main.get_command(app).commands[name].params}
    defaults = {**dataclasses.asdict(AugmentConfig()), **dataclasses.asdict(cls())}
    for field, _, metadata in option_fields(cls):
        param = params[field]
        resumable = metadata["cli"].get("resumable", False)
        assert param.default == (None if resumable else defaults[field]), field
        assert param.help == metadata["help"] and param.help, field


@pytest.mark.parametrize("name", COMMANDS)
def test_no_option_given_builds_the_config_defaults(name):
    cls = COMMANDS[name]
    assert from_options(cls, _parse(name, [])) == cls()


def test_options_reach_their_fields_by_name_nested_augmentation_included():
    params = _parse(
        "finetune",
        ["--backbone", "resnet50", "--epochs", "3", "--no-hflip", "--rotation", "0.05", "--deterministic", "-b", "4"],
    )
    cfg = from_options(FinetuneConfig, params)
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.deterministic) == ("resnet50", 3, 4, True)
    assert cfg.augment == AugmentConfig(hflip=False, rotation=0.05)
    assert from_options(TrainConfig, _parse("train", ["--epochs", "2"])).epochs == 2


def test_environment_variables_still_set_training_options(monkeypatch):
    monkeypatch.setenv("CVTOOL_TRAIN_BATCH_SIZE", "7")
    monkeypatch.setenv("CVTOOL_CHECKPOINT", "every-epoch")
    cfg = from_options(TrainConfig, _parse("train", []))
    assert (cfg.batch_size, cfg.checkpoint) == (7, "every-epoch")


def test_resume_takes_only_the_epochs_from_the_command_line():
    assert from_options(TrainConfig, _parse("train", ["--lr", "0.5"]), resume=True) is None
    assert from_options(FinetuneConfig, _parse("finetune", ["--epochs", "9"]), resume=True) == FinetuneConfig(epochs=9)
