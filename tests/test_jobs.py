"""--resume, --shard K/N, cvtool merge and signals, on a real model and real files (and a real kill -9)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvtool.cli import app
from cvtool.errors import UsageError
from cvtool.images import InputItem
from cvtool.jobs import Shard, parse_shard, shard_of, take_shard
from cvtool.outputs import CsvWriter
from cvtool.predict import predict
from tests.conftest import COLOURS, colour_image
from tests.test_hostile import read_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """360 tiny images in nested folders, and two bad files."""
    root = tmp_path_factory.mktemp("many")
    colours = list(COLOURS.values())
    for i in range(360):
        folder = root / f"batch_{i % 6}"
        folder.mkdir(exist_ok=True)
        colour_image(colours[i % 3], size=(12, 12), seed=i).save(folder / f"img {i:03d}.png")
    (root / "batch_0" / "bad.jpg").write_bytes(b"not a jpeg")
    (root / "batch_3" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def reference(many, trained_run, tmp_path_factory) -> Path:
    """The uninterrupted, unsharded run."""
    out = tmp_path_factory.mktemp("ref") / "preds.csv"
    result = predict(trained_run, many, out, batch_size=8, quiet=True)
    assert result.processed == 360 and result.failed == 2
    return out


def cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_same_rows(got: Path, want: Path) -> None:
    """Same paths in the same order, same labels; scores equal up to float noise from other batch sizes."""
    a, b = read_rows(got), read_rows(want)
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b):
        assert x[1::2] == y[1::2]
        assert all(abs(float(p) - float(q)) < 1e-4 for p, q in zip(x[2::2], y[2::2]))


# --- sharding ------------------------------------------------------------------------------------------


def test_parse_shard():
    assert parse_shard("3/8") == Shard(3, 8) and parse_shard(None) is None and parse_shard("") is None
    for bad in ("8/8", "-1/4", "1", "a/b", "0/0", "1/2/3"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_shards_are_disjoint_covering_stable_and_independent_of_listing_order():
    items = [InputItem(Path(f"/x/{i}.jpg"), f"dir{i % 7}/ïmg {i}.jpg") for i in range(500)]
    shuffled = random.Random(0).sample(items, len(items))
    parts = [take_shard(items, Shard(k, 4)) for k in range(4)]
    assert sorted(i.rel for p in parts for i in p) == sorted(i.rel for i in items)
    assert all(len(p) > 80 for p in parts)  # roughly balanced
    for k in range(4):
        assert {i.rel for i in take_shard(shuffled, Shard(k, 4))} == {i.rel for i in parts[k]}
    # Pinned values: a different hash (e.g. Python's randomised hash()) would split machines differently.
    names = ("a.jpg", "b.jpg", "c.jpg", "photos/d.jpg", "ünï 日本.png")
    assert [shard_of(n, 10) for n in names] == [9, 2, 2, 8, 8]
    code = "from cvtool.jobs import shard_of; print([shard_of(f'{n}.jpg', 10) for n in 'abcdefgh'])"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == str([shard_of(f"{n}.jpg", 10) for n in "abcdefgh"])


def test_shards_union_equals_unsharded_run_and_merge_restores_it(many, reference, trained_run, tmp_path):
    shards = []
    for k in range(3):
        out = tmp_path / f"part{k}.csv"
        result = cli("predict", trained_run, many, "--out", out, "--shard", f"{k}/3", "-b", "8", "-q")
        assert result.exit_code in (0, 1)
        shards.append(out)
    rows = [r[0] for s in shards for r in read_rows(s)]
    assert len(rows) == len(set(rows)) and set(rows) == {r[0] for r in read_rows(reference)}
    merged = tmp_path / "merged.csv"
    result = cli("merge", merged, *reversed(shards))
    assert result.exit_code == 1 and "2 failed" in result.stderr  # the two bad files
    assert_same_rows(merged, reference)
    assert read_rows(tmp_path / "merged.errors.csv") == read_rows(reference.with_name("preds.errors.csv"))
    assert json.loads((tmp_path / "merged.job.json").read_text())["model"].startswith("sha256:")
    # A shell glob (part*.csv) also hands over each shard's errors CSV: those go with their shard.
    globbed = sorted(tmp_path.glob("part*.csv"))
    assert any(p.name.endswith(".errors.csv") for p in globbed)
    assert cli("merge", tmp_path / "globbed.csv", *globbed).exit_code == 1
    assert_same_rows(tmp_path / "globbed.csv", reference)

    # Refusals: the same shard twice, a missing shard, an existing output, an unknown CSV.
    assert cli("merge", tmp_path / "m2.csv", shards[0], shards[0], shards[1], shards[2]).exit_code == 3
    missing = cli("merge", tmp_path / "m3.csv", shards[0], shards[1])
    assert missing.exit_code == 3 and "2/3 missing" in missing.stderr
    assert cli("merge", tmp_path / "m3.csv", shards[0], shards[1], "--partial").exit_code == 1
    assert cli("merge", merged, *shards).exit_code == 2
    # Not even with --overwrite onto a shard's own errors CSV (which merge reads): exit 2, the shard intact.
    shard_errors = tmp_path / "part0.errors.csv"
    before = shard_errors.read_bytes()
    onto = cli("merge", shard_errors, *shards, "--overwrite")
    assert onto.exit_code == 2 and "would overwrite" in onto.stderr, onto.stderr
    assert shard_errors.read_bytes() == before
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label,score\n")
    assert cli("merge", tmp_path / "m4.csv", plain).exit_code == 3


def test_merge_refuses_duplicates_and_shards_from_different_models(many, trained_run, run_copy, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert cli("predict", trained_run, many / "batch_1", "--out", a, "-q").exit_code == 0
    assert cli("predict", trained_run, many / "batch_1", "--out", b, "-q").exit_code == 0
    dup = cli("merge", tmp_path / "m.csv", a, b)
    assert dup.exit_code == 3 and "more than one shard" in dup.stderr and not (tmp_path / "m.csv").exists()
    meta = json.loads((run_copy / "cvtool.json").read_text())
    meta["class_names"] = ["blue", "red", "green"]  # another model: same weights, other classes
    (run_copy / "cvtool.json").write_text(json.dumps(meta))
    c = tmp_path / "c.csv"
    assert cli("predict", run_copy, many / "batch_2", "--out", c, "-q").exit_code == 0
    other = cli("merge", tmp_path / "m.csv", a, c)
    assert other.exit_code == 3 and "different model" in other.stderr
    top2 = tmp_path / "top2.csv"
    assert cli("predict", trained_run, many / "batch_2", "--out", top2, "-k", "2", "-q").exit_code == 0
    assert cli("merge", tmp_path / "m.csv", a, top2).exit_code == 3


# --- resumable CSV --------------------------------------------------------------------------------------


def test_resumable_writer_drops_a_torn_last_line_and_keeps_the_rest(tmp_path):
    part = tmp_path / "out.csv.part"
    part.write_bytes(b'path,label\r\na.jpg,red\r\n"b,c.jpg",green\r\nd.jp')
    with CsvWriter(tmp_path / "out.csv", ["path", "label"], partial=part, resume=True) as w:
        assert w.kept == 2 and w.keys == {"a.jpg", "b,c.jpg"}
        w.write(["d.jpg", "blue"])
    assert read_rows(tmp_path / "out.csv") == [["a.jpg", "red"], ["b,c.jpg", "green"], ["d.jpg", "blue"]]
    assert not part.exists()
    part.write_text("path,other\r\n")
    with pytest.raises(UsageError):
        CsvWriter(tmp_path / "x.csv", ["path", "label"], partial=part, resume=True)


def test_resumable_writer_keeps_its_partial_when_interrupted(tmp_path):
    part = tmp_path / "out.csv.part"
    with pytest.raises(KeyboardInterrupt):
        with CsvWriter(tmp_path / "out.csv", ["path"], partial=part) as w:
            w.write(["a.jpg"])
            raise KeyboardInterrupt
    assert part.read_bytes() == b"path\r\na.jpg\r\n" and not (tmp_path / "out.csv").exists()


# --- interruptions --------------------------------------------------------------------------------------


def start_predict(model: Path, input: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cvtool", "predict", str(model), str(input), "--out", str(out), "-b", "8", "-q"]
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc: subprocess.Popen, part: Path, rows: int, timeout: float = 120) -> None:
    """Wait until ``part`` holds more than ``rows`` lines while ``proc`` still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if part.exists() and part.read_bytes().count(b"\n") > rows:
            return
        if proc.poll() is not None:
            pytest.fail(f"predict finished before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no rows appeared in the partial file")


