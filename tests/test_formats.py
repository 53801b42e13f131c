"""Result formats (CSV, JSON Lines, Parquet) for predict, tta, ensemble and merge, on a real model and files.

JSON Lines and Parquet must hold the CSV's rows, typed (scores as numbers), with the same path escaping;
the errors file follows the format; a kill -9 then --resume gives every row once; shards in any format merge.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cvtool import formats
from cvtool.cli import app
from cvtool.formats import JsonlWriter, ParquetWriter, result_format
from cvtool.predict import predict
from tests.conftest import COLOURS, colour_image

runner = CliRunner()
HEADER = ["path", "label", "score", "label_2", "score_2"]


def cli(*args, env: dict | None = None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def as_text_rows(records: list[dict]) -> list[list]:
    return [list(r.values()) for r in records]


def assert_typed_rows_match_csv(records: list[dict], csv_rows: list[list[str]]) -> None:
    """``records`` (from JSON Lines or Parquet) hold the CSV's rows: same keys, strings, and scores as floats
    equal to the CSV's cells within its printed precision (6 decimals: one unit of the last digit)."""
    header, rows = csv_rows[0], csv_rows[1:]
    assert len(records) == len(rows) > 0
    for record, row in zip(records, rows):
        assert list(record) == header
        for name, cell in zip(header, row):
            value = record[name]
            if name.startswith("score"):
                assert isinstance(value, float) and abs(value - float(cell)) <= 1.000001e-6, (name, value, cell)
            else:
                assert value == cell


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve tiny images (one named with a byte that is not UTF-8, one with a comma), and one bad file."""
    root = tmp_path_factory.mktemp("photos")
    colours = list(COLOURS.values())
    (root / "sub").mkdir()
    for i in range(10):
        colour_image(colours[i % 3], size=(16, 16), seed=i).save(root / ("sub" if i % 2 else ".") / f"p{i}.png")
    colour_image(colours[0], size=(16, 16), seed=20).save(root / "a, b ü.png")
    colour_image(colours[1], size=(16, 16), seed=21).save(root / "tmp.png")
    os.rename(root / "tmp.png", os.fsencode(root) + b"/caf\xe9.png")
    (root / "bad.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def three(photos, trained_run, tmp_path_factory) -> Path:
    """predict of ``photos`` to preds.csv, preds.jsonl and preds.parquet (exit 1 each: the bad file)."""
    out = tmp_path_factory.mktemp("three")
    for suffix in ("csv", "jsonl", "parquet"):
        result = cli("predict", trained_run, photos, "--out", out / f"preds.{suffix}", "-k", "2", "-b", "4", "-q")
        assert result.exit_code == 1, result.output
        assert "1 failed" in result.stderr
    return out


def test_jsonl_and_parquet_hold_the_csv_rows_with_typed_scores(three):
    csv_rows = read_csv(three / "preds.csv")
    assert csv_rows[0] == HEADER and len(csv_rows) == 13
    assert_typed_rows_match_csv(read_jsonl(three / "preds.jsonl"), csv_rows)
    table = pq.read_table(three / "preds.parquet")
    assert table.schema.names == HEADER
    assert [str(t) for t in table.schema.types] == ["string", "string", "double", "string", "double"]
    assert_typed_rows_match_csv(table.to_pylist(), csv_rows)
    # JSON Lines is UTF-8 text with the names as they are (not \\u escapes); one object per line.
    text = (three / "preds.jsonl").read_text(encoding="utf-8")
    assert '"a, b ü.png"' in text and text.count("\n") == 12
    for name in ("preds.jsonl", "preds.parquet"):
        assert not list(three.glob(f"*{name}*.part")) and not list(three.glob(f".{name}*"))
    assert json.loads((three / "preds.job.json").read_text())["result_format"] in ("csv", "jsonl", "parquet")


def test_a_name_that_is_not_utf8_is_escaped_alike_in_every_format(three):
    cell = "caf\\xe9.png"  # docs/conventions.md: a byte that is not UTF-8 is written \xNN
    assert cell in [row[0] for row in read_csv(three / "preds.csv")]
    assert cell in [r["path"] for r in read_jsonl(three / "preds.jsonl")]
    assert cell in pq.read_table(three / "preds.parquet").column("path").to_pylist()


def test_the_errors_file_follows_the_format(three):
    want = read_csv(three / "preds.errors.csv")
    assert want[0] == ["path", "error"] and [r[0] for r in want[1:]] == ["bad.jpg"]
    assert as_text_rows(read_jsonl(three / "preds.errors.jsonl")) == want[1:]
    errors = pq.read_table(three / "preds.errors.parquet")
    assert errors.schema.names == ["path", "error"] and as_text_rows(errors.to_pylist()) == want[1:]


def test_merge_reads_mixed_shard_formats_and_writes_the_format_of_out(photos, three, trained_run, tmp_path):
    for k, suffix in enumerate(("jsonl", "parquet", "csv")):
        shard = tmp_path / f"part{k}.{suffix}"
        result = cli("predict", trained_run, photos, "--out", shard, "--shard", f"{k}/3", "-k", "2", "-b", "4", "-q")
        assert result.exit_code in (0, 1), result.output
    shards = sorted(tmp_path.glob("part*"))  # a shell glob: the errors files come along with their shards
    assert any(".errors." in p.name for p in shards)
    merged = cli("merge", tmp_path / "all.parquet", *shards)
    assert merged.exit_code == 1 and "1 failed" in merged.stderr, merged.output
    assert cli("merge", tmp_path / "direct.csv", *shards).exit_code == 1
    direct = read_csv(tmp_path / "direct.csv")
    # The unsharded CSV run: same paths and labels; scores up to float noise from other batches.
    unsharded = read_csv(three / "preds.csv")
    assert [[r[0], r[1], r[3]] for r in direct] == [[r[0], r[1], r[3]] for r in unsharded]
    assert all(abs(float(a[2]) - float(b[2])) < 1e-4 for a, b in zip(direct[1:], unsharded[1:]))
    assert_typed_rows_match_csv(pq.read_table(tmp_path / "all.parquet").to_pylist(), direct)
    errors = pq.read_table(tmp_path / "all.errors.parquet").to_pylist()
    assert as_text_rows(errors) == read_csv(three / "preds.errors.csv")[1:]
    assert json.loads((tmp_path / "all.job.json").read_text())["result_format"] == "parquet"
    # Parquet back to CSV, with --format naming the format of an unknown suffix: the CSV merge's very cells.
    again = cli("merge", tmp_path / "again.txt", tmp_path / "all.parquet", "--format", "csv")
    assert again.exit_code == 1, again.output
    assert read_csv(tmp_path / "again.txt") == direct
    assert read_csv(tmp_path / "again.errors.csv") == read_csv(three / "preds.errors.csv")


def test_format_comes_from_the_suffix_or_format_and_a_conflict_is_refused(photos, trained_run, tmp_path):
    conflict = cli("predict", trained_run, photos, "--out", tmp_path / "p.csv", "--format", "parquet")
    assert conflict.exit_code == 2 and "contradicts" in conflict.stderr
    assert len(conflict.stderr.strip().splitlines()) == 1 and "Traceback" not in conflict.output
    from_env = cli("predict", trained_run, photos, "--out", tmp_path / "p.csv", env={"CVTOOL_FORMAT": "jsonl"})
    assert from_env.exit_code == 2 and "contradicts" in from_env.stderr
    unknown = cli("predict", trained_run, photos, "--out", tmp_path / "p.txt")
    assert unknown.exit_code == 2 and "--format" in unknown.stderr
    bad_name = cli("predict", trained_run, photos, "--out", tmp_path / "p.csv", "--format", "xml")
    assert bad_name.exit_code == 2 and "csv, jsonl, parquet" in bad_name.stderr
    merge_conflict = cli("merge", tmp_path / "m.jsonl", tmp_path / "nothing.csv", "--format", "csv")
    assert merge_conflict.exit_code == 2 and "contradicts" in merge_conflict.stderr
    assert not [p for p in tmp_path.iterdir()]  # nothing written by a refused run
    # An unknown suffix with --format (here from the environment): written in that format, errors beside it.
    one = photos / "sub"
    ok = cli("predict", trained_run, one, "--out", tmp_path / "p.txt", "-q", env={"CVTOOL_FORMAT": "jsonl"})
    assert ok.exit_code == 0, ok.output
    assert len(read_jsonl(tmp_path / "p.txt")) == 5 and (tmp_path / "p.errors.jsonl").read_text() == ""
    assert result_format("P.PARQUET") is ParquetWriter and result_format("x.out", "JSONL") is JsonlWriter


def test_parquet_is_written_in_row_groups_and_an_empty_result_keeps_its_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "ROW_GROUP_ROWS", 4)
    with ParquetWriter(tmp_path / "r.parquet", ["path", "label", "score", "pixels"]) as writer:
        for i in range(10):
            writer.write([f"{i}.png", "red", f"{i / 10:.6f}", str(i)])
    table = pq.ParquetFile(tmp_path / "r.parquet")
    assert table.metadata.num_row_groups == 3 and table.metadata.num_rows == 10
    assert table.schema_arrow.field("pixels").type == pa.int64()
    assert table.read().column("score").to_pylist() == [i / 10 for i in range(10)]
    assert list(ParquetWriter.read(tmp_path / "r.parquet"))[1] == ["0.png", "red", "0.000000", "0"]
    with ParquetWriter(tmp_path / "empty.parquet", ["path", "error"]):
        pass
    empty = pq.read_table(tmp_path / "empty.parquet")
    assert empty.num_rows == 0 and empty.schema.names == ["path", "error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet", "r.parquet"]  # no journal left


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(photos, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['pyarrow'] = None  # as if pyarrow were not installed\n"
        "from cvtool.cli import main\n"
        f"sys.argv = ['cvtool', 'predict', 'no-model', {str(photos)!r}, '--out', {str(tmp_path / 'p.parquet')!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["exit", "2"], done.stdout + done.stderr
    assert done.stderr.strip() == 'error: Parquet results need pyarrow: pip install "cvtool[cloud]"'


def test_parquet_kill_9_then_resume_gives_every_row_exactly_once(trained_run, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    colours = list(COLOURS.values())
    for i in range(240):
        colour_image(colours[i % 3], size=(12, 12), seed=i).save(many / f"img {i:03d}.png")
    (many / "img 100 bad.png").write_bytes(b"")
    reference = tmp_path / "ref.parquet"
    assert predict(trained_run, many, reference, batch_size=8, quiet=True).failed == 1

    out, part = tmp_path / "preds.parquet", tmp_path / "preds.parquet.part"
    cmd = [sys.executable, "-m", "cvtool", "predict", str(trained_run), str(many), "--out", str(out), "-b", "8", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (part.exists() and part.read_bytes().count(b"\n") > 40):
        assert proc.poll() is None, f"predict finished before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no rows appeared in the journal"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a Parquet file that looks complete"
    assert 40 <= part.read_bytes().count(b"\n") - 1 < 240

    result = predict(trained_run, many, out, batch_size=8, quiet=True, resume=True)
    assert (result.processed, result.failed) == (240, 1)
    got, want = pq.read_table(out).to_pylist(), pq.read_table(reference).to_pylist()
    assert [r["path"] for r in got] == [r["path"] for r in want]  # each input once, in input order
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, want))  # other batches: float noise
    assert pq.read_table(tmp_path / "preds.errors.parquet").column("path").to_pylist() == ["img 100 bad.png"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_resume_in_another_format_is_refused_so_no_errors_journal_is_dropped(trained_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    colour_image(COLOURS["red"], size=(12, 12)).save(photos / "a.png")
    (photos / "bad.png").write_bytes(b"")
    out = tmp_path / "preds.out"
    assert predict(trained_run, photos, out, format="jsonl", quiet=True).failed == 1
    from cvtool.errors import UsageError

    with pytest.raises(UsageError, match=r"results format \(jsonl, now parquet\)"):
        predict(trained_run, photos, out, format="parquet", quiet=True, resume=True)
    again = predict(trained_run, photos, out, format="jsonl", quiet=True, resume=True)  # same format: nothing to do
    assert (again.processed, again.failed) == (1, 1)
