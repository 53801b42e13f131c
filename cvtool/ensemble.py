"""`cvtool ensemble`: several models combined into one prediction.

`cvtool train --members K` trains such models (:func:`cvtool.train.train_members`).

Members are aligned by class name (same names in another order are fine; a
different set is refused before any image is read), may have different
input sizes and preprocessing (each image is decoded once and resized per
member), and are combined by a rule from :mod:`cvtool.rules`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cvtool.bundle import Classifier
from cvtool.engines import EngineSettings
from cvtool.errors import UsageError
from cvtool.images import list_images
from cvtool.inference import write_predictions
from cvtool.jobs import BatchJob, RunResult, Shard
from cvtool.locks import holds_output_lock
from cvtool.rules import ENSEMBLE_RULES, check_weights
from cvtool.scoring import Scorer, build_scorer, load_model_sets
from cvtool.storage import stages_output
from cvtool.tta import TtaOptions, apply_tta


def ensemble_scorer(
    models: Sequence[str | Path | Classifier],
    *,
    rule: str | None = None,
    rule_weights: Sequence[float] | None = None,
    tta: TtaOptions | None = None,
    unsafe_load: bool = False,
    weights: str | Path | None = None,
    runtime: str = "auto",
) -> Scorer:
    """Load ``models`` (ensemble run directories contribute all their members) and combine them by ``rule``.

    Args:
        models: run directories, ``.keras`` files, ``imagenet:NAME`` names or loaded classifiers.
        rule: how members are combined; None: the manifest's rule for a single ensemble run directory,
            else ``mean``.
        rule_weights: the weighted rule's weights, one per member.
        tta: score the TTA views of every image with every member.
        unsafe_load: allow models with Lambda layers or custom code.
        weights: for ``imagenet:NAME`` models: a local weights file (one such model) or a folder of
            ``NAME.h5`` files.
        runtime: what runs each model: ``auto`` (a run's fastest export, else TF), ``tf``, ``tflite``, ``onnx``.

    Example: ``ensemble_scorer(["runs/a", "runs/b"], rule="weighted", rule_weights=[2, 1])``.
    """
    if not models:
        raise UsageError("give at least one MODEL")
    scorer = build_scorer(load_model_sets(models, unsafe_load, weights, runtime=runtime), rule, rule_weights)
    return apply_tta(scorer, tta) if tta is not None else scorer


@stages_output("out")
@holds_output_lock("out")
def ensemble(
    models: Sequence[str | Path | Classifier],
    input: str | Path,
    out: str | Path,
    *,
    rule: str | None = "mean",
    rule_weights: Sequence[float] | None = None,
    tta: TtaOptions | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    weights: str | Path | None = None,
    runtime: str = "auto",
    label_format: str = "name",
    resume: bool = False,
    shard: str | Shard | None = None,
    format: str | None = None,
    engine: str | EngineSettings | None = None,
) -> RunResult:
    """Write the combined predictions of ``models`` for every image under ``input`` (predict's CSV format).

    Args:
        models: run directories, ``.keras`` files, ``imagenet:NAME`` names or loaded classifiers; an
            ensemble run directory adds all its members.
        input: an image file, or a folder searched recursively.
        out: the predictions file to write (``.csv``, ``.jsonl`` or ``.parquet``).
        rule: how members are combined (see :data:`cvtool.rules.ENSEMBLE_RULES`); None: a single
            ensemble run's own rule.
        rule_weights: the weighted rule's weights, one per member.
        tta: also score the TTA views of every image with every member.
        top_k: classes per row (capped at the class count).
        batch_size: images per batch.
        overwrite: replace an existing ``out``.
        quiet: no progress bar or log lines.
        unsafe_load: allow models with Lambda layers or custom code.
        weights: for ``imagenet:NAME`` members: a local weights file (one such member) or a folder of
            ``NAME.h5`` files.
        runtime: what runs each model: ``auto`` (a run's fastest export, else TF), ``tf``, ``tflite``, ``onnx``.
        label_format: ``name``, ``wnid`` or ``both``, for ``imagenet:NAME`` models.
        resume: continue an interrupted run from ``out``'s partial files.
        shard: ``"K/N"``: do only shard K of ``input``.
        format: ``csv``, ``jsonl`` or ``parquet`` (default: from ``out``'s suffix; see :mod:`cvtool.formats`).
        engine: where the scoring runs: ``local`` or ``ray`` (:mod:`cvtool.engines`); None: ``$CVTOOL_ENGINE``.

    Example: ``ensemble(["runs/a", "runs/b"], "incoming/", "preds.csv", rule="geometric")``.
    """
    if rule is not None:
        ENSEMBLE_RULES.entry(rule)  # an unknown rule is refused before anything is loaded
        check_weights(rule, rule_weights)  # before loading the models (their count is checked once they are loaded)
    with BatchJob(out, overwrite=overwrite, resume=resume, shard=shard, format=format) as job:
        items = list_images(input)
        scorer = ensemble_scorer(
            models,
            rule=rule,
            rule_weights=rule_weights,
            tta=tta,
            unsafe_load=unsafe_load,
            weights=weights,
            runtime=runtime,
        )
        return write_predictions(
            scorer,
            items,
            job,
            command="ensemble",
            top_k=top_k,
            batch_size=batch_size,
            quiet=quiet,
            input=input,
            label_format=label_format,
            engine=engine,
        )