def test_kill_9_then_resume_gives_every_row_exactly_once(many, reference, trained_run, tmp_path):
    out = tmp_path / "preds.csv"
    part = tmp_path / "preds.csv.part"
    proc = start_predict(trained_run, many, out)
    wait_for_rows(proc, part, 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a file that looks complete"
    kept = part.read_bytes().count(b"\n") - 1
    assert 40 <= kept < 360
    lock = tmp_path / "preds.csv.lock"
    assert lock.exists()  # left by the killed run, whose flock died with it: the next run takes it over

    again = cli("predict", trained_run, many, "--out", out, "-q")
    assert again.exit_code == 2 and "--resume" in again.stderr  # the partial is not thrown away silently

    proc = start_predict(trained_run, many, out, "--resume")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # the two bad files
    assert "Traceback" not in stderr and not part.exists()
    assert_same_rows(out, reference)
    errors = read_rows(out.with_name("preds.errors.csv"))
    assert sorted(r[0] for r in errors) == ["batch_0/bad.jpg", "batch_3/empty.png"]
    assert not lock.exists()

    # --resume again: the finished output is left as it is.
    before = out.read_bytes()
    done = cli("predict", trained_run, many, "--out", out, "--resume", "-q")
    assert done.exit_code == 1 and out.read_bytes() == before


def test_sigterm_stops_cleanly_keeps_the_partial_and_says_how_to_resume(many, reference, trained_run, tmp_path):
    out = tmp_path / "preds.csv"
    part = tmp_path / "preds.csv.part"
    proc = start_predict(trained_run, many, out)
    wait_for_rows(proc, part, 24)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "--resume" in stderr and "Traceback" not in stderr and not out.exists()
    assert part.read_bytes().endswith(b"\n")  # stopped between rows: nothing torn
    assert not (tmp_path / "preds.csv.lock").exists()  # a run stopped by a signal removes its lock
    result = predict(trained_run, many, out, batch_size=8, quiet=True, resume=True)
    assert result.processed == 360 and result.failed == 2
    assert_same_rows(out, reference)


def test_resume_refuses_a_partial_made_with_other_options(many, trained_run, tmp_path):
    out = tmp_path / "preds.csv"
    assert cli("predict", trained_run, many / "batch_1", "--out", out, "-q").exit_code == 0
    # As if the run had been killed just before renaming its partials into place.
    out.rename(tmp_path / "preds.csv.part")
    (tmp_path / "preds.errors.csv").rename(tmp_path / "preds.errors.csv.part")
    other = cli("predict", trained_run, many / "batch_1", "--out", out, "--resume", "-k", "2", "-q")
    assert other.exit_code == 2 and "different header" in other.stderr
    shard = cli("predict", trained_run, many / "batch_1", "--out", out, "--resume", "--shard", "0/2", "-q")
    assert shard.exit_code == 2 and "different shard" in shard.stderr
    same = cli("predict", trained_run, many / "batch_1", "--out", out, "--resume", "-q")
    assert same.exit_code == 0 and len(read_rows(out)) == 60
    fresh = cli("predict", trained_run, many / "batch_1", "--out", out, "--overwrite", "-k", "2", "-q")
    assert fresh.exit_code == 0 and len(read_rows(out)[0]) == 5


# --- one writer per output ---------------------------------------------------------------------------------


def test_a_second_run_onto_an_output_being_written_is_refused_and_the_first_is_intact(
    many, reference, trained_run, run_copy, tmp_path
):
    out, part = tmp_path / "preds.csv", tmp_path / "preds.csv.part"
    first = start_predict(trained_run, many, out)
    wait_for_rows(first, part, 8)
    first.send_signal(signal.SIGSTOP)  # keep it mid-run, holding the output, while the others try
    try:
        for extra in ((), ("--resume",), ("--overwrite",)):
            second = start_predict(run_copy, many, out, *extra)  # another model, as an overlapping cron run
            _, stderr = second.communicate(timeout=120)
            assert second.returncode == 2, stderr
            assert stderr.count("\n") == 1 and "Traceback" not in stderr
            assert f"another run (pid {first.pid} on {socket.gethostname()}, started " in stderr
            assert "pass --resume" not in stderr  # a live run holds the partial: resuming it is not the advice
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 1, stderr  # the two bad files
    assert_same_rows(out, reference)
    assert json.loads((tmp_path / "preds.job.json").read_text())["model"].startswith("sha256:")
    assert not (tmp_path / "preds.csv.lock").exists() and not part.exists()


def test_a_lock_of_a_dead_run_is_taken_over(many, trained_run, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "preds.csv.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00"}))
    result = cli("predict", trained_run, many / "batch_1", "--out", tmp_path / "preds.csv", "-q")
    assert result.exit_code == 0, result.stderr
    assert len(read_rows(tmp_path / "preds.csv")) == 60 and not lock.exists()


