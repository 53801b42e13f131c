"""--resume and --shard for the commands that write image files (gradcam, segment), and tta's shards.

Each image file is written atomically before its index row(s), so an index
row always points at a finished file; an interrupted run keeps the index
partial, and --resume skips the inputs it holds. segment (and gradcam with
--top-k > 1) write several rows per input: a resumed run drops the last
input's rows, which a kill may have cut short, and does that input again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cvtool.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def data_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[1:]


def files_under(root: Path, suffix: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob(f"*{suffix}")}


@pytest.fixture(scope="module")
def noise(tmp_path_factory) -> Path:
    """40 noise PNGs of 128x96 in two folders (noise: every image has all three classes of the 1x1-conv model)."""
    root = tmp_path_factory.mktemp("noise")
    for i in range(40):
        folder = root / ("sub" if i % 3 == 0 else "")
        folder.mkdir(exist_ok=True)
        img = np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def segmented(noise, tools, tmp_path_factory) -> Path:
    """The uninterrupted, unsharded segment run: the reference."""
    out = tmp_path_factory.mktemp("seg") / "full"
    result = invoke("segment", noise, "--out", out, "--model", tools["segmodel"], "-q")
    assert result.exit_code == 0, result.output
    return out


def test_segment_kill_9_then_resume_gives_the_uninterrupted_result(noise, tools, segmented, tmp_path):
    out = tmp_path / "seg"
    args = ["segment", str(noise), "--out", str(out), "--model", str(tools["segmodel"]), "-b", "1", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "cvtool", *args], stderr=subprocess.DEVNULL)
    part = out / "pixels.csv.part"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if part.exists() and len(part.read_bytes().splitlines()) > 1 + 3 * 2:  # two images' rows at least
            break
        time.sleep(0.005)
    assert proc.poll() is None, "segment finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "pixels.csv").exists(), "a killed run must leave no complete-looking index"
    done = {line.split(",")[0] for line in data_lines(part)}
    assert 2 <= len(done) < 40

    again = invoke(*args)  # without --resume: refused, nothing touched
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "pixels.csv").read_bytes() == (segmented / "pixels.csv").read_bytes()
    assert data_lines(out / "errors.csv") == []
    assert files_under(out, ".mask.png") == files_under(segmented, ".mask.png")
    assert (out / "legend.png").exists() and not list(out.rglob("*.part"))
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    finished = invoke(*args[:-1], "--resume")  # a finished run: --resume has nothing to do and changes nothing
    assert finished.exit_code == 0 and "40 images done" in finished.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_segment_resume_drops_a_torn_last_image_and_redoes_it(noise, tools, segmented, tmp_path):
    out = tmp_path / "seg"
    shutil.copytree(segmented, out)
    lines = (segmented / "pixels.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 1 + 3 * 40  # three class rows per image
    # A kill after image 5's first row and in the middle of its second one; image 5's files were written.
    (out / "pixels.csv.part").write_text("".join(lines[: 1 + 3 * 5 + 1]) + lines[1 + 3 * 5 + 1][:7], encoding="utf-8")
    (out / "errors.csv.part").write_text("path,error\n", encoding="utf-8")
    (out / "pixels.csv").unlink()
    (out / "errors.csv").unlink()
    (out / "legend.png").unlink()
    order = [line.split(",")[0].rsplit(".", 1)[0] for line in lines[1::3]]
    masks = [out / f"{stem}.mask.png" for stem in order]
    before = [m.stat().st_mtime_ns for m in masks]
    time.sleep(0.01)
    result = invoke("segment", noise, "--out", out, "--model", tools["segmodel"], "--resume")
    assert result.exit_code == 0, result.output
    after = [m.stat().st_mtime_ns for m in masks]
    assert after[:5] == before[:5], "the five complete images are kept, not drawn again"
    assert all(a != b for a, b in zip(after[5:], before[5:])), "the torn image and the rest are done"
    assert (out / "pixels.csv").read_bytes() == (segmented / "pixels.csv").read_bytes()
    assert (out / "legend.png").exists()


def test_segment_shards_merge_to_the_unsharded_run(noise, tools, segmented, tmp_path):
    outs = [tmp_path / f"s{k}" for k in range(2)]
    for k, out in enumerate(outs):
        env = {"CVTOOL_SHARD": f"{k}/2"}
        result = runner.invoke(
            app, ["segment", str(noise), "--out", str(out), "--model", str(tools["segmodel"])], env=env
        )
        assert result.exit_code == 0, result.output
    sizes = [len({line.split(",")[0] for line in data_lines(out / "pixels.csv")}) for out in outs]
    assert sum(sizes) == 40 and min(sizes) > 0
    merged = tmp_path / "pixels.csv"
    result = invoke("merge", merged, *(out / "pixels.csv" for out in outs))
    assert result.exit_code == 0, result.output
    assert "40 images done" in result.output
    assert merged.read_bytes() == (segmented / "pixels.csv").read_bytes()
    assert data_lines(tmp_path / "pixels.errors.csv") == []
    union = {**files_under(outs[0], ".mask.png"), **files_under(outs[1], ".mask.png")}
    assert union == files_under(segmented, ".mask.png")
    twice = invoke("merge", tmp_path / "dup.csv", outs[0] / "pixels.csv", outs[0] / "pixels.csv")
    assert twice.exit_code == 3


def test_gradcam_top_k_resume_and_shards(trained_run, colour_data, tmp_path):
    images = colour_data / "validation"
    full = tmp_path / "full"
    base = ["gradcam", trained_run, images, "-k", "2", "-q"]
    assert invoke(*base, "--out", full).exit_code == 0
    lines = (full / "gradcam.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 1 + 2 * 36
    # an interrupted run: 4 inputs indexed, then the first of the 5th input's two rows
    out = tmp_path / "cam"
    out.mkdir()
    (out / "gradcam.csv.part").write_text("".join(lines[: 1 + 2 * 4 + 1]), encoding="utf-8")
    result = invoke(*base, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "gradcam.csv").read_bytes() == (full / "gradcam.csv").read_bytes()
    assert len(files_under(out, ".gradcam.jpg")) == 2 * (36 - 4), "kept inputs are not drawn again"

    shards = [tmp_path / f"g{k}" for k in range(3)]
    for k, shard in enumerate(shards):
        assert invoke(*base, "--out", shard, "--shard", f"{k}/3").exit_code == 0
    merged = tmp_path / "merged.csv"
    assert invoke("merge", merged, *(s / "gradcam.csv" for s in shards)).exit_code == 0
    assert merged.read_bytes() == (full / "gradcam.csv").read_bytes()
    missing = invoke("merge", tmp_path / "m2.csv", shards[0] / "gradcam.csv", shards[1] / "gradcam.csv")
    assert missing.exit_code == 3 and "2/3 missing" in missing.output


def test_tta_shards_merge_to_the_unsharded_run(trained_run, colour_data, tmp_path):
    images = colour_data / "validation"
    full = tmp_path / "full.csv"
    assert invoke("tta", trained_run, images, "--out", full, "-q").exit_code == 0
    shards = [tmp_path / f"t{k}.csv" for k in range(3)]
    for k, shard in enumerate(shards):
        assert invoke("tta", trained_run, images, "--out", shard, "--shard", f"{k}/3", "-q").exit_code == 0
    assert sum(len(data_lines(s)) for s in shards) == 36
    merged = tmp_path / "merged.csv"
    assert invoke("merge", merged, *shards).exit_code == 0
    assert merged.read_bytes() == full.read_bytes()
    predict = tmp_path / "p.csv"
    assert invoke("predict", trained_run, images, "--out", predict, "--shard", "0/3", "-q").exit_code == 0
    mixed = invoke("merge", tmp_path / "mixed.csv", predict, shards[1], shards[2])
    assert mixed.exit_code == 3, "predict and tta shards are different results"
