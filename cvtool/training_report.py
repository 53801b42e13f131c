"""`train`'s and `finetune`'s ``RUN/report.html``: the data first, then the curves, the config and the metrics.

:class:`TrainingReport` writes the data inspection once, when the trainer starts (images per
class per split, a few thumbnails per class, unreadable files, a class-imbalance warning), and
rewrites the page at the end of every epoch (:class:`cvtool.callbacks.ReportWriter`) and when the
run finishes. While the run goes on the page reloads itself every minute, so a user can keep it open;
its curves picture is redrawn at most every :data:`PLOT_INTERVAL` seconds (the epoch table every epoch).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from cvtool.outputs import path_cell, save_figure
from cvtool.report import FILES_DIR, PAGE_FILE, Page, Thumb, files_folder, fmt
from cvtool.thumbnails import ThumbnailFolder

THUMBS_PER_CLASS = 4
IMBALANCE_RATIO = 3.0  # largest / smallest training class above this: a warning on the page
ERRORS_LISTED = 200
HISTORY_ROWS = 100  # the last epochs listed in the table (history.csv has them all)
REFRESH_SECONDS = 60
PLOT_INTERVAL = 5.0  # seconds: history.png is redrawn at most this often while training (epochs of tiny runs)


class TrainingReport:
    """The report page of one run, kept up to date by the trainer.

    Args:
        trainer: the :class:`cvtool.trainer.Trainer` (its run folder, data, config, callbacks).

    Example: ``TrainingReport(trainer).start()`` then ``.write()`` after each epoch, ``.write(final=True)``.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.inspection: list = []  # the data section's parts, made once
        self.toc: list = []
        self._plotted = (-math.inf, 0)  # when history.png was last drawn, and after which epoch

    def start(self) -> None:
        """Write the data inspection (thumbnails, class counts chart) and a first page."""
        t = self.trainer
        data, names = t.data, t.data.splits.class_names
        page = Page("")
        page.section("Data", "data")
        counts = {"train": np.bincount(data.train_set.labels, minlength=len(names))}
        if len(data.val_set.labels):
            counts["validation"] = np.bincount(data.val_set.labels, minlength=len(names))
        page.para(
            f"{len(data.train_set.labels)} training and {len(data.val_set.labels)} validation images of "
            f"{len(names)} classes at {data.image_size[1]}x{data.image_size[0]} ({data.splits.layout} layout); "
            f"{len(data.failures)} unreadable."
        )
        train_counts = counts["train"]
        if train_counts.min() and train_counts.max() / train_counts.min() > IMBALANCE_RATIO:
            big, small = names[int(train_counts.argmax())], names[int(train_counts.argmin())]
            weighting = "" if t.cfg.class_weight == "balanced" else "; --class-weight balanced evens out their losses"
            page.warning(
                f"Class imbalance: {big} has {int(train_counts.max())} training images, {small} only "
                f"{int(train_counts.min())} ({train_counts.max() / train_counts.min():.1f}x){weighting}."
            )
        with files_folder(t.run_dir) as files:
            page.plots([(f"{FILES_DIR}/{_counts_plot(counts, names, files)}", "images per class per split")])
            page.table(
                ["class", *counts, "total"],
                [
                    [n, *(int(c[i]) for c in counts.values()), int(sum(c[i] for c in counts.values()))]
                    for i, n in enumerate(names)
                ],
                numeric=range(1, len(counts) + 2),
            )
            page.heading(f"Training images, {THUMBS_PER_CLASS} per class")
            thumbs = ThumbnailFolder(files / "thumbs", f"{FILES_DIR}/thumbs")
            labels = np.asarray(data.train_set.labels)
            for c, name in enumerate(names):
                picked = [data.train_set.items[i] for i in np.flatnonzero(labels == c)[:THUMBS_PER_CLASS]]
                page.gallery(
                    [Thumb(thumbs.add(it.path), path_cell(it.rel), [f"class: {name}"]) for it in picked], name="class"
                )
        if data.failures:
            page.section(f"Unreadable files ({len(data.failures)})", "unreadable", "Unreadable")
            page.table(["path", "reason"], [[path_cell(f.item.rel), f.reason] for f in data.failures[:ERRORS_LISTED]])
            if len(data.failures) > ERRORS_LISTED:
                page.para(f"The first {ERRORS_LISTED} of {len(data.failures)}; errors.csv has them all.")
        self.inspection, self.toc = page.parts, page.toc
        self.write()

    def failed(self, exc: BaseException) -> None:
        """The run stopped on an error or a signal: a last page that says so and no longer reloads."""
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted (--resume continues the run)"
        self.write(final=True, failure=reason)

    def write(self, final: bool = False, failure: str | None = None) -> Path:
        """(Re)write report.html from history.csv and the trainer's state; ``final``: the run has finished
        (``failure``: on this error)."""
        from cvtool.trainer import plot_history

        t = self.trainer
        run_dir, total, done = t.run_dir, t.logger.epochs, max(t.epoch, t.stopper.last_epoch)
        state = f"finished after {done} epochs" if final else f"running: {done} of {total} epochs done"
        if failure is not None:
            state = f"stopped after {done} of {total} epochs: {failure}"
        best = t.metrics()
        if best.get("best_epoch"):
            shown = ", ".join(f"{k} {fmt(v)}" for k, v in best.items() if k in _SHOWN)
            state += f" · best epoch {best['best_epoch']}: {shown}"
        page = Page(f"{t.kind}: {t.run.target}", f"{t.cfg.arch} · {state}", refresh=0 if final else REFRESH_SECONDS)
        page.parts, page.toc = list(self.inspection), list(self.toc)
        page.section("Training curves", "curves")
        rows = _history_rows(run_dir)
        now = time.monotonic()
        if final:  # write_run_meta has just drawn it
            self._plotted = (now, done)
        elif rows and now - self._plotted[0] >= PLOT_INTERVAL:
            plot_history(run_dir, best_epoch=t.saver.best_epoch)
            self._plotted = (now, done)
        if rows and (run_dir / "history.png").exists():
            # the query makes a browser that reloads the page fetch the new picture, not its cached one
            page.plots(
                [(f"history.png?epoch={self._plotted[1]}", "loss and accuracy per epoch; best epoch and phases marked")]
            )
            keys = [k for k in rows[0] if k != "epoch"]
            page.table(
                ["epoch", *keys],
                [[r["epoch"], *(_cell(r.get(k, "")) for k in keys)] for r in rows[-HISTORY_ROWS:]],
                numeric=range(len(keys) + 1),
            )
        else:
            page.para("No epoch finished yet.", "empty")
        page.section("Config", "config")
        page.table(["option", "value"], _flat(t.cfg.to_dict()))
        page.section("Metrics" + ("" if final and failure is None else " (best so far)"), "metrics")
        metrics = t.metrics()
        if metrics.get("best_epoch"):
            items = [("best epoch", metrics["best_epoch"]), ("monitor", metrics["monitor"])]
            items += [(k, fmt(v)) for k, v in metrics.items() if k not in ("best_epoch", "monitor") and k in _SHOWN]
            page.cards(items)
        else:
            page.para("No epoch finished yet.", "empty")
        if final and t.stopper.stopped_epoch:
            page.para(f"Stopped early at epoch {t.stopper.stopped_epoch} (patience {t.cfg.patience}).")
        page.section("Files", "files")
        page.para("model.keras, cvtool.json, history.csv, errors.csv, checkpoints/, logs/ (TensorBoard).")
        return page.write(run_dir / PAGE_FILE)


