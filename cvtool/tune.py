"""`cvtool tune`: a hyper-parameter search with Keras Tuner, every trial a normal `cvtool train` run.

Keras Tuner's oracle (random search, Hyperband or Bayesian optimisation) proposes the
values; each trial builds a :class:`~cvtool.config.TrainConfig` from them and runs
:func:`cvtool.train.train` into ``DIR/trials/ID/`` (same data pipeline, callbacks and
validation figures as ``cvtool train``). The oracle's own state lives in
``DIR/keras_tuner/``, so a killed search resumes where it stopped (``--resume``): finished
trials are kept, the interrupted one is run again (continuing its run from its last epoch).
After every trial ``DIR/trials.csv`` (one row per finished trial), ``DIR/best.json`` and
``DIR/best/`` (a copy of the best trial's run, a MODEL every command takes) are rewritten.

Importing this module imports neither TensorFlow nor Keras Tuner (``--help`` reads :data:`TUNERS`).

Example::

    tune("photos/", "search/", tuner="bayesian", max_trials=10, epochs=5)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from cvtool.config import TrainConfig
from cvtool.errors import CvtoolError, UsageError
from cvtool.locks import OutputLock
from cvtool.outputs import write_csv, write_json
from cvtool.progress import info
from cvtool.registry import Registry

TUNERS = Registry("--tuner")  # name -> function(kt, objective, max_trials, epochs, seed, space) -> oracle
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min"}
PROJECT = "keras_tuner"  # Keras Tuner's folder inside DIR (oracle state, one folder per trial)
TRIALS_DIR, BEST_DIR, TRIALS_FILE, BEST_FILE, SETTINGS_FILE = "trials", "best", "trials.csv", "best.json", "tune.json"
DEFAULT_IMAGE_SIZES = (48, 64)
# What the search varies: name -> (kind, arguments) for keras_tuner.HyperParameters; see search_space().
SPACE = {
    "lr": ("Float", {"min_value": 1e-4, "max_value": 1e-2, "sampling": "log"}),
    "optimizer": ("Choice", {"values": ["adam", "rmsprop", "sgd"]}),
    "batch_size": ("Choice", {"values": [16, 32, 64]}),
    "dropout": ("Float", {"min_value": 0.0, "max_value": 0.6, "step": 0.1}),
    "width": ("Choice", {"values": [16, 32, 48]}),
    "depth": ("Int", {"min_value": 1, "max_value": 3}),
    "augment": ("Float", {"min_value": 0.0, "max_value": 0.3, "step": 0.05}),
}


@TUNERS.register("random", help="keras_tuner.RandomSearch")
def _random(kt, objective, max_trials: int, epochs: int, seed: int, space):
    return kt.oracles.RandomSearchOracle(objective=objective, max_trials=max_trials, seed=seed, hyperparameters=space)


@TUNERS.register("hyperband", help="Hyperband: successive halving over epochs")
def _hyperband(kt, objective, max_trials: int, epochs: int, seed: int, space):
    oracle = kt.oracles.HyperbandOracle(objective=objective, max_epochs=epochs, seed=seed, hyperparameters=space)
    oracle.max_trials = max_trials  # Hyperband has no trial budget of its own: stop after --max-trials too
    return oracle


@TUNERS.register("bayesian", help="BayesianOptimization: a Gaussian process")
def _bayesian(kt, objective, max_trials: int, epochs: int, seed: int, space):
    return kt.oracles.BayesianOptimizationOracle(
        objective=objective, max_trials=max_trials, seed=seed, hyperparameters=space
    )


def keras_tuner():
    """The keras_tuner module; missing, a usage error naming the extra that installs it."""
    try:
        import keras_tuner
    except ImportError:
        raise UsageError('cvtool tune needs Keras Tuner: pip install "cvtool[tune]"') from None
    return keras_tuner


def search_space(kt, image_sizes) -> object:
    """The HyperParameters every trial draws from: :data:`SPACE` plus ``image_size`` among ``image_sizes``."""
    hp = kt.HyperParameters()
    for name, (kind, args) in SPACE.items():
        getattr(hp, kind)(name, **args)
    hp.Choice("image_size", [int(s) for s in image_sizes])
    return hp


def trial_config(base: TrainConfig, values: dict, *, epochs: int, objective: str) -> TrainConfig:
    """``base`` with a trial's values: ``augment`` s sets zoom and shift to s and rotation to s / 4.

    Example: ``trial_config(TrainConfig(), {"lr": 3e-3, "augment": 0.1}, epochs=3, objective="val_loss")``.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"augment"}  # augment: a strength, below
    known = {k: v for k, v in values.items() if k in fields}
    cfg = dataclasses.replace(base, **known, epochs=epochs, monitor=objective, checkpoint="none")
    if "augment" in values:
        s = float(values["augment"])
        cfg.augment = dataclasses.replace(base.augment, zoom=s, shift=s, rotation=s / 4)
    return cfg


