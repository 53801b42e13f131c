"""The scoring loop shared by predict, tta, ensemble and evaluate.

Images are decoded in parallel (:func:`cvtool.batches.batched`) and scored by a
:class:`~cvtool.scoring.Scorer`; what differs between the commands is the
scorer (one model, TTA views, several members) and what is written:
:func:`write_predictions` streams predict's CSV (predict, tta, ensemble),
evaluate consumes :func:`score_batches` itself. The command modules
(:mod:`cvtool.predict`, :mod:`cvtool.tta`, :mod:`cvtool.ensemble`,
:mod:`cvtool.evaluate`) build the scorer and call in here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cvtool.batches import Batch
from cvtool.bundle import Classifier, ModelSet
from cvtool.engines import EngineSettings, engine_batches
from cvtool.errors import UsageError
from cvtool.images import InputItem
from cvtool.jobs import BatchJob, RunResult, model_fingerprint
from cvtool.outputs import format_score
from cvtool.progress import Progress, warn
from cvtool.scoring import Scorer, build_scorer


def prediction_header(k: int) -> list[str]:
    """The columns of a predictions CSV with ``k`` classes per row.

    Args:
        k: classes per row.

    Example: ``prediction_header(2)`` is ``["path", "label", "score", "label_2", "score_2"]``.
    """
    header = ["path", "label", "score"]
    for i in range(2, k + 1):
        header += [f"label_{i}", f"score_{i}"]
    return header


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first).

    Args:
        probs: scores [images, classes].
        k: how many indices per row.

    Example: ``top_k_indices(np.array([[0.2, 0.5, 0.3]]), 2)`` is ``[[1, 2]]``.
    """
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def prediction_cells(probs_row: np.ndarray, idx_row: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """The label and score cells of one predictions row: name, score, name, score...

    Args:
        probs_row: one image's scores [classes].
        idx_row: the classes to write, best first (a row of :func:`top_k_indices`).
        class_names: the name written for each class index.

    Example: ``prediction_cells(p, top_k_indices(p[None], 3)[0], names)``.
    """
    cells = []
    for i in idx_row:
        cells += [class_names[i], format_score(probs_row[i])]
    return cells


def as_scorer(model: Scorer | Classifier) -> Scorer:
    """``model`` as a scorer: a classifier becomes a scorer with one member and one view (predict's scores).

    Args:
        model: a :class:`~cvtool.scoring.Scorer` (returned as is) or a loaded :class:`~cvtool.bundle.Classifier`.

    Example: ``as_scorer(load_classifier("runs/clothes")).num_classes``.
    """
    if isinstance(model, Scorer):
        return model
    return build_scorer([ModelSet([model], source=model.source)])


def score_batches(
    scorer: Scorer,
    items: Iterable[InputItem],
    batch_size: int,
    engine: str | EngineSettings | None = None,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Decode ``items`` in parallel and score them; yields each batch with its uncombined scores, in input order.

    The scores are [images, members, views, classes]; :meth:`~cvtool.scoring.Scorer.reduce_views_then_members` turns
    them into [images, classes]. Evaluate keeps them apart to compare members and views.

    Args:
        scorer: what decodes and scores the images.
        items: the images, in order.
        batch_size: images per batch (each brings its views).
        engine: where the work runs (:mod:`cvtool.engines`: ``local`` threads here, or ``ray``); None:
            ``$CVTOOL_ENGINE``, else local.

    Example: ``for batch, scores in score_batches(scorer, list_images("photos/"), 32): ...``.
    """
    yield from engine_batches(scorer, items, batch_size, engine)


def classify_batches(
    scorer: Scorer | Classifier,
    items: Iterable[InputItem],
    batch_size: int,
    engine: str | EngineSettings | None = None,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Decode ``items`` in parallel and score them; yields each batch with its probabilities [images, classes].

    Args:
        scorer: a scorer, or a classifier scored as predict does.
        items: the images, in order.
        batch_size: images per batch.
        engine: where the work runs (see :func:`score_batches`).

    Example: ``for batch, probs in classify_batches(classifier, list_images("photos/"), 32): ...``.
    """
    scorer = as_scorer(scorer)
    for batch, member_probs in score_batches(scorer, items, batch_size, engine):
        yield batch, scorer.reduce_views_then_members(member_probs)


def scorer_identity(scorer: Scorer) -> dict:
    """Which models (with their weights) and which views and rule made a CSV: the job identity that
    --resume and merge check (see :func:`cvtool.jobs.identity_difference`).

    Args:
        scorer: the scorer that writes the CSV.

    Example: ``job.open(items, header, {"command": "predict", **scorer_identity(scorer)})``.
    """
    options = getattr(scorer.views, "options", None)  # TTA views: transforms, reduce, crop scale, copies, seed...
    several = len(scorer.members) > 1
    return {
        "model": "+".join(model_fingerprint(m.classifier) for m in scorer.members),
        "settings": {
            "views": dataclasses.asdict(options) if options is not None else getattr(scorer.views, "__name__", "?"),
            "rule": scorer.rule_name if several else None,
            "rule_weights": scorer.rule_weights if several else None,
        },
    }


def resolve_top_k(k: int, num_classes: int) -> int:
    """``--top-k`` capped at the class count; below 1 is refused (exit 2).

    Args:
        k: classes per row asked for.
        num_classes: the model's class count.

    Example: ``resolve_top_k(5, 3)`` is 3.
    """
    if k < 1:
        raise UsageError("--top-k must be at least 1")
    return min(k, num_classes)


def write_predictions(
    scorer: Scorer | Classifier,
    items: Sequence[InputItem],
    job: BatchJob,
    *,
    command: str,
    top_k: int = 3,
    batch_size: int = 32,
    quiet: bool = False,
    input: str | Path = "",
    label_format: str = "name",
    engine: str | EngineSettings | None = None,
) -> RunResult:
    """The predictions CSV and its errors CSV for ``items`` scored by ``scorer`` (predict, tta, ensemble).

    The caller holds ``job`` open (``with job:``); it commits the CSVs when that block ends.

    Args:
        scorer: what scores the images (a classifier is scored as predict does).
        items: the images under INPUT, in order (the job keeps its shard and what a resume still needs).
        job: the open output job.
        command: the command name, recorded in the job identity and shown on the progress bar.
        top_k: classes per row (capped at the class count).
        batch_size: images per batch.
        quiet: no progress bar or log lines.
        input: INPUT as given, for the "no images found" warning.
        label_format: ``name``, ``wnid`` or ``both`` (``imagenet:NAME`` models).
        engine: where the work runs (see :func:`score_batches`); the rows are the same on every engine.

    Example: ``with BatchJob("preds.csv") as job: write_predictions(scorer, items, job, command="predict")``.
    """
    from cvtool.imagenet import label_names

    scorer = as_scorer(scorer)
    if not items:
        warn(f"no images found in {input}")
    k = resolve_top_k(top_k, scorer.num_classes)
    names = label_names(scorer.class_names, scorer.members[0].classifier.meta, label_format)
    identity = scorer_identity(scorer)
    identity["settings"]["label_format"] = label_format
    todo = job.open(items, prediction_header(k), {"command": command, **identity})
    with Progress(len(todo), command, quiet) as progress:
        for batch, probs in classify_batches(scorer, todo, batch_size, engine):
            job.fail_all(batch.failures)
            for item, p, idx in zip(batch.items, probs, top_k_indices(probs, k)):
                job.write([item.rel, *prediction_cells(p, idx, names)])
            job.flush()
            progress.update(len(batch.items) + len(batch.failures))
    return RunResult(job.processed, job.failed, job.out, job.errors)