# --- what a job is made with ------------------------------------------------------------------------------


def test_merge_and_resume_refuse_shards_made_with_other_ensemble_weights(many, trained_run, run_copy, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    common = ["ensemble", trained_run, run_copy, many / "batch_1", "--rule", "weighted", "-q"]
    assert cli(*common, "--weights", "1,0", "--out", a, "--shard", "0/2").exit_code == 0
    assert cli(*common, "--weights", "0,1", "--out", b, "--shard", "1/2").exit_code == 0
    refused = cli("merge", tmp_path / "m.csv", a, b)
    assert refused.exit_code == 3 and "different rule_weights (1.0,0.0, now 0.0,1.0)" in refused.stderr
    assert not (tmp_path / "m.csv").exists()
    # As if the first shard had been killed just before renaming its partials into place.
    a.rename(tmp_path / "a.csv.part")
    (tmp_path / "a.errors.csv").rename(tmp_path / "a.errors.csv.part")
    resumed = cli(*common, "--weights", "0,1", "--out", a, "--shard", "0/2", "--resume")
    assert resumed.exit_code == 2 and "different rule_weights" in resumed.stderr and not a.exists()
    assert cli(*common, "--weights", "1,0", "--out", a, "--shard", "0/2", "--resume").exit_code == 0


def test_resume_refuses_a_partial_written_with_another_label_format(many, run_copy, tmp_path):
    meta = json.loads((run_copy / "cvtool.json").read_text())
    meta["wnids"] = ["n00000001", "n00000002", "n00000003"]  # a model with WordNet ids, as imagenet:NAME
    (run_copy / "cvtool.json").write_text(json.dumps(meta))
    out = tmp_path / "preds.csv"
    assert cli("predict", run_copy, many / "batch_1", "--out", out, "--label-format", "wnid", "-q").exit_code == 0
    out.rename(tmp_path / "preds.csv.part")
    (tmp_path / "preds.errors.csv").rename(tmp_path / "preds.errors.csv.part")
    other = cli("predict", run_copy, many / "batch_1", "--out", out, "--resume", "-q")
    assert other.exit_code == 2 and "different label_format (wnid, now name)" in other.stderr
    same = cli("predict", run_copy, many / "batch_1", "--out", out, "--resume", "--label-format", "wnid", "-q")
    assert same.exit_code == 0 and {r[1] for r in read_rows(out)} <= set(meta["wnids"])


# --- a resumed run keeps to the inputs it started with ------------------------------------------------------


def test_resume_skips_inputs_added_since_the_start_so_shards_still_merge_in_input_order(many, trained_run, tmp_path):
    folder = tmp_path / "incoming"
    shutil.copytree(many, folder)
    out, part = tmp_path / "part-0.csv", tmp_path / "part-0.csv.part"
    proc = start_predict(trained_run, folder, out, "--shard", "0/2")
    wait_for_rows(proc, part, 24)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    # Meanwhile the folder changes: a file of shard 0 arrives (sorting before the rows already done),
    # and one not done yet is removed.
    added = next(n for n in (f"batch_0/aaa {i}.png" for i in range(100)) if shard_of(n, 2) == 0)
    colour_image(COLOURS["red"], size=(12, 12)).save(folder / added)
    gone = next(n for n in (f"batch_5/img {i:03d}.png" for i in range(359, 0, -6)) if shard_of(n, 2) == 0)
    (folder / gone).unlink()

    resumed = cli("predict", trained_run, folder, "--out", out, "--shard", "0/2", "--resume", "-b", "8", "-q")
    assert resumed.exit_code == 1, resumed.stderr
    assert f"1 input(s) added since this run started are skipped: {added}" in resumed.stderr
    rows = [r[0] for r in read_rows(out)]
    errors = {r[0]: r[1] for r in read_rows(tmp_path / "part-0.errors.csv")}
    assert added not in rows and added not in errors
    assert rows == sorted(rows) and errors[gone] == "file not found"
    assert not (tmp_path / "part-0.csv.inputs.part").exists()

    assert cli("predict", trained_run, folder, "--out", tmp_path / "part-1.csv", "--shard", "1/2", "-q").exit_code == 1
    merged = cli("merge", tmp_path / "all.csv", out, tmp_path / "part-1.csv")
    assert merged.exit_code == 1, merged.stderr
    paths = [r[0] for r in read_rows(tmp_path / "all.csv")]
    assert paths == sorted(paths) and len(paths) == 360 - 1 and added not in paths


def test_a_setting_that_differs_inside_nested_options_is_named_alone():
    """A resume refused over the TTA views named the whole dict ({'transforms': [...], ...}); now the one field."""
    from cvtool.jobs import identity_difference

    views = {"transforms": ["identity", "hflip"], "reduce": "mean", "seed": 0}
    old = {"command": "tta", "settings": {"views": views, "top_k": 3}}
    new = {"command": "tta", "settings": {"views": {**views, "seed": 1}, "top_k": 3}}
    assert identity_difference(old, new) == "views.seed (0, now 1)"
    assert identity_difference(old, old) is None
