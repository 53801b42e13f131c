"""`cvtool predict`: class probabilities for every image under INPUT, streamed to a CSV."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvtool.batches import Batch, batched
from cvtool.bundle import Classifier, ModelSet
from cvtool.images import InputItem, list_images
from cvtool.outputs import CsvWriter, check_writable, errors_path, format_score
from cvtool.progress import Progress, warn
from cvtool.scoring import Scorer, build_scorer, load_scorer

ERRORS_HEADER = ("path", "error")


@dataclass
class RunResult:
    """What a batch command did: rows written, inputs that failed, files written."""

    processed: int
    failed: int
    out: Path
    errors: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


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


def resolve_top_k(k: int, num_classes: int) -> int:
    if k < 1:
        from cvtool.errors import UsageError

        raise UsageError("--top-k must be at least 1")
    return min(k, num_classes)


def predict(
    model: str | Path | Classifier | Scorer,
    input: str | Path,
    out: str | Path,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
) -> RunResult:
    """Write ``out`` (path,label,score,label_2,score_2,...) for every image under ``input``.

    Rows follow input order and are streamed to disk; bad files go to the
    errors CSV beside ``out`` and never stop the run. ``model`` may be an
    ensemble run directory (its members are combined by its manifest's rule).
    """
    out = check_writable(out, overwrite)
    items = list_images(input)
    scorer = model if isinstance(model, Scorer) else load_scorer(model, unsafe=unsafe_load)
    return write_predictions(scorer, items, out, top_k, batch_size, quiet, "predict", input)


def write_predictions(
    scorer: Scorer | Classifier,
    items: Sequence[InputItem],
    out: Path,
    top_k: int,
    batch_size: int,
    quiet: bool,
    desc: str,
    input: str | Path = "",
) -> RunResult:
    """The predictions CSV and its errors CSV for ``items`` scored by ``scorer`` (predict, tta, ensemble)."""
    scorer = as_scorer(scorer)
    err_out = check_writable(errors_path(out), True)
    if not items:
        warn(f"no images found in {input}")
    k = resolve_top_k(top_k, scorer.num_classes)
    names = scorer.class_names
    failed = processed = 0
    with CsvWriter(out, prediction_header(k)) as rows, CsvWriter(err_out, ERRORS_HEADER) as errors:
        with Progress(len(items), desc, quiet) as progress:
            for batch, probs in classify_batches(scorer, items, batch_size):
                for f in batch.failures:
                    errors.write([f.item.rel, f.reason])
                    warn(f"{f.item.rel}: {f.reason}")
                for item, p, idx in zip(batch.items, probs, top_k_indices(probs, k)):
                    rows.write([item.rel, *prediction_cells(p, idx, names)])
                failed += len(batch.failures)
                processed += len(batch.items)
                progress.update(len(batch.items) + len(batch.failures))
    return RunResult(processed, failed, out, err_out)
