"""`cvtool predict`: class probabilities for every image under INPUT, streamed to a CSV.

Also the shared loop of predict, tta and ensemble (:func:`write_predictions`)
and of evaluate (:func:`classify_batches`): what differs between them is the
:class:`~cvtool.scoring.Scorer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cvtool.batches import Batch, batched
from cvtool.bundle import Classifier, ModelSet
from cvtool.images import InputItem, list_images
from cvtool.jobs import ERRORS_HEADER, BatchJob, RunResult, Shard, model_fingerprint  # noqa: F401 - re-exported
from cvtool.locks import holds_output_lock
from cvtool.outputs import format_score
from cvtool.progress import Progress, warn
from cvtool.scoring import Scorer, build_scorer, load_scorer


def prediction_header(k: int) -> list[str]:
    header = ["path", "label", "score"]
    for i in range(2, k + 1):
        header += [f"label_{i}", f"score_{i}"]
    return header


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first (ties: lower index first)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def prediction_cells(probs_row: np.ndarray, idx_row: np.ndarray, class_names: Sequence[str]) -> list[str]:
    cells = []
    for i in idx_row:
        cells += [class_names[i], format_score(probs_row[i])]
    return cells


def classify_batches(
    scorer: Scorer | Classifier, items: Iterable[InputItem], batch_size: int
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Decode ``items`` in parallel and score them; yields each batch with its probabilities.

    The one loop of predict, tta, ensemble and evaluate: what differs between them is the scorer.
    """
    scorer = as_scorer(scorer)
    for batch, member_probs in score_batches(scorer, items, batch_size):
        yield batch, scorer.combine(member_probs)


def score_batches(scorer: Scorer, items: Iterable[InputItem], batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
    """Like :func:`classify_batches`, but yields each batch's uncombined [images, members, views, classes] scores."""
    for batch in batched(items, scorer.decode, batch_size):
        yield batch, scorer.member_probs(batch.payloads)


def as_scorer(model: Scorer | Classifier) -> Scorer:
    if isinstance(model, Scorer):
        return model
    return build_scorer([ModelSet([model], source=model.source)])


def scorer_identity(scorer: Scorer) -> dict:
    """Which models (with their weights) and which views and rule made a CSV: the job identity that
    --resume and merge check (see :func:`cvtool.jobs.identity_difference`)."""
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
    if k < 1:
        from cvtool.errors import UsageError

        raise UsageError("--top-k must be at least 1")
    return min(k, num_classes)


@holds_output_lock("out")
def predict(
    model: str | Path | Classifier | Scorer,
    input: str | Path,
    out: str | Path,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    label_format: str = "name",
    weights: str | Path | None = None,
    resume: bool = False,
    shard: str | Shard | None = None,
) -> RunResult:
    """Write ``out`` (path,label,score,label_2,score_2,...) for every image under ``input``.

    Rows follow input order and are streamed to disk; bad files go to the
    errors CSV beside ``out`` and never stop the run. ``model`` may be an
    ensemble run directory (its members are combined by its manifest's rule).
    ``label_format`` (name, wnid, both) and ``weights`` apply to
    ``imagenet:NAME`` models. ``resume`` continues an interrupted run;
    ``shard`` ("K/N") does only this machine's share of ``input``.
    """
    from cvtool.imagenet import check_label_format

    check_label_format(label_format)
    job = BatchJob(out, overwrite=overwrite, resume=resume, shard=shard)
    with job:
        items = list_images(input)
        scorer = model if isinstance(model, Scorer) else load_scorer(model, unsafe=unsafe_load, weights=weights)
        return write_predictions(scorer, items, job, top_k, batch_size, quiet, "predict", input, label_format)


def write_predictions(
    scorer: Scorer | Classifier,
    items: Sequence[InputItem],
    job: BatchJob,
    top_k: int,
    batch_size: int,
    quiet: bool,
    desc: str,
    input: str | Path = "",
    label_format: str = "name",
) -> RunResult:
    """The predictions CSV and its errors CSV for ``items`` scored by ``scorer`` (predict, tta, ensemble).

    The caller holds ``job`` open (``with job:``); it commits the CSVs when that block ends.
    """
    from cvtool.imagenet import label_names

    scorer = as_scorer(scorer)
    if not items:
        warn(f"no images found in {input}")
    k = resolve_top_k(top_k, scorer.num_classes)
    names = label_names(scorer.class_names, scorer.members[0].classifier.meta, label_format)
    identity = scorer_identity(scorer)
    identity["settings"]["label_format"] = label_format
    todo = job.open(items, prediction_header(k), {"command": desc, **identity})
    with Progress(len(todo), desc, quiet) as progress:
        for batch, probs in classify_batches(scorer, todo, batch_size):
            job.fail_all(batch.failures)
            for item, p, idx in zip(batch.items, probs, top_k_indices(probs, k)):
                job.write([item.rel, *prediction_cells(p, idx, names)])
            job.flush()
            progress.update(len(batch.items) + len(batch.failures))
    return RunResult(job.processed, job.failed, job.out, job.errors)
