"""`cvtool evaluate`: accuracy, rank-N, per-class report and confusion matrix on labelled images."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvtool.batches import Failure
from cvtool.bundle import Classifier
from cvtool.data import LAYOUTS, LabelledSet, read_class_folders, split_dirs
from cvtool.engines import EngineSettings
from cvtool.ensemble import ensemble_scorer
from cvtool.errors import UnusableError, UsageError
from cvtool.evaluation_report import MAX_REPORT_MAX, ReportSamples, remove_report, write_evaluation_report
from cvtool.fonts import text_fonts
from cvtool.images import InputItem
from cvtool.inference import prediction_cells, prediction_header, score_batches, top_k_indices
from cvtool.jobs import ERRORS_HEADER
from cvtool.locks import holds_output_lock
from cvtool.metrics import calibration, rank_accuracy, summarise, true_class_rank
from cvtool.outputs import CsvWriter, cell_path, path_cell, save_figure, write_csv, write_json
from cvtool.progress import Progress, warn
from cvtool.rules import ENSEMBLE_RULES, check_weights
from cvtool.scoring import Scorer
from cvtool.storage import fetch, is_url, redact, stages_output
from cvtool.tta import TtaOptions, view_index

METRICS_FILE = "metrics.json"
DEFAULT_RANKS = (1, 3, 5)
# Above this many classes (ImageNet's 1000), plots and the printed table keep only the classes that occur.
MAX_CLASSES_SHOWN_ALL = 50


@dataclass
class EvalResult:
    metrics: dict
    processed: int
    failed: int
    out_dir: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def labelled_from_folder(
    data: Path,
    class_names: list[str],
    split: str,
    wnids: list[str] | None = None,
    exclude: Path | None = None,
    layout: str = "auto",
) -> tuple[LabelledSet, str]:
    """The split to evaluate: ``auto`` takes test/, else validation/, else the whole folder.

    Class folders are named by class name or, for a model with WordNet ids
    (``imagenet:NAME``), by WordNet id as in ImageNet's own layout (``n01440764/``).
    ``exclude`` (evaluate's own output folder, when inside DATA) is never read as data.
    ``layout`` (auto, classes, splits) is :func:`cvtool.data.split_dirs`'s.
    """
    splits = split_dirs(data, layout, exclude)
    if split == "auto":
        chosen = splits.get("test") or splits.get("validation")
        if chosen is None and "train" in splits:
            raise UsageError(f"{data} has train/ but no test/ or validation/; pass --split train to evaluate on it")
    elif split == "all":
        chosen = None
    else:
        if split not in splits:
            raise UsageError(f"{data} has no {split}/ folder (found: {', '.join(sorted(splits)) or 'no splits'})")
        chosen = splits[split]
    folder = chosen or data
    try:
        _, labelled = read_class_folders(folder, class_names, exclude)
    except UnusableError:
        if not wnids:
            raise
        _, labelled = read_class_folders(folder, wnids, exclude)
    return labelled, str(folder)


class LabelIndex:
    """Labels from a CSV as class indices: a class name, a WordNet id, or a numeric id.

    A value that equals a class name wins (GTSRB's ``ClassId`` 10 is the class
    named "10", which need not be index 10); then a WordNet id of a model that
    has them (``imagenet:NAME``). An integer then matches the class whose name
    is that number written with or without leading zeros (``0`` is the folder
    ``00000``, as GTSRB's training folders are named); when no class name is a
    number, it is an index into the model's class order. Names are compared in
    Unicode NFC, so a label typed on macOS (NFD) matches. A value that names
    several classes (ImageNet's two "crane"s) raises :class:`AmbiguousLabel`.

    Example: ``LabelIndex(["00000", "00001"])("1")`` is 1.
    """

    def __init__(self, class_names: Sequence[str], wnids: Sequence[str] | None = None):
        self.by_name: dict[str, list[int]] = {}
        self.by_number: dict[int, list[int]] = {}
        for i, name in enumerate(class_names):
            name = _nfc(name)
            self.by_name.setdefault(name, []).append(i)
            if name.isascii() and name.isdigit():
                self.by_number.setdefault(int(name), []).append(i)
        self.by_wnid = {w: i for i, w in enumerate(wnids or [])}
        self.count = len(class_names)

    def __call__(self, value: str) -> int | None:
        value = _nfc(value.strip())
        if value in self.by_name:
            return _only(self.by_name[value], value)
        if value in self.by_wnid:
            return self.by_wnid[value]
        try:
            number = float(value)
        except ValueError:
            return None
        if not number.is_integer():
            return None
        if self.by_number:
            found = self.by_number.get(int(number))
            return _only(found, value) if found else None
        return int(number) if 0 <= number < self.count else None


def _only(indices: list[int], value: str) -> int:
    if len(indices) > 1:
        raise AmbiguousLabel(value)
    return indices[0]


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def label_index(value: str, class_names: list[str], wnids: list[str] | None = None) -> int | None:
    """One label as a class index (see :class:`LabelIndex`); build a LabelIndex once for many labels."""
    return LabelIndex(class_names, wnids)(value)


class AmbiguousLabel(ValueError):
    """A label that names several of the model's classes."""


LABEL_DELIMITERS = (",", ";", "\t", "|")


def parse_delimiter(text: str | None) -> str | None:
    """``--delimiter``: one character, ``tab`` (or ``\\t``); empty or None: detect it from the header."""
    if not text:
        return None
    if text.lower() in ("tab", "\\t"):
        return "\t"
    if len(text) != 1 or text in '\r\n"':
        raise UsageError(f"--delimiter takes one character (or 'tab'), got {text!r}")
    return text


def read_labels_rows(
    labels_csv: Path, columns: Sequence[str], delimiter: str | None = None
) -> list[tuple[int, dict[str, str]]]:
    """The rows of a labels CSV as (line number, {column: value}).

    Without ``delimiter``, it is the one among , ; tab | that splits the
    header into fields holding all ``columns`` (the original GTSRB files use
    ``;``, Kaggle's copies ``,``), else what :class:`csv.Sniffer` finds, else ``,``.
    """
    try:
        with open(labels_csv, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        header_line = text.splitlines()[0] if text else ""
        if delimiter is None:
            delimiter = _detect_delimiter(header_line, text[:65536], columns)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            shown = repr(delimiter) if delimiter != "\t" else "tab"
            raise UsageError(
                f"{labels_csv} has no column {', '.join(missing)} (columns split at {shown}: "
                f"{', '.join(header) or 'none'}); use --path-column / --label-column / --delimiter"
            )
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # blank line
            rows.append((reader.line_num, dict(zip(header, cells))))
        return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read labels file {labels_csv}: {exc}") from None


def _detect_delimiter(header_line: str, sample: str, columns: Sequence[str]) -> str:
    for d in LABEL_DELIMITERS:
        fields = [f.strip() for f in next(csv.reader([header_line], delimiter=d), [])]
        if all(c in fields for c in columns):
            return d
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(LABEL_DELIMITERS)).delimiter
    except csv.Error:
        return ","


def labelled_from_csv(
    data: Path,
    labels_csv: Path,
    path_column: str,
    label_column: str,
    class_names: list[str],
    wnids: list[str] | None = None,
    delimiter: str | None = None,
) -> tuple[LabelledSet, list[Failure]]:
    """Rows of a labels CSV as labelled items; rows that cannot be scored become failures (errors rows).

    A path is looked up relative to DATA, then relative to the labels file's
    folder (Kaggle's GTSRB: ``Test.csv`` beside ``Test/`` lists ``Test/00000.png``);
    either way the file must lie inside DATA. Each image is scored once: a
    repeated row with the same label is reported as a duplicate (the first
    counts); rows that give one image different labels are all refused.
    """
    rows = read_labels_rows(labels_csv, (path_column, label_column), delimiter)
    to_index = LabelIndex(class_names, wnids)
    root = data.resolve()
    bases = [data] if labels_csv.parent.resolve() == root else [data, labels_csv.parent]
    failures: list[Failure] = []
    found: dict[Path, list[tuple[int, InputItem, int, str]]] = {}  # image -> its rows (line, item, label, value)
    for line, row in rows:
        rel, value = (row.get(path_column) or "").strip(), (row.get(label_column) or "").strip()
        if not rel:
            failures.append(Failure(InputItem(data, ""), f"line {line}: the {path_column} cell is empty"))
            continue
        path, reason, rel = _find_labelled_file(rel, root, bases)
        item = InputItem(path if path is not None else data / rel, rel)
        if path is None:
            failures.append(Failure(item, reason))
            continue
        try:
            label = to_index(value)
        except AmbiguousLabel:
            failures.append(Failure(item, f"label {value!r} names several of the model's classes; use its id"))
            continue
        if label is None:
            failures.append(Failure(item, f"label {value!r} is not one of the model's classes"))
            continue
        found.setdefault(path.resolve(), []).append((line, item, label, value))
    out = LabelledSet()
    for entries in found.values():
        first_line, first, label, _ = entries[0]
        if len({e[2] for e in entries}) > 1:
            told = ", ".join(f"{v!r} (line {n})" for n, _, _, v in entries)
            failures += [
                Failure(item, f"conflicting labels for this image: {told}; not scored") for _, item, _, _ in entries
            ]
            continue
        out.items.append(first)
        out.labels.append(label)
        failures += [Failure(item, f"duplicate of line {first_line}; counted once") for _, item, _, _ in entries[1:]]
    return out, failures


def _find_labelled_file(rel: str, root: Path, bases: Sequence[Path]) -> tuple[Path | None, str, str]:
    """(the file a labels-CSV path names, or None and why; the path as outputs write it).

    Looked up under DATA, else under the labels file's folder. A cell written by cvtool
    (:func:`cvtool.outputs.path_cell`: ``caf\\xe9.jpg`` for a name that is not UTF-8) names the file
    it was written for, so a predictions CSV can serve as labels; the cell as written is tried first.
    """
    decoded = cell_path(rel)
    forms = list(dict.fromkeys((rel, decoded, _nfc(rel), unicodedata.normalize("NFD", rel))))
    outside = not (bases[0] / decoded).resolve().is_relative_to(root)
    for base in bases:
        for form in forms:
            path = base / form
            if os.path.lexists(path):
                if path.resolve().is_relative_to(root):
                    return path, "", decoded if form == decoded else rel
                outside = True
    if outside:
        return None, "path is outside the data folder; refused", decoded
    where = " or the labels file's folder" if len(bases) > 1 else ""
    return None, f"file not found in the data folder{where}", decoded


@stages_output("out", folder=True)
@holds_output_lock("out", folder=True)
def evaluate(
    model: str | Path | Classifier | Sequence[str | Path | Classifier],
    data: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    path_column: str = "path",
    label_column: str = "label",
    delimiter: str | None = None,
    split: str = "auto",
    layout: str = "auto",
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    top_k: int = 3,
    batch_size: int = 32,
    overwrite: bool = False,
    quiet: bool = False,
    unsafe_load: bool = False,
    weights: str | Path | None = None,
    runtime: str = "auto",
    tta: TtaOptions | None = None,
    rule: str | None = None,
    rule_weights: Sequence[float] | None = None,
    engine: str | EngineSettings | None = None,
    report: bool = True,
    report_max: int = 100,
    explain: int = 0,
) -> EvalResult:
    """Evaluate a model on a labelled folder (or a flat folder plus a labels CSV); write reports to ``out``.

    Several models (or an ensemble run directory) are combined by ``rule``; with them or with ``tta``,
    ``metrics.json`` also compares each member alone, the combination and the TTA gain side by side.
    An evaluation in which no image could be scored is refused (:class:`UnusableError`, exit 3)
    rather than reported as accuracy 0; its ``errors.csv`` says why.

    Args:
        model: a run directory, ``.keras`` file, ``imagenet:NAME`` or classifier, or a list of them.
        data: a labelled folder (class folders, or train/validation/test splits), or with ``labels``
            any folder of images.
        out: the report folder (metrics.json, confusion matrices, predictions, misclassified, errors).
        labels: a CSV of paths (relative to ``data``, else to its own folder) and labels.
        path_column: the path column of ``labels``.
        label_column: the label column of ``labels`` (class names, WordNet ids or numeric ids).
        delimiter: the field delimiter of ``labels`` (default: detected from its header).
        split: ``auto`` (test/, else validation/, else all), ``test``, ``validation``, ``train`` or ``all``.
        layout: how ``data``'s folders are read (auto, classes, splits).
        ranks: the N of rank-N (top-N) accuracy.
        top_k: classes per row of predictions.csv.
        batch_size: images per batch.
        overwrite: replace existing reports.
        quiet: no progress bar or log lines.
        unsafe_load: allow models with Lambda layers or custom code.
        weights: a local weights file (or folder) for an ``imagenet:NAME`` model.
        runtime: what runs each model: ``auto`` (a run's fastest export, else TF), ``tf``, ``tflite``, ``onnx``.
        tta: also score the TTA views (which must include identity) and report the gain.
        rule: how several models are combined; None: mean, or a single ensemble run's own rule.
        rule_weights: the weighted rule's weights, one per model.
        engine: where the scoring runs: ``local`` or ``ray`` (:mod:`cvtool.engines`); None: ``$CVTOOL_ENGINE``.
        report: write ``report.html`` (and ``report_files/``), see :mod:`cvtool.evaluation_report`.
        report_max: misclassified images shown in the report, the most confident first.
        explain: Grad-CAM overlays in the report for this many of the most confident errors
            (of the first model).

    Example: ``evaluate("runs/clothes", "photos/", "reports/", ranks=(1, 5)).metrics["accuracy"]``.
    """
    given = {"data": str(data), "labels": str(labels)}
    data, out_dir = Path(fetch(data, "data")), Path(out)  # DATA or --labels as URLs: fetched to the cache
    labels = fetch(labels, "files") if labels is not None else None
    if not data.is_dir():
        raise UsageError(f"data folder not found: {data}")
    if labels is not None and not Path(labels).is_file():
        raise UsageError(f"labels file not found: {labels}")
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not 0 <= report_max <= MAX_REPORT_MAX:
        raise UsageError(f"--report-max must be between 0 and {MAX_REPORT_MAX}, got {report_max}")
    if explain < 0:
        raise UsageError(f"--explain must not be negative, got {explain}")
    if any(k < 1 for k in ranks):
        raise UsageError("--rank values must be at least 1")
    if tta is not None and "identity" not in tta.transforms:
        raise UsageError("evaluate --tta needs identity among --transforms, to measure the gain over plain predictions")
    if rule is not None:  # before loading the models
        ENSEMBLE_RULES.entry(rule)
        check_weights(rule, rule_weights)
    if (out_dir / METRICS_FILE).exists() and not overwrite:  # the folder itself is made when work starts
        raise UsageError(f"{out_dir / METRICS_FILE} already exists; pass --overwrite to replace it")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    scorer = ensemble_scorer(
        models,
        rule=rule,
        rule_weights=rule_weights,
        tta=tta,
        unsafe_load=unsafe_load,
        weights=weights,
        runtime=runtime,
    )
    names = scorer.class_names
    wnids = scorer.members[0].classifier.meta.get("wnids")
    comparing = len(scorer.members) > 1 or tta is not None
    if labels is not None:
        labelled, failures = labelled_from_csv(
            data, Path(labels), path_column, label_column, names, wnids, parse_delimiter(delimiter)
        )
        source = str(labels)
    else:
        (labelled, source), failures = labelled_from_folder(data, names, split, wnids, out_dir, layout), []
    if len(labelled) == 0 and not failures:
        raise UsageError(f"no labelled images found in {source}")
    if len(labelled) == 0:
        errors_csv = write_csv(out_dir / "errors.csv", ERRORS_HEADER, ([f.item.rel, f.reason] for f in failures))
        raise UnusableError(
            f"no usable rows in {source}: all {len(failures)} failed (first: {failures[0].item.rel or '-'}: "
            f"{failures[0].reason}); see {errors_csv}"
        )
    label_of = {id(item): label for item, label in zip(labelled.items, labelled.labels)}
    k = min(max(top_k, 1), len(names))
    y_true, y_pred, ranks_seen, p_true, confidence = [], [], [], [], []
    compare = Comparison(scorer, tta) if comparing else None
    samples = ReportSamples(report_max, len(names)) if report else None
    header = ["path", "true", *prediction_header(k)[1:]]
    with (
        CsvWriter(out_dir / "predictions.csv", header) as rows,
        CsvWriter(out_dir / "misclassified.csv", header) as wrong,
        CsvWriter(out_dir / "errors.csv", ERRORS_HEADER) as errors,
        Progress(len(labelled), "evaluate", quiet) as progress,
    ):
        for f in failures:
            errors.write([path_cell(f.item.rel), f.reason])
            warn(f"{path_cell(f.item.rel)}: {f.reason}")
        for batch, member_probs in score_batches(scorer, labelled.items, batch_size, engine):
            probs = scorer.reduce_views_then_members(member_probs)
            for f in batch.failures:
                errors.write([path_cell(f.item.rel), f.reason])
                warn(f"{path_cell(f.item.rel)}: {f.reason}")
            failures += batch.failures
            if batch.items:
                truth = np.array([label_of[id(item)] for item in batch.items])
                idx = top_k_indices(probs, k)
                for item, t, p, i in zip(batch.items, truth, probs, idx):
                    row = [path_cell(item.rel), names[t], *prediction_cells(p, i, names)]
                    rows.write(row)
                    if i[0] != t:
                        wrong.write(row)
                y_true.extend(truth)
                y_pred.extend(idx[:, 0])
                ranks_seen.extend(true_class_rank(probs, truth))
                p_true.extend(probs[np.arange(len(truth)), truth])
                confidence.extend(probs.max(axis=1))
                if samples is not None:
                    samples.add(batch.items, truth, probs)
                if compare is not None:
                    compare.add(member_probs, truth)
            progress.update(len(batch.items) + len(batch.failures))
    if not y_true:
        raise UnusableError(
            f"none of the {len(labelled)} labelled images in {source} could be read; see {out_dir / 'errors.csv'}"
        )
    metrics, cm = summarise(y_true, y_pred, ranks_seen, p_true, names, ranks)
    for name, local in (("data", str(data)), ("labels", str(labels))):  # URLs are reported, not cache paths
        if is_url(given[name]) and source.startswith(local):
            source = redact(given[name]).rstrip("/") + source[len(local) :]
    metrics = {"model": scorer.source, "data": source, "failed": len(failures), **metrics}
    confidence, correct = np.asarray(confidence, float), np.asarray(y_true) == np.asarray(y_pred)
    cal = calibration(confidence, correct)
    metrics.update(ece=cal["ece"], calibration=cal)
    if compare is not None:
        metrics.update(compare.metrics(names, ranks))
    write_json(out_dir / METRICS_FILE, metrics)
    write_csv(
        out_dir / "confusion_matrix.csv", ["true\\predicted", *names], ([n, *r] for n, r in zip(names, cm.tolist()))
    )
    keep = classes_shown(cm)
    cm_shown, names_shown = cm[np.ix_(keep, keep)], [names[i] for i in keep]
    plot_confusion(cm_shown, names_shown, out_dir / "confusion_matrix.png", normalise=False)
    plot_confusion(cm_shown, names_shown, out_dir / "confusion_matrix_normalized.png", normalise=True)
    if samples is not None:
        write_evaluation_report(
            out_dir,
            metrics=metrics,
            cm=cm,
            names=names,
            samples=samples,
            confidence=confidence,
            correct=correct,
            failures=failures,
            classifier=scorer.members[0].classifier,
            explain=explain,
        )
    else:  # an earlier run's page would contradict this run's metrics.json
        remove_report(out_dir)
    return EvalResult(metrics, len(y_true), len(failures), out_dir)


def classes_shown(cm: np.ndarray) -> np.ndarray:
    """Class indices to plot: all of them, or for many classes those that are true or predicted at least once."""
    if len(cm) <= MAX_CLASSES_SHOWN_ALL:
        return np.arange(len(cm))
    return np.flatnonzero(cm.sum(axis=0) + cm.sum(axis=1))


class Comparison:
    """Each member alone and the combination, without and with TTA, scored from the same forward passes."""

    def __init__(self, scorer: Scorer, tta: TtaOptions | None):
        self.scorer, self.tta = scorer, tta
        self.plain_view = view_index(tta, "identity") if tta is not None else 0
        labels, seen = [], set()
        for i, m in enumerate(scorer.members):
            label = m.classifier.source or f"model-{i + 1}"
            label = label if label not in seen else f"{label} ({i + 1})"
            seen.add(label)
            labels.append(label)
        self.member_labels = labels
        self.truth: list[np.ndarray] = []
        self.probs: dict[str, list[np.ndarray]] = {}

    def variants(self, member_probs: np.ndarray) -> dict[str, np.ndarray]:
        s, plain = self.scorer, member_probs[:, :, self.plain_view : self.plain_view + 1]
        several = len(s.members) > 1
        out = {label: plain[:, i, 0] for i, label in enumerate(self.member_labels)}
        if several:
            out["ensemble"] = s.reduce_views_then_members(plain)
        if self.tta is not None:
            for i, label in enumerate(self.member_labels):
                out[f"{label} + tta"] = s.reduce_views_then_members(member_probs[:, i : i + 1])
            if several:
                out["ensemble + tta"] = s.reduce_views_then_members(member_probs)
        return out

    def add(self, member_probs: np.ndarray, truth: np.ndarray) -> None:
        self.truth.append(truth)
        for name, p in self.variants(member_probs).items():
            self.probs.setdefault(name, []).append(p)

    def metrics(self, names: list[str], ranks: tuple[int, ...]) -> dict:
        truth = np.concatenate(self.truth) if self.truth else np.zeros(0, int)
        table = {}
        for name, parts in self.probs.items():
            p = np.concatenate(parts)
            rank = true_class_rank(p, truth)
            table[name] = {
                "accuracy": float(np.mean(rank == 0)) if len(truth) else 0.0,
                "top_k_accuracy": {str(k): rank_accuracy(rank, k) for k in ranks if k <= len(names)},
            }
        out: dict = {"models": self.member_labels, "comparison": table}
        if len(self.scorer.members) > 1:
            out["rule"] = self.scorer.rule_name
        if self.tta is not None:
            out["tta"] = dataclasses.asdict(self.tta)
            out["tta_gain"] = {
                name[: -len(" + tta")]: table[name]["accuracy"] - table[name[: -len(" + tta")]]["accuracy"]
                for name in table
                if name.endswith(" + tta")
            }
        return out


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, normalise: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = cm.astype(float)
    if normalise:
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    n = len(names)
    side = min(max(4.0, 0.45 * n + 2), 30.0)
    with text_fonts(names):  # class names in any script (CJK ones too), no glyph warnings
        fig, ax = plt.subplots(figsize=(side, side))
        shown = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalise else max(values.max(), 1))
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalise else "images")
        ax.set_xticks(range(n), names, rotation=90 if n > 6 else 45, ha="right" if n <= 6 else "center")
        ax.set_yticks(range(n), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("confusion matrix" + (" (row-normalised)" if normalise else " (counts)"))
        if n <= 30:
            threshold = values.max() / 2 if values.max() else 0.5
            for i in range(n):
                for j in range(n):
                    text = f"{values[i, j]:.2f}" if normalise else str(int(values[i, j]))
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if values[i, j] > threshold else "black",
                    )
        out = save_figure(fig, path)
        plt.close(fig)
    return out


def format_comparison(metrics: dict) -> str:
    """Members alone, the combination and TTA side by side (accuracy, rank-N, TTA gain)."""
    table = metrics.get("comparison")
    if not table:
        return ""
    ks = list(next(iter(table.values()))["top_k_accuracy"])
    width = max(len(n) for n in table) + 2
    gain = metrics.get("tta_gain", {})
    lines = [f"{'model':<{width}}  accuracy  " + "  ".join(f"top-{k:<4}" for k in ks) + ("  tta gain" if gain else "")]
    for name, r in table.items():
        cells = "  ".join(f"{v:8.4f}" for v in r["top_k_accuracy"].values())
        extra = f"  {gain[name]:+8.4f}" if name in gain else ""
        lines.append(f"{name:<{width}}  {r['accuracy']:8.4f}  {cells}{extra}")
    return "\n".join(lines)


def format_summary(metrics: dict) -> str:
    lines = [f"samples {metrics['samples']}  accuracy {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}"]
    ranks = "  ".join(f"top-{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items())
    if ranks:
        lines.append(ranks)
    width = max([len(n) for n in metrics["per_class"]] + [12])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    many = len(metrics["per_class"]) > MAX_CLASSES_SHOWN_ALL
    for name, r in metrics["per_class"].items():
        if many and not r["support"]:
            continue
        lines.append(f"{name:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  {r['support']:7d}")
    hidden = sum(1 for r in metrics["per_class"].values() if not r["support"]) if many else 0
    if hidden:
        lines.append(f"({hidden} classes without samples not listed; metrics.json has them all)")
    for key in ("macro_avg", "weighted_avg"):
        r = metrics[key]
        lines.append(f"{key:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  {r['support']:7d}")
    comparison = format_comparison(metrics)
    if comparison:
        lines += ["", comparison]
    return "\n".join(lines)
