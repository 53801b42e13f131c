"""`cvtool predict`: class probabilities for every image under INPUT, streamed to a CSV.

A thin user of the scoring loop in :mod:`cvtool.inference`: it loads the model
(or ensemble run) as a :class:`~cvtool.scoring.Scorer` and writes its predictions.
"""

from __future__ import annotations

from pathlib import Path

from cvtool.bundle import Classifier
from cvtool.engines import EngineSettings
from cvtool.images import list_images
from cvtool.inference import write_predictions
from cvtool.jobs import BatchJob, RunResult, Shard
from cvtool.locks import holds_output_lock
from cvtool.scoring import Scorer, load_scorer
from cvtool.storage import stages_output


@stages_output("out")
@holds_output_lock("out")
def predict(
    model: str | Path | Classifier | Scorer,
    input: str | Path,
    out: str | Path,
    *,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    label_format: str = "name",
    weights: str | Path | None = None,
    runtime: str = "auto",
    resume: bool = False,
    shard: str | Shard | None = None,
    format: str | None = None,
    engine: str | EngineSettings | None = None,
) -> RunResult:
    """Write ``out`` (path,label,score,label_2,score_2,...) for every image under ``input``.

    Rows follow input order and are streamed to disk; bad files go to the
    errors CSV beside ``out`` and never stop the run.

    Args:
        model: a run directory, a ``.keras`` file, ``imagenet:NAME``, an ensemble run directory (its
            members are combined by its manifest's rule), or a loaded classifier or scorer.
        input: an image file, or a folder searched recursively.
        out: the predictions file to write (``.csv``, ``.jsonl`` or ``.parquet``).
        top_k: classes per row (capped at the class count).
        batch_size: images per batch.
        overwrite: replace an existing ``out``.
        quiet: no progress bar or log lines.
        unsafe_load: allow models with Lambda layers or custom code.
        label_format: ``name``, ``wnid`` or ``both``, for ``imagenet:NAME`` models.
        weights: a local weights file (or folder) for an ``imagenet:NAME`` model.
        runtime: what runs the model: ``auto`` (a run's fastest export, else TF), ``tf``, ``tflite``, ``onnx``.
        resume: continue an interrupted run from ``out``'s partial files.
        shard: ``"K/N"``: do only shard K of ``input``.
        format: ``csv``, ``jsonl`` or ``parquet`` (default: from ``out``'s suffix; see :mod:`cvtool.formats`).
        engine: where the scoring runs: ``local`` or ``ray`` (:mod:`cvtool.engines`); None: ``$CVTOOL_ENGINE``.

    Example: ``predict("runs/clothes", "incoming/", "preds.csv", top_k=1)``.
    """
    from cvtool.imagenet import check_label_format

    check_label_format(label_format)
    job = BatchJob(out, overwrite=overwrite, resume=resume, shard=shard, format=format)
    with job:
        items = list_images(input)
        scorer = (
            model
            if isinstance(model, Scorer)
            else load_scorer(model, unsafe=unsafe_load, weights=weights, runtime=runtime)
        )
        return write_predictions(
            scorer,
            items,
            job,
            command="predict",
            top_k=top_k,
            batch_size=batch_size,
            quiet=quiet,
            input=input,
            label_format=label_format,
            engine=engine,
        )
