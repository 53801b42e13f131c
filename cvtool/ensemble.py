"""`cvtool ensemble`: several models combined into one prediction.

`cvtool train --members K` trains such models (:func:`cvtool.train.train_members`).

Members are aligned by class name (same names in another order are fine; a
different set is refused before any image is read), may have different
input sizes and preprocessing (each image is decoded once and resized per
member), and are combined by a rule from :mod:`cvtool.combine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cvtool.bundle import Classifier
from cvtool.combine import check_weights
from cvtool.errors import UsageError
from cvtool.images import list_images
from cvtool.locks import holds_output_lock
from cvtool.predict import BatchJob, RunResult, Shard, write_predictions
from cvtool.scoring import Scorer, build_scorer, load_model_sets
from cvtool.tta import TtaOptions, apply_tta

RULES = ("mean", "weighted", "vote", "geometric")


def ensemble_scorer(
    models: Sequence[str | Path | Classifier],
    rule: str | None = None,
    weights: Sequence[float] | None = None,
    tta: TtaOptions | None = None,
    unsafe_load: bool = False,
    model_weights: str | Path | None = None,
) -> Scorer:
    """Load ``models`` (ensemble run directories contribute all their members) and combine them by ``rule``.

    ``rule`` None: the manifest's rule for a single ensemble run directory, else ``mean``. ``weights``
    are the weighted rule's; ``model_weights`` is a local weights file for a single ``imagenet:NAME`` model.
    """
    if not models:
        raise UsageError("give at least one MODEL")
    scorer = build_scorer(load_model_sets(models, unsafe_load, model_weights), rule, weights, RULES)
    return apply_tta(scorer, tta) if tta is not None else scorer


@holds_output_lock("out")
def ensemble(
    models: Sequence[str | Path | Classifier],
    input: str | Path,
    out: str | Path,
    rule: str | None = "mean",
    weights: Sequence[float] | None = None,
    tta: TtaOptions | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    resume: bool = False,
    shard: str | Shard | None = None,
    label_format: str = "name",
) -> RunResult:
    """Write the combined predictions of ``models`` for every image under ``input`` (predict's CSV format).

    ``resume`` and ``shard`` work as in predict.
    """
    if rule is not None and rule not in RULES:
        raise UsageError(f"unknown --rule {rule!r}; choose from {', '.join(RULES)}")
    if rule is not None:
        check_weights(rule, weights)  # before loading the models (their count is checked once they are loaded)
    with BatchJob(out, overwrite=overwrite, resume=resume, shard=shard) as job:
        items = list_images(input)
        scorer = ensemble_scorer(models, rule, weights, tta, unsafe_load)
        return write_predictions(scorer, items, job, top_k, batch_size, quiet, "ensemble", input, label_format)
