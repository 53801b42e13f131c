"""Start-up: `cvtool --help`, and where the time of `cvtool predict` on one image goes.

python bench/startup.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine


def wall(cmd: list[str], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    help_s = wall([sys.executable, "-m", "cvtool", "--help"])
    print(f"cvtool --help: {help_s:.3f} s (best of 5; target < 0.3 s)")

    tmp = Path(tempfile.mkdtemp(prefix="cvtool-bench-start-"))
    phases = {}
    t = time.perf_counter()
    import cvtool.runtime  # noqa: F401

    phases["import TensorFlow + Keras"] = time.perf_counter() - t
    print(f"# startup on {machine()}")
    from common import mobilenet_run

    from cvtool.bundle import load_classifier
    from cvtool.predict import predict

    run = mobilenet_run(tmp / "run", ["a", "b"])
    image = next((REPO / "samples" / "clothing" / "validation").rglob("*.jpg"))
    t = time.perf_counter()
    clf = load_classifier(run)
    phases["load model.keras (MobileNetV2)"] = time.perf_counter() - t
    t = time.perf_counter()
    predict(clf, image, tmp / "one.csv", overwrite=True, quiet=True)
    phases["first predict call (trace + run + CSV)"] = time.perf_counter() - t
    t = time.perf_counter()
    predict(clf, image, tmp / "one.csv", overwrite=True, quiet=True)
    phases["second predict call (traced)"] = time.perf_counter() - t
    for name, secs in phases.items():
        print(f"  {name:<42} {secs:6.2f} s")
    one = wall(
        [
            sys.executable,
            "-m",
            "cvtool",
            "predict",
            str(run),
            str(image),
            "--out",
            str(tmp / "cli.csv"),
            "--overwrite",
            "-q",
        ],
        2,
    )
    print(f"cvtool predict on one image, whole process: {one:.2f} s")


if __name__ == "__main__":
    main()