_SHOWN = ("loss", "accuracy", "val_loss", "val_accuracy")


def _history_rows(run_dir: Path) -> list[dict]:
    import csv

    from cvtool.callbacks import HISTORY_FILE

    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cell(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4f}"


def _flat(config: dict, prefix: str = "") -> list[list]:
    rows = []
    for key, value in config.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", "" if value is None else value])
    return rows


def _counts_plot(counts: dict, names: list[str], files: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cvtool.fonts import text_fonts

    shown = list(range(len(names)))[:60]  # beyond that the table says it
    y = np.arange(len(shown))
    height = 0.8 / len(counts)
    with text_fonts(names):
        fig, ax = plt.subplots(figsize=(7, max(2.0, 0.35 * len(shown) * len(counts) / 1.5 + 1.2)))
        for i, (split, c) in enumerate(counts.items()):
            ax.barh(y + (i - (len(counts) - 1) / 2) * height, c[shown], height=height, label=split)
        ax.set_yticks(y, [names[i] for i in shown])
        ax.invert_yaxis()
        ax.set_xlabel("images")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(counts), fontsize=8, frameon=False)
        ax.set_title("images per class" + (" (first 60 classes)" if len(names) > 60 else ""), pad=22)
        save_figure(fig, files / "class_counts.png")
        plt.close(fig)
    return "class_counts.png"