@dataclass
class TuneResult:
    out: Path
    trials: int  # finished trials
    best: dict | None  # best.json's content


def tune(
    data: str | Path,
    out: str | Path,
    *,
    tuner: str = "random",
    max_trials: int = 10,
    epochs: int = 5,
    objective: str = "val_accuracy",
    image_sizes=DEFAULT_IMAGE_SIZES,
    base: TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> TuneResult:
    """Search learning rate, optimizer, batch size, dropout, small-cnn width/depth, augmentation and image size.

    Args:
        data: the labelled folder, as for :func:`cvtool.train.train` (it needs validation images).
        out: the search folder: trials.csv, best.json, best/, trials/ID/, keras_tuner/, tune.json.
        tuner: a :data:`TUNERS` name.
        max_trials: how many trials in all (with ``resume``, finished ones count).
        epochs: epochs per trial (Hyperband: the most one trial gets).
        objective: ``val_accuracy`` (maximised) or ``val_loss`` (minimised).
        image_sizes: the square sides the search chooses among.
        base: every option the search does not vary (default ``TrainConfig()``; small-cnn).
        resume: continue the search in ``out`` (Keras Tuner's state); finished trials are not run again.
        overwrite: replace a search already in ``out``.
        quiet: no progress lines.

    Returns:
        A :class:`TuneResult`.

    Usage: ``tune("photos/", "search/", max_trials=3, epochs=1)``.
    """
    from cvtool.train import validate_train

    TUNERS.entry(tuner)
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if max_trials < 1 or epochs < 1:
        raise UsageError("--max-trials and --epochs must be at least 1")
    if tuner == "hyperband" and epochs < 2:
        raise UsageError("--tuner hyperband needs --epochs 2 or more (it trains trials for a fraction of them first)")
    sizes = sorted({int(s) for s in image_sizes})
    base = base or TrainConfig()
    for side in sizes:
        validate_train(dataclasses.replace(base, image_size=side))
    kt = keras_tuner()
    out = Path(out)
    settings = {"tuner": tuner, "objective": objective, "epochs": epochs, "image_sizes": sizes, "seed": base.seed}
    role = os.environ.get("KERASTUNER_TUNER_ID", "") if os.environ.get("KERASTUNER_ORACLE_IP") else None
    if role is None:  # one machine: this process is the search's one writer
        with OutputLock(out, folder=True):
            _prepare(out, settings, resume=resume, overwrite=overwrite)
            return _search(kt, data, out, settings, base, max_trials, resume=resume, overwrite=overwrite, quiet=quiet)
    # chief and workers share --out (Keras Tuner's distributed mode): the chief prepares it, workers join it
    if role == "chief":
        _prepare(out, settings, resume=resume, overwrite=overwrite)
    return _search(kt, data, out, settings, base, max_trials, resume=resume, overwrite=False, quiet=quiet)


def _search(kt, data, out: Path, settings: dict, base, max_trials: int, *, resume, overwrite, quiet) -> TuneResult:
    """Run the oracle's trials (or, as a chief, serve them) and write the results."""
    tuner, objective, epochs = settings["tuner"], settings["objective"], settings["epochs"]
    space = search_space(kt, settings["image_sizes"])
    oracle = TUNERS.get(tuner)(kt, kt.Objective(objective, OBJECTIVES[objective]), max_trials, epochs, base.seed, space)
    search = Search(data, out, base, epochs=epochs, objective=objective, quiet=quiet)
    # Keras Tuner prints (stdout stays the command's) and writes its state files in place (made atomic here)
    with contextlib.redirect_stdout(sys.stderr), _atomic_state_files():
        runner = _tuner_class(kt)(search, oracle=oracle, directory=str(out), project_name=PROJECT, overwrite=overwrite)
        if resume:
            done = sum(1 for t in runner.oracle.trials.values() if t.status == "COMPLETED")
            info(f"resuming the search in {out}: {done} finished trials kept", quiet)
        runner.search(verbose=0)
    if search.fatal is not None:
        raise search.fatal
    return search.finish(runner.oracle) if not runner._is_worker() else TuneResult(out, 0, None)


def _prepare(out: Path, settings: dict, *, resume: bool, overwrite: bool) -> None:
    """The search folder: refuse to mix searches, clear one for --overwrite, check --resume's settings."""
    import json

    state = out / SETTINGS_FILE
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if resume:
        if not state.exists():
            raise UsageError(f"nothing to resume in {out}: no {SETTINGS_FILE} (start it without --resume)")
        stored = json.loads(state.read_text(encoding="utf-8"))
        for key, value in settings.items():
            if stored.get(key) != value:
                raise UsageError(f"{out} was searched with {key} {stored.get(key)!r}, not {value!r}; keep it")
        return
    if state.exists() or (out / PROJECT).exists():
        if not overwrite:
            raise UsageError(f"{out} already holds a search; pass --resume to continue it or --overwrite to replace it")
        for name in (PROJECT, TRIALS_DIR, BEST_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (TRIALS_FILE, BEST_FILE, SETTINGS_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_json(state, settings)


@contextlib.contextmanager
def _atomic_state_files():
    """Keras Tuner's JSON state (oracle.json, trial.json, the tuner's) written to a temporary name, then renamed.

    Keras Tuner 1.4 opens its state files with "w" and writes them: a search killed during that
    write leaves an empty oracle.json that no --resume can read. While the search runs, its
    ``utils.save_json`` (which every one of those saves goes through) writes beside the file and
    renames, so a kill leaves the old state or the new one.
    """
    import json

    from keras_tuner.src import utils

    original = utils.save_json

    def save_json(path, obj):
        if "://" in str(path):
            return original(path, obj)
        text = json.dumps(obj)
        tmp = f"{path}.{os.getpid()}.part"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return text

    utils.save_json = save_json
    try:
        yield
    finally:
        utils.save_json = original


def _tuner_class(kt):
    """A Keras Tuner whose trials are cvtool runs (BaseTuner: the oracle drives, :class:`Search` trains)."""

    class CvtoolTuner(kt.engine.base_tuner.BaseTuner):
        def __init__(self, search: Search, **kwargs):
            self.search_runs = search
            super().__init__(**kwargs)

        def run_trial(self, trial, *args, **kwargs):
            return self.search_runs.run_trial(trial)

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if not self._is_worker():
                self.search_runs.finish(self.oracle)

    return CvtoolTuner


class Search:
    """Runs trials as cvtool runs and writes trials.csv, best.json and best/ from the oracle's trials."""

    def __init__(self, data, out: Path, base: TrainConfig, *, epochs: int, objective: str, quiet: bool):
        self.data, self.out, self.base = data, Path(out), base
        self.epochs, self.objective, self.quiet = epochs, objective, quiet
        self.fatal: CvtoolError | None = None  # a usage or data error: stops the search, reported as it is

    def run_trial(self, trial) -> dict:
        """Train the trial's config into trials/ID/ (continuing an interrupted one) and return its val figures."""
        from cvtool.bundle import META_FILE
        from cvtool.callbacks import read_resume_point
        from cvtool.train import train

        kt = keras_tuner()
        values = dict(trial.hyperparameters.values)
        epochs = int(values.get("tuner/epochs", self.epochs))
        cfg = trial_config(self.base, values, epochs=epochs, objective=self.objective)
        run_dir = self.out / TRIALS_DIR / trial.trial_id
        shown = ", ".join(f"{k} {_cell(v)}" for k, v in values.items() if not k.startswith("tuner/"))
        info(f"trial {trial.trial_id} ({epochs} epochs): {shown}", self.quiet)
        resume = read_resume_point(run_dir) is not None and not (run_dir / META_FILE).exists()
        try:  # an interrupted trial (killed search) continues from its last epoch
            result = train(
                self.data, run_dir, cfg=cfg, resume=resume, overwrite=not resume, quiet=True, exclude=self.out
            )
        except CvtoolError as exc:
            self.fatal = exc
            raise kt.errors.FatalError(str(exc)) from exc
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the resume point: the trial is done
        metrics = result.metrics
        figures = {k: float(metrics[k]) for k in OBJECTIVES if k in metrics}
        if self.objective not in figures:
            self.fatal = UsageError("cvtool tune needs validation images (a validation/ folder or --val-split > 0)")
            raise kt.errors.FatalError(str(self.fatal))
        seconds = _history_seconds(run_dir)
        info(
            f"trial {trial.trial_id}: {self.objective} {figures[self.objective]:.4f} "
            f"(best epoch {metrics['best_epoch']}, {seconds:.0f} s)",
            self.quiet,
        )
        return {**figures, "best_epoch": float(metrics["best_epoch"]), "seconds": seconds}

    def finish(self, oracle) -> TuneResult:
        """trials.csv (every finished trial), best.json and best/ (a copy of the best trial's run)."""
        import json

        done = [t for t in oracle.trials.values() if t.status == "COMPLETED" and t.score is not None]
        done.sort(key=lambda t: t.trial_id)
        names = list(dict.fromkeys(k for t in done for k in t.hyperparameters.values))
        header = ["trial", *names, "best_epoch", "objective", *OBJECTIVES, "seconds"]

        def row(t):
            m = t.metrics
            hps = [_cell(t.hyperparameters.values.get(k, "")) for k in names]
            figures = [m.get_last_value(k) if m.exists(k) else "" for k in OBJECTIVES]
            best_epoch = int(m.get_last_value("best_epoch"))
            return [t.trial_id, *hps, best_epoch, t.score, *figures, round(m.get_last_value("seconds"), 3)]

        write_csv(self.out / TRIALS_FILE, header, (row(t) for t in done))
        if not done:
            return TuneResult(self.out, 0, None)
        best = oracle.get_best_trials(1)[0]
        previous = json.loads((self.out / BEST_FILE).read_text()) if (self.out / BEST_FILE).exists() else {}
        changed = previous.get("trial") != best.trial_id or not (self.out / BEST_DIR).exists()
        if changed:
            _copy_run(self.out / TRIALS_DIR / best.trial_id, self.out / BEST_DIR)
        summary = {
            "trial": best.trial_id,
            "objective": self.objective,
            "value": best.score,
            "best_epoch": int(best.metrics.get_last_value("best_epoch")),
            "hyperparameters": dict(best.hyperparameters.values),
            "run": BEST_DIR,
            "trials": len(done),
        }
        write_json(self.out / BEST_FILE, summary)
        if changed:
            where = self.out / BEST_DIR
            info(f"best so far: trial {best.trial_id}, {self.objective} {best.score:.4f} -> {where}", self.quiet)
        return TuneResult(self.out, len(done), summary)


def _copy_run(src: Path, dest: Path) -> None:
    """Replace ``dest`` by a copy of the run ``src`` (built aside, then renamed: never half a run)."""
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _history_seconds(run_dir: Path) -> float:
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as f:
        return float(sum(float(r["seconds"]) for r in csv.DictReader(f)))


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
