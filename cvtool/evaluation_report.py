"""`evaluate`'s ``report.html``: headline figures, comparison, confusion, per-class chart, galleries, calibration.

:class:`ReportSamples` is fed every scored batch by :func:`cvtool.evaluate.evaluate` and keeps only
what the page shows (the ``report_max`` most confident errors, a sample of correct images, each
image's top-1 confidence), so memory does not grow with the pictures of a large data set.
:func:`write_evaluation_report` then writes the page, its plots and thumbnails (see :mod:`cvtool.report`).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvtool.batches import Failure
from cvtool.errors import CvtoolError, ImageError
from cvtool.images import InputItem
from cvtool.outputs import path_cell, save_figure
from cvtool.progress import warn
from cvtool.report import FILES_DIR, PAGE_FILE, Page, Thumb, files_folder, fmt, link, percent
from cvtool.thumbnails import EXPLAIN_SIDE, ThumbnailFolder, shrink

DEFAULT_REPORT_MAX = 100
MAX_REPORT_MAX = 1000  # thumbnails of about 3 KB: a page with its pictures stays a few MB
CORRECT_SHOWN = 24  # correct images shown (at most; spread over the classes)
PAIRS_SHOWN = 8
PAIR_EXAMPLES = 4
ERRORS_LISTED = 200  # unreadable files listed on the page (errors.csv has them all)
MAX_CLASSES_CHARTED = 50


@dataclass(frozen=True)
class Sample:
    """One scored image the page may show."""

    item: InputItem
    true: int
    pred: int
    score: float  # the predicted class's probability


class ReportSamples:
    """The images a report shows, kept while evaluate scores: the most confident errors and some correct ones.

    Args:
        report_max: errors kept (the most confident ones).
        num_classes: the model's class count (correct images are spread over the classes).
    """

    def __init__(self, report_max: int, num_classes: int):
        self.report_max = report_max
        self.correct_max = min(report_max, CORRECT_SHOWN)
        self.per_class = max(1, -(-self.correct_max // max(num_classes, 1)))
        self._errors: list[tuple[float, int, Sample]] = []  # a min-heap on score: the weakest kept error on top
        self._correct: dict[int, list[Sample]] = {}
        self._seq = itertools.count()

    def add(self, items: Sequence[InputItem], truth: np.ndarray, probs: np.ndarray) -> None:
        pred = np.argmax(probs, axis=1)
        score = probs[np.arange(len(pred)), pred]
        for item, t, p, s in zip(items, truth, pred, score):
            sample = Sample(item, int(t), int(p), float(s))
            if p != t:
                entry = (float(s), -next(self._seq), sample)  # ties: the earlier image wins
                if len(self._errors) < self.report_max:
                    heapq.heappush(self._errors, entry)
                elif self.report_max and entry > self._errors[0]:
                    heapq.heapreplace(self._errors, entry)
            else:
                kept = self._correct.setdefault(int(t), [])
                if len(kept) < self.per_class:
                    kept.append(sample)

    @property
    def errors(self) -> list[Sample]:
        """The kept errors, most confident first."""
        return [e[2] for e in sorted(self._errors, reverse=True)]

    @property
    def correct(self) -> list[Sample]:
        """Up to ``correct_max`` correct images, in class order."""
        return [s for c in sorted(self._correct) for s in self._correct[c]][: self.correct_max]


def write_evaluation_report(
    out_dir: Path,
    *,
    metrics: dict,
    cm: np.ndarray,
    names: list[str],
    samples: ReportSamples,
    confidence: np.ndarray,
    correct: np.ndarray,
    failures: Sequence[Failure],
    classifier=None,
    explain: int = 0,
) -> Path:
    """Write ``out_dir/report.html`` and ``out_dir/report_files/`` for an evaluation.

    Args:
        out_dir: evaluate's folder (metrics.json, confusion_matrix*.png are already there).
        metrics: what metrics.json holds.
        cm: the confusion matrix (counts, [true, predicted]).
        names: class names in index order.
        samples: the images to show.
        confidence: every scored image's top-1 probability.
        correct: whether each was right.
        failures: unreadable files and refused rows.
        classifier: the model to explain with Grad-CAM (``explain`` > 0).
        explain: Grad-CAM overlays for this many of the most confident errors.

    Example: see :func:`cvtool.evaluate.evaluate`, which calls it unless ``report=False``.
    """
    from cvtool.evaluate import classes_shown

    title = f"evaluate: {metrics.get('model', '')}"
    page = Page(title, f"data {metrics.get('data', '')} · {metrics['samples']} images scored, {len(failures)} failed")
    with files_folder(out_dir) as files:
        thumbs = ThumbnailFolder(files / "thumbs", f"{FILES_DIR}/thumbs")
        _headline(page, metrics)
        if metrics.get("comparison"):
            _comparison(page, metrics)
        page.section("Confusion matrix", "confusion")
        keep = classes_shown(cm)
        if len(keep) < len(cm):
            page.para(f"{len(keep)} of {len(cm)} classes shown: those that are true or predicted at least once.")
        page.plots([("confusion_matrix.png", "counts"), ("confusion_matrix_normalized.png", "row-normalised (recall)")])
        page.section("Per-class precision, recall and F1", "per-class", "Per class")
        page.plots([(f"{FILES_DIR}/{_per_class_plot(metrics, files)}", "per class (support in brackets)")])
        _per_class_table(page, metrics)
        errors = samples.errors
        _pairs(page, cm, names, errors, thumbs)
        page.section(
            f"Misclassified images ({len(errors)} of {int(cm.sum() - np.trace(cm))})", "misclassified", "Misclassified"
        )
        page.para(
            f"The most confident errors first, at most {samples.report_max} (--report-max); "
            "misclassified.csv lists them all."
        )
        page.gallery([_thumb(s, names, thumbs, "wrong") for s in errors], "no misclassified images", "misclassified")
        if explain and errors:
            _explain(page, errors[:explain], names, classifier, thumbs)
        page.section(f"Correctly classified (a sample of {len(samples.correct)})", "correct", "Correct")
        page.gallery(
            [_thumb(s, names, thumbs, "right") for s in samples.correct], "no correctly classified images", "correct"
        )
        page.section("Calibration", "calibration")
        cal = metrics["calibration"]
        page.para(
            f"Expected calibration error (ECE, {cal['bins']} equal-width bins of top-1 confidence): {fmt(cal['ece'])}. "
            "A calibrated model is right 80% of the time when it says 80%."
        )
        page.plots(
            [
                (f"{FILES_DIR}/{_confidence_plot(confidence, correct, files)}", "top-1 confidence, right and wrong"),
                (f"{FILES_DIR}/{_reliability_plot(cal, files)}", "reliability diagram"),
            ]
        )
        if failures:
            _failures(page, failures)
        page.section("Files", "files")
        names_out = ["metrics.json", "predictions.csv", "misclassified.csv", "errors.csv", "confusion_matrix.csv"]
        page.parts.append("<p>" + " · ".join(link(n, n) for n in names_out) + "</p>")
    return page.write(out_dir / PAGE_FILE)


def remove_report(out_dir: Path) -> None:
    """Remove an earlier ``report.html`` and its ``report_files/`` (``--no-report --overwrite``)."""
    import shutil

    (Path(out_dir) / PAGE_FILE).unlink(missing_ok=True)
    shutil.rmtree(Path(out_dir) / FILES_DIR, ignore_errors=True)


def _headline(page: Page, metrics: dict) -> None:
    page.section("Headline", "headline")
    items = [("accuracy", fmt(metrics["accuracy"]))]
    items += [(f"top-{k} accuracy", fmt(v)) for k, v in metrics["top_k_accuracy"].items() if k != "1"]
    items += [
        ("loss (cross-entropy)", fmt(metrics["loss"])),
        ("macro F1", fmt(metrics["macro_avg"]["f1"])),
        ("weighted F1", fmt(metrics["weighted_avg"]["f1"])),
        ("ECE", fmt(metrics["ece"])),
        ("images", metrics["samples"]),
        ("failed", metrics["failed"]),
    ]
    page.cards(items)


def _comparison(page: Page, metrics: dict) -> None:
    page.section("Comparison", "comparison")
    table, gain = metrics["comparison"], metrics.get("tta_gain", {})
    ks = list(next(iter(table.values()))["top_k_accuracy"])
    ks = [k for k in ks if k != "1"]  # top-1 is the accuracy
    header = ["model", "accuracy", *(f"top-{k}" for k in ks), *(["TTA gain"] if gain else [])]
    rows = []
    for name, r in table.items():
        base = name[: -len(" + tta")] if name.endswith(" + tta") else None
        extra = [f"{gain[base]:+.4f}" if base in gain else ""] if gain else []
        rows.append([name, fmt(r["accuracy"]), *(fmt(r["top_k_accuracy"][k]) for k in ks), *extra])
    if metrics.get("rule"):
        page.para(f"Models combined by the rule {metrics['rule']}.")
    page.table(header, rows, numeric=range(1, len(header)))


def _per_class_table(page: Page, metrics: dict) -> None:
    per_class = metrics["per_class"]
    many = len(per_class) > MAX_CLASSES_CHARTED
    rows = [
        [n, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), r["support"]]
        for n, r in per_class.items()
        if r["support"] or not many
    ]
    for key in ("macro_avg", "weighted_avg"):
        r = metrics[key]
        rows.append(
            [key.replace("_avg", " average"), fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), r["support"]]
        )
    page.table(["class", "precision", "recall", "F1", "support"], rows, numeric=(1, 2, 3, 4))


def _thumb(s: Sample, names: list[str], thumbs: ThumbnailFolder, kind: str) -> Thumb:
    return Thumb(
        thumbs.add(s.item.path),
        path_cell(s.item.rel),
        [f"true: {names[s.true]}"],
        f"predicted: {names[s.pred]} {percent(s.score)}",
        kind,
    )


def _pairs(page: Page, cm: np.ndarray, names: list[str], errors: list[Sample], thumbs: ThumbnailFolder) -> None:
    page.section("Most confused pairs", "pairs")
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:PAIRS_SHOWN]
    pairs = [(int(i // len(cm)), int(i % len(cm))) for i in order if off.flat[i] > 0]
    if not pairs:
        page.para("No class was mistaken for another.", "empty")
        return
    total = max(int(off.sum()), 1)
    for t, p in pairs:
        n = int(off[t, p])
        page.heading(f"{names[t]} → {names[p]}: {n} image{'s' if n != 1 else ''} ({percent(n / total)} of the errors)")
        examples = [s for s in errors if s.true == t and s.pred == p][:PAIR_EXAMPLES]
        page.gallery([_thumb(s, names, thumbs, "wrong") for s in examples], "no example among the errors shown", "pair")


def _explain(page: Page, errors: list[Sample], names: list[str], classifier, thumbs: ThumbnailFolder) -> None:
    """Grad-CAM overlays (cvtool.cam, cvtool.heatmaps) of the predicted class, for the given errors."""
    from cvtool import heatmaps
    from cvtool.cam import CamModel
    from cvtool.images import load_with_original

    n = len(errors)
    page.section(
        f"Where the model looked: Grad-CAM of the {n} most confident error{'s' if n != 1 else ''}",
        "explain",
        "Grad-CAM",
    )
    try:
        if classifier is None:
            raise ValueError("no model to explain")
        cams = CamModel(classifier)
    except (CvtoolError, ValueError) as exc:
        warn(f"--explain skipped: {exc}")
        page.para(f"Grad-CAM not available: {exc}", "empty")
        return
    page.para(
        f"Heatmap of the predicted (wrong) class, method {cams.method_name}, layer {cams.layer_name}, "
        f"model {classifier.source}."
    )
    shown = []
    for s in errors:
        try:
            original, x = load_with_original(s.item.path, classifier.image_size)
        except ImageError:
            continue
        from PIL import Image

        small = np.asarray(shrink(Image.fromarray(original), EXPLAIN_SIDE))
        result = cams.compute(x[None], [s.pred])
        heat = heatmaps.resize_map(result.maps[0, 0], small.shape[:2])
        picture = heatmaps.render(small, heat, None, heatmaps.colormap("jet"), 0.5)
        src = thumbs.add_array(picture, EXPLAIN_SIDE)
        caption = [f"true: {names[s.true]}"]
        shown.append(
            Thumb(src, path_cell(s.item.rel), caption, f"predicted: {names[s.pred]} {percent(s.score)}", "wrong", True)
        )
    page.gallery(shown, "none of these images could be read again", "explain")


def _failures(page: Page, failures: Sequence[Failure]) -> None:
    page.section(f"Unreadable or refused ({len(failures)})", "failed", "Unreadable")
    rows = [[path_cell(f.item.rel) or "-", f.reason] for f in failures[:ERRORS_LISTED]]
    page.table(["path", "reason"], rows)
    if len(failures) > ERRORS_LISTED:
        page.para(f"The first {ERRORS_LISTED} of {len(failures)}; errors.csv has them all.")


# --- plots (matplotlib, Agg, as every plot of cvtool) -------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _per_class_plot(metrics: dict, files: Path) -> str:
    from cvtool.fonts import text_fonts

    plt = _pyplot()
    per_class = [
        (n, r)
        for n, r in metrics["per_class"].items()
        if r["support"] or len(metrics["per_class"]) <= MAX_CLASSES_CHARTED
    ]
    if len(per_class) > MAX_CLASSES_CHARTED:  # the weakest classes are the ones worth a look
        per_class = sorted(per_class, key=lambda nr: nr[1]["f1"])[:MAX_CLASSES_CHARTED]
    labels = [f"{n} ({r['support']})" for n, r in per_class]
    y = np.arange(len(per_class))
    with text_fonts(labels):
        fig, ax = plt.subplots(figsize=(7, max(2.2, 0.42 * len(per_class) + 1)))
        for i, (key, colour) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))):
            ax.barh(y + (i - 1) * 0.27, [r[key] for _, r in per_class], height=0.27, color=colour, label=key)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
        title = "precision, recall, F1"
        if len(per_class) < len(metrics["per_class"]):
            title += f" (the {len(per_class)} lowest F1)"
        ax.set_title(title, pad=22)
        save_figure(fig, files / "per_class.png")
        plt.close(fig)
    return "per_class.png"


def _confidence_plot(confidence: np.ndarray, correct: np.ndarray, files: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    bins = np.linspace(0, 1, 21)
    ax.hist(
        [confidence[correct], confidence[~correct]],
        bins=bins,
        stacked=True,
        color=["#2e7d32", "#c62828"],
        label=[f"right ({int(correct.sum())})", f"wrong ({int((~correct).sum())})"],
    )
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("images")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("confidence histogram")
    save_figure(fig, files / "confidence.png")
    plt.close(fig)
    return "confidence.png"


def _reliability_plot(cal: dict, files: Path) -> str:
    plt = _pyplot()
    bins = cal["bins"]
    edges = np.linspace(0, 1, bins + 1)
    count = np.asarray(cal["bin_count"])
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    has = count > 0
    ax.bar(
        edges[:-1][has],
        np.asarray(cal["bin_accuracy"])[has],
        width=1 / bins,
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="accuracy",
    )
    ax.bar(
        edges[:-1][has],
        (np.asarray(cal["bin_confidence"]) - np.asarray(cal["bin_accuracy"]))[has],
        bottom=np.asarray(cal["bin_accuracy"])[has],
        width=1 / bins,
        align="edge",
        color="#c62828",
        alpha=0.35,
        label="gap",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {cal['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, files / "reliability.png")
    plt.close(fig)
    return "reliability.png"
