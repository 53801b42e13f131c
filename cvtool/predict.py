"""`cvtool predict`: class probabilities for every image under INPUT, streamed to a CSV."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from cvtool.batches import Batch, batched
from cvtool.bundle import Classifier, load_classifier
from cvtool.images import InputItem, list_images, load_image
from cvtool.jobs import ERRORS_HEADER, BatchJob, RunResult, Shard, model_fingerprint  # noqa: F401 - re-exported
from cvtool.outputs import format_score
from cvtool.progress import Progress, warn


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
    classifier: Classifier, items: Iterable[InputItem], batch_size: int
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Decode ``items`` in parallel and run the model; yields each batch with its probabilities."""
    size = classifier.image_size
    for batch in batched(items, lambda item: load_image(item.path, size), batch_size):
        probs = classifier.predict(np.stack(batch.payloads)) if batch.items else np.zeros((0, classifier.num_classes))
        yield batch, probs


def resolve_top_k(k: int, num_classes: int) -> int:
    if k < 1:
        from cvtool.errors import UsageError

        raise UsageError("--top-k must be at least 1")
    return min(k, num_classes)


def predict(
    model: str | Path | Classifier,
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
    errors CSV beside ``out`` and never stop the run. ``label_format`` (name,
    wnid, both) and ``weights`` apply to ``imagenet:NAME`` models. ``resume``
    continues an interrupted run; ``shard`` ("K/N") does only this machine's
    share of ``input``.
    """
    from cvtool.imagenet import check_label_format, label_names

    check_label_format(label_format)
    job = BatchJob(out, overwrite=overwrite, resume=resume, shard=shard)
    items = list_images(input)
    if not items:
        warn(f"no images found in {input}")
    if isinstance(model, Classifier):
        classifier = model
    else:
        classifier = load_classifier(model, unsafe=unsafe_load, weights=weights)
    k = resolve_top_k(top_k, classifier.num_classes)
    names = label_names(classifier.class_names, classifier.meta, label_format)
    todo = job.open(items, prediction_header(k), {"command": "predict", "model": model_fingerprint(classifier)})
    with job, Progress(len(todo), "predict", quiet) as progress:
        for batch, probs in classify_batches(classifier, todo, batch_size):
            job.fail_all(batch.failures)
            for item, p, idx in zip(batch.items, probs, top_k_indices(probs, k)):
                job.write([item.rel, *prediction_cells(p, idx, names)])
            job.flush()
            progress.update(len(batch.items) + len(batch.failures))
    return RunResult(job.processed, job.failed, job.out, job.errors)
