"""Predict from object storage: images/s from a local S3 server vs local disk, and peak memory on many objects.

    python bench/storage.py [--photos DIR] [--repeat 3] [--small 1000] [--large 20000] [--skip-memory]

Starts moto's S3 server (``python -m moto.server``) on 127.0.0.1 in its own process, so the
server and cvtool do not share a Python interpreter, and points cvtool at it through
``AWS_ENDPOINT_URL`` (fake keys). Speed: the same photos (clothing-small/validation by default)
predicted by a small-cnn bundle at 64 px from local disk and from ``s3://bench/photos``, in this
process after a warm-up, alternating, best of ``--repeat``; prints both and the ratio (target
>= 0.8x). Memory: ``--small`` and ``--large`` tiny PNG objects, predicted by fresh subprocesses
whose peak RSS is read from the kernel (``os.wait4``); prints both and their ratio (flat: <= 1.10).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import default_folder, machine, row  # noqa: E402
from memory import make_bundle, peak_rss_mb  # noqa: E402

BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    sys.exit("moto server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tiny_pngs(fs, prefix: str, n: int) -> None:
    """``n`` 16x16 PNG objects in sub-prefixes of 1,000, uploaded concurrently."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    fs.pipe({f"{prefix}/part_{i // 1000:03d}/img_{i:06d}.png": blobs[i % 16] for i in range(n)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=default_folder("validation"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true")
    opts = parser.parse_args()
    server, endpoint = start_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import s3fs

        from cvtool.images import list_images
        from cvtool.predict import predict

        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        fs.put(str(opts.photos) + "/", f"{BUCKET}/photos/", recursive=True)
        remote = f"s3://{BUCKET}/photos"
        n = len(list_images(opts.photos))
        assert [i.rel for i in list_images(remote)] == [i.rel for i in list_images(opts.photos)]
        print(f"{machine()}; {n} photos from {opts.photos}; load average {os.getloadavg()[0]:.1f}")
        with tempfile.TemporaryDirectory(prefix="cvtool-bench-") as tmp:
            tmp = Path(tmp)
            os.environ["CVTOOL_CACHE_DIR"] = str(tmp / "cache")
            make_bundle(tmp / "run")
            best = {"local disk": 0.0, "S3 (moto, 127.0.0.1)": 0.0}
            sources = {"local disk": opts.photos, "S3 (moto, 127.0.0.1)": remote}
            predict(tmp / "run", opts.photos, tmp / "warm.csv", batch_size=opts.batch_size, quiet=True)
            server_cpu = []  # the S3 server's CPU seconds per S3 run: it shares this machine's cores with cvtool
            for r in range(opts.repeat):
                for name, source in sources.items():
                    out = tmp / f"{r}-{name[:2]}.csv"
                    cpu = cpu_seconds(server.pid)
                    start = time.perf_counter()
                    predict(tmp / "run", source, out, batch_size=opts.batch_size, quiet=True)
                    best[name] = max(best[name], n / (time.perf_counter() - start))
                    if source == remote:
                        server_cpu.append(cpu_seconds(server.pid) - cpu)
            row("predict, photos on local disk", best["local disk"], "img/s")
            row(
                "predict, the same photos on S3",
                best["S3 (moto, 127.0.0.1)"],
                "img/s",
                "local disk",
                best["local disk"],
            )
            print(f"S3 server CPU per S3 run: {min(server_cpu):.1f} s ({1000 * min(server_cpu) / n:.1f} ms per object)")
            if opts.skip_memory:
                return 0
            peaks = {}
            for name, count in (("small", opts.small), ("large", opts.large)):
                tiny_pngs(fs, f"{BUCKET}/{name}", count)
                cmd = [sys.executable, "-m", "cvtool", "predict", str(tmp / "run"), f"s3://{BUCKET}/{name}"]
                cmd += ["--out", str(tmp / f"{name}.csv"), "-b", str(opts.batch_size), "-q"]
                mb, seconds = peak_rss_mb(cmd)
                rows = sum(1 for _ in open(tmp / f"{name}.csv")) - 1
                assert rows == count, (rows, count)
                peaks[name] = mb
                print(f"predict on {count:>6} S3 objects: peak RSS {mb:7.1f} MiB ({seconds:.0f} s)")
            ratio = peaks["large"] / peaks["small"]
            print(f"ratio large/small: {ratio:.3f} ({'flat' if ratio <= 1.10 else 'NOT flat'}: limit 1.10)")
            return 0 if ratio <= 1.10 else 1
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
