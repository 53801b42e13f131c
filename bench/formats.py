"""Cost of the result formats: writing N predict rows as CSV (baseline), JSON Lines and Parquet.

    python bench/formats.py [--rows 200000] [--large 1600000]

Every format is written through the same CSV journal (flushed as predict flushes it, once per
32-row batch); JSON Lines and Parquet then convert it when the writer commits. Prints, for
each format, the seconds to write --rows top-3 rows and the ratio against CSV in the same run,
and the peak RSS of a fresh process writing --rows and --large rows as Parquet (the
conversion goes a row group at a time, so it must stay flat: exits 1 past 10%). No TensorFlow:
the rows are synthetic, as predict writes them.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEADER = ["path", "label", "score", "label_2", "score_2", "label_3", "score_3"]


def write(fmt: str, out: Path, rows: int) -> float:
    """Seconds to write ``rows`` predict-like rows to ``out`` in format ``fmt``, committed."""
    from cvtool.formats import FORMATS

    writer_class = FORMATS.get(fmt)
    start = time.perf_counter()
    with writer_class(out, HEADER, partial=out.with_name(out.name + ".part")) as writer:
        for i in range(rows):
            p = (i % 997) / 997
            writer.write(
                [
                    f"folder_{i // 1000:04d}/photo {i:07d}.jpg",
                    "shirt",
                    f"{p:.6f}",
                    "dress",
                    f"{(1 - p) / 2:.6f}",
                    "pullover",
                    f"{(1 - p) / 2:.6f}",
                ]
            )
            if i % 32 == 31:
                writer.flush()
    return time.perf_counter() - start


def child(fmt: str, rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write(fmt, Path(tmp) / f"preds.{fmt}", rows)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB (Linux reports KiB)


def peak_mib(fmt: str, rows: int) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--child", fmt, str(rows)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return float(done.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--large", type=int, default=1_600_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return 0
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        seconds = {fmt: write(fmt, Path(tmp) / f"preds.{fmt}", args.rows) for fmt in ("csv", "jsonl", "parquet")}
        sizes = {fmt: (Path(tmp) / f"preds.{fmt}").stat().st_size / 2**20 for fmt in seconds}
    for fmt, s in seconds.items():
        print(
            f"{fmt:8s} {args.rows} rows: {s:6.2f} s ({args.rows / s:9.0f} rows/s), {sizes[fmt]:6.1f} MiB, "
            f"{s / seconds['csv']:.2f}x the CSV's time"
        )
    small, large = peak_mib("parquet", args.rows), peak_mib("parquet", args.large)
    print(
        f"peak RSS writing Parquet: {args.large} rows {large:.1f} MiB vs {args.rows} rows {small:.1f} MiB: "
        f"ratio {large / small:.3f}"
    )
    return 0 if large <= 1.1 * small else 1


if __name__ == "__main__":
    sys.exit(main())
