"""Peak memory of `cvtool predict` on 1,000 and on 20,000 images: it must stay flat (within 10%).

    python bench/memory.py [--photos DIR] [--small 1000] [--large 20000] [--batch-size 32]

Builds a small-cnn bundle (untrained weights: memory does not depend on them),
fills a temporary folder with hard links to a few real photos (samples/clothing
by default; any folder of JPEGs with --photos), runs predict over the first
1,000 and over all 20,000 in fresh subprocesses, and reads each one's peak RSS
from the kernel (os.wait4 rusage). Prints both figures and their ratio; exits 1
if the large run peaks more than 10% above the small one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_bundle(run_dir: Path, size: int = 64) -> None:
    from cvtool.architectures import small_cnn
    from cvtool.bundle import save_model, write_meta

    names = ["a", "b", "c"]
    save_model(small_cnn(len(names), (size, size)), run_dir / "model.keras")
    write_meta(run_dir, {"class_names": names, "image_size": [size, size], "arch": "small-cnn"})


def fill(folder: Path, photos: list[Path], n: int) -> None:
    """``n`` image files in sub-folders of 1,000: hard links (or copies) of ``photos``."""
    for i in range(n):
        sub = folder / f"part_{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        src, dst = photos[i % len(photos)], sub / f"img_{i:06d}{photos[i % len(photos)].suffix.lower()}"
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Run ``args``; (peak resident set size in MiB, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        sys.exit(f"predict failed with exit {code}: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports kilobytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=REPO / "samples" / "clothing")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    opts = parser.parse_args()
    photos = sorted(p for p in opts.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        sys.exit(f"no photos under {opts.photos}")
    with tempfile.TemporaryDirectory(prefix="cvtool-bench-") as tmp:
        tmp = Path(tmp)
        make_bundle(tmp / "run")
        fill(tmp / "small", photos, opts.small)
        fill(tmp / "large", photos, opts.large)
        results = {}
        for name, n in (("small", opts.small), ("large", opts.large)):
            cmd = [sys.executable, "-m", "cvtool", "predict", str(tmp / "run"), str(tmp / name)]
            cmd += ["--out", str(tmp / f"{name}.csv"), "-b", str(opts.batch_size), "-q"]
            mb, seconds = peak_rss_mb(cmd)
            rows = sum(1 for _ in open(tmp / f"{name}.csv")) - 1
            assert rows == n, (rows, n)
            results[name] = mb
            print(f"predict on {n:>6} images: peak RSS {mb:7.1f} MiB  ({seconds:.0f} s, {n / seconds:.0f} img/s)")
    ratio = results["large"] / results["small"]
    print(f"ratio large/small: {ratio:.3f} ({'flat' if ratio <= 1.10 else 'NOT flat'}: limit 1.10)")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
