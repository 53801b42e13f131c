"""Object-storage URLs end to end, against a real S3 protocol server (moto's server mode on 127.0.0.1).

The CLI runs in subprocesses with the standard AWS settings (AWS_ENDPOINT_URL, fake keys); the
model, the images and the results live in the bucket. Results must equal a local run's, byte for byte.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import COLOURS, REPO, colour_image

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "cvtool-test"
SECRET = "fake-secret-Zq81xW"  # must never appear in output


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (stopped at the end), its env for the CLI, and an s3fs client."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "CVTOOL_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "CVTOOL_SYNC_SECONDS": "0",
    }
    saved = {name: os.environ.get(name) for name in env}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        saved[name] = os.environ.pop(name, None)
    os.environ.update(env)  # the library calls made in this process (listing, fetch) use them too
    import s3fs

    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=SECRET, client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    try:
        yield {"env": env, "fs": fs, "endpoint": endpoint}
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def photos(tmp_path_factory, s3):
    """A local photo folder (nested, with a hidden folder, a text file and one bad image) and its copy on S3."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(4):
            folder = root / name / ("deep" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            colour_image(rgb, size=(24, 20), seed=500 + 10 * c + i).save(folder / f"{name}-{i}.png")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden").mkdir()
    colour_image((1, 2, 3), size=(8, 8)).save(root / ".hidden" / "skip.png")
    s3["fs"].put(str(root) + "/", f"{BUCKET}/photos/", recursive=True)
    return root


@pytest.fixture(scope="module")
def remote_run(trained_run, s3):
    s3["fs"].put(str(trained_run) + "/", f"{BUCKET}/runs/colours/", recursive=True)
    return f"s3://{BUCKET}/runs/colours"


def cli(s3, *args, env=None, check=None, **kw):
    full_env = {**os.environ, **s3["env"], "PYTHONPATH": str(REPO), "CVTOOL_QUIET": "1", **(env or {})}
    full_env = {name: value for name, value in full_env.items() if value is not None}  # None: unset
    done = subprocess.run(
        [sys.executable, "-m", "cvtool", *map(str, args)], capture_output=True, text=True, env=full_env, **kw
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert SECRET not in done.stderr + done.stdout
    if check is not None:
        assert done.returncode == check, done.stderr
    return done


def keys(s3, prefix: str) -> list[str]:
    s3["fs"].invalidate_cache()
    return sorted(k[len(BUCKET) + 1 :] for k in s3["fs"].find(f"{BUCKET}/{prefix}"))


def text(s3, key: str) -> str:
    s3["fs"].invalidate_cache()
    return s3["fs"].cat_file(f"{BUCKET}/{key}").decode("utf-8")


@pytest.fixture(scope="module")
def local_preds(trained_run, photos, tmp_path_factory):
    """predict run locally, in this process: the reference every S3 run must equal."""
    from cvtool.predict import predict

    out = tmp_path_factory.mktemp("local") / "preds.csv"
    result = predict(trained_run, photos, out, top_k=2, batch_size=4, quiet=True)
    assert result.failed == 1
    return out


def test_listing_a_prefix_gives_the_local_folders_paths_and_order(photos, s3):
    from cvtool.images import list_images

    remote = list_images(f"s3://{BUCKET}/photos")
    local = list_images(photos)
    assert [i.rel for i in remote] == [i.rel for i in local]
    assert len(local) == 13 and all(i.path == f"s3://{BUCKET}/photos/{i.rel}" for i in remote)
    one = list_images(f"s3://{BUCKET}/photos/red/red-0.png")
    assert [(i.rel, i.path) for i in one] == [("red-0.png", f"s3://{BUCKET}/photos/red/red-0.png")]


def test_predict_with_model_input_and_output_on_s3_equals_a_local_run(s3, photos, remote_run, local_preds):
    out = f"s3://{BUCKET}/results/preds.csv"
    done = cli(s3, "predict", remote_run, f"s3://{BUCKET}/photos", "--out", out, "-k", "2", "-b", "4", check=1)
    assert "broken.jpg" in done.stderr and out in done.stderr  # the message names the remote result
    assert text(s3, "results/preds.csv") == local_preds.read_bytes().decode()
    errors = list(csv.reader(text(s3, "results/preds.errors.csv").splitlines()))
    assert errors[0] == ["path", "error"] and [r[0] for r in errors[1:]] == ["broken.jpg"]
    assert keys(s3, "results") == ["results/preds.csv", "results/preds.errors.csv", "results/preds.job.json"]
    job = json.loads(text(s3, "results/preds.job.json"))
    assert job["model"] == json.loads(local_preds.with_name("preds.job.json").read_text())["model"]
    assert SECRET not in json.dumps(job)
    cache = Path(s3["env"]["CVTOOL_CACHE_DIR"])
    assert len(list((cache / "models").iterdir())) == 1  # the run was fetched once (the shards test reuses it)
    assert not any(p.is_file() for p in (cache / "staging").rglob("*.csv"))  # the staging copy is cleared
    refused = cli(s3, "predict", remote_run, f"s3://{BUCKET}/photos", "--out", out, check=2)
    assert "already exists" in refused.stderr and out in refused.stderr  # the URL, not the staging copy
    assert "staging" not in refused.stderr


def test_kill_9_then_resume_finishes_the_remote_result_exactly(s3, trained_run, tmp_path):
    from cvtool.predict import predict

    many = tmp_path / "many"
    many.mkdir()
    for i in range(80):
        colour_image(list(COLOURS.values())[i % 3], size=(16, 16), seed=i).save(many / f"img-{i:03d}.png")
    s3["fs"].put(str(many) + "/", f"{BUCKET}/many/", recursive=True)
    expected = predict(trained_run, many, tmp_path / "local.csv", batch_size=1, quiet=True).out.read_bytes().decode()
    out = f"s3://{BUCKET}/resume/preds.csv"
    args = ["predict", trained_run, f"s3://{BUCKET}/many", "--out", out, "-b", "1"]
    env = {**os.environ, **s3["env"], "PYTHONPATH": str(REPO), "CVTOOL_QUIET": "1", "CVTOOL_REMOTE_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cvtool", *map(str, args)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and proc.poll() is None:
        s3["fs"].invalidate_cache()
        try:
            rows = s3["fs"].cat_file(f"{BUCKET}/resume/preds.csv.part").count(b"\n") - 1
        except FileNotFoundError:
            rows = 0
        if rows >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert rows >= 5 and "resume/preds.csv" not in keys(s3, "resume")  # partial objects only
    refused = cli(s3, *args, check=2)
    assert "--resume" in refused.stderr
    cli(s3, *args, "--resume", check=0)
    assert text(s3, "resume/preds.csv") == expected
    assert not [k for k in keys(s3, "resume") if k.endswith(".part")]


def test_shards_written_to_s3_merge_on_s3_to_the_whole_run(s3, photos, remote_run, local_preds):
    cache = Path(s3["env"]["CVTOOL_CACHE_DIR"])
    env = {**os.environ, **s3["env"], "PYTHONPATH": str(REPO), "CVTOOL_QUIET": "1"}
    runs = [  # as two machines would: at the same time (the model is fetched into one cache by both)
        subprocess.Popen(
            [sys.executable, "-m", "cvtool", "predict", remote_run, f"s3://{BUCKET}/photos"]
            + ["--out", f"s3://{BUCKET}/shards/part-{k}.csv", "-k", "2", "--shard", f"{k}/2"],
            env=env,
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    assert sorted(run.wait(timeout=300) for run in runs) == [0, 1]  # broken.jpg is in one shard
    merged = f"s3://{BUCKET}/merged/preds.csv"
    shards = [f"s3://{BUCKET}/shards/part-{k}.csv" for k in range(2)]
    done = cli(s3, "merge", merged, *shards, check=1)
    assert "1 failed" in done.stderr
    assert text(s3, "merged/preds.csv") == local_preds.read_bytes().decode()
    assert text(s3, "merged/preds.errors.csv") == local_preds.with_name("preds.errors.csv").read_bytes().decode()
    assert json.loads(text(s3, "merged/preds.job.json"))["merged_from"] == shards
    assert len(list((cache / "models").iterdir())) == 1  # the remote run is fetched once, then reused


def test_gradcam_pictures_go_to_the_remote_folder_under_the_same_names(s3, photos, trained_run, tmp_path):
    from cvtool.gradcam import gradcam

    local = gradcam(trained_run, photos / "red", tmp_path / "cams", quiet=True)
    assert local.processed == 4
    cli(s3, "gradcam", trained_run, f"s3://{BUCKET}/photos/red", "--out", f"s3://{BUCKET}/cams", check=0)
    cams = tmp_path / "cams"
    expected = sorted(p.relative_to(cams).as_posix() for p in cams.rglob("*") if p.is_file())
    assert [k[len("cams/") :] for k in keys(s3, "cams")] == expected
    assert text(s3, "cams/gradcam.csv") == (tmp_path / "cams" / "gradcam.csv").read_bytes().decode()


def test_an_object_that_vanishes_mid_run_becomes_an_errors_row(s3, photos):
    from cvtool.batches import Failure, decode_stream
    from cvtool.images import list_images, load_image

    s3["fs"].put(str(photos / "green") + "/", f"{BUCKET}/vanish/", recursive=True)
    items = list_images(f"s3://{BUCKET}/vanish")
    s3["fs"].rm_file(f"{BUCKET}/vanish/green-0.png")
    results = dict((item.rel, r) for item, r in decode_stream(items, lambda it: load_image(it.path, (16, 16))))
    assert isinstance(results["green-0.png"], Failure) and "not found" in results["green-0.png"].reason
    assert sum(isinstance(r, Failure) for r in results.values()) == 1


def test_missing_bucket_or_key_is_a_usage_error(s3, trained_run, tmp_path):
    done = cli(s3, "predict", trained_run, "s3://no-such-bucket-here/photos", "--out", tmp_path / "p.csv", check=2)
    assert done.stderr.startswith("error: ") and "s3://no-such-bucket-here/photos" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = cli(s3, "merge", tmp_path / "m.csv", f"s3://{BUCKET}/shards/none.csv", check=2)
    assert "not found" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_access_denied_is_exit_3_naming_the_url_and_credential_source_without_the_secret(s3, tmp_path):
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=s3["endpoint"], aws_access_key_id="x", aws_secret_access_key="y", region_name="us-east-1"
    )
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    secret = key["SecretAccessKey"]

    def auth(count: str) -> None:  # moto enforces IAM policies from now on (the user has none), or stops
        url, headers = f"{s3['endpoint']}/moto-api/reset-auth", {"Content-Type": "text/plain"}
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # urlopen's opener may hold a proxy
        direct.open(urllib.request.Request(url, count.encode(), headers=headers, method="POST"))  # another test set

    auth("0")
    try:
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": secret}
        done = cli(s3, "merge", tmp_path / "m.csv", f"s3://{BUCKET}/shards/part-0.csv", env=env, check=3)
    finally:
        auth("inf")
    assert f"s3://{BUCKET}/shards/part-0.csv" in done.stderr and "access denied" in done.stderr
    assert "environment AWS_ACCESS_KEY_ID" in done.stderr and secret not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_keys_with_dot_dot_are_refused_from_the_cache(s3):
    from cvtool.errors import UnusableError
    from cvtool.storage import cache_dir, fetch

    s3["fs"].pipe_file(f"{BUCKET}/evil/run/../../escaped.txt", b"outside")
    s3["fs"].pipe_file(f"{BUCKET}/evil/run/cvtool.json", b"{}")
    with pytest.raises(UnusableError, match=r"'\.\.'"):
        fetch(f"s3://{BUCKET}/evil/run", "models")
    assert not list(cache_dir().rglob("escaped.txt"))
    assert not list((cache_dir() / "models").glob(".*.part"))  # the refused copy left nothing behind


def test_a_missing_cloud_extra_is_a_one_line_error_naming_it(s3, tmp_path):
    code = (
        "import sys; sys.modules['fsspec'] = None; sys.argv = ['cvtool', 'merge', sys.argv[1], sys.argv[2]]; "
        "from cvtool.cli import main; main()"
    )
    env = {**os.environ, **s3["env"], "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.csv"), f"s3://{BUCKET}/shards/part-0.csv"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2 and 'pip install "cvtool[cloud]"' in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_file_urls_are_local_paths(photos):
    from cvtool.images import list_images

    assert [i.rel for i in list_images(f"file://{photos}")] == [i.rel for i in list_images(photos)]


def test_http_urls_serve_a_model_and_single_images_read_only(trained_run, photos, tmp_path, monkeypatch):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np

    from cvtool.bundle import load_classifier
    from cvtool.errors import UsageError
    from cvtool.images import list_images, load_image
    from cvtool.predict import predict

    monkeypatch.setenv("CVTOOL_CACHE_DIR", str(tmp_path / "cache"))
    site = tmp_path / "site"
    shutil.copytree(trained_run, site / "run", ignore=shutil.ignore_patterns("logs", "checkpoints"))
    shutil.copy(photos / "red" / "red-0.png", site / "red-0.png")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        remote = load_classifier(f"{base}/run/model.keras")  # a bare .keras file: fetched, loaded with safe_mode
        local = load_classifier(trained_run / "model.keras")
        (item,) = list_images(f"{base}/red-0.png")
        assert item.rel == "red-0.png"
        x = load_image(item.path, remote.image_size)
        assert np.array_equal(x, load_image(photos / "red" / "red-0.png", local.image_size))
        np.testing.assert_allclose(remote.model.predict(x[None], verbose=0), local.model.predict(x[None], verbose=0))
        with pytest.raises(UsageError, match="read-only"):
            predict(trained_run, photos, f"{base}/preds.csv", quiet=True)
    finally:
        server.shutdown()


def test_evaluate_reads_data_and_labels_from_s3_and_writes_its_report_there(s3, trained_run, colour_data, tmp_path):
    from cvtool.evaluate import evaluate

    s3["fs"].put(str(colour_data) + "/", f"{BUCKET}/data/", recursive=True)
    local = evaluate(trained_run, colour_data, tmp_path / "eval", quiet=True)
    remote = evaluate(trained_run, f"s3://{BUCKET}/data", f"s3://{BUCKET}/eval", quiet=True)
    assert remote.out_dir == f"s3://{BUCKET}/eval"
    remote_metrics, local_metrics = dict(remote.metrics), dict(local.metrics)
    assert remote_metrics.pop("data") == f"s3://{BUCKET}/data/validation"  # the URL, not the cache path
    assert local_metrics.pop("data") == str(colour_data / "validation")
    assert remote_metrics == local_metrics
    local_dir = tmp_path / "eval"
    expected = sorted(
        f"eval/{p.relative_to(local_dir).as_posix()}"
        for p in local_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    assert "eval/report.html" in expected and any(k.startswith("eval/report_files/") for k in expected)
    assert keys(s3, "eval") == expected  # the report and its thumbnails too, under the same relative names
    assert text(s3, "eval/predictions.csv") == (tmp_path / "eval" / "predictions.csv").read_bytes().decode()


def test_train_reads_data_from_s3_and_refuses_a_remote_run_directory(s3, colour_data, tmp_path):
    from cvtool.bundle import read_meta
    from cvtool.config import TrainConfig
    from cvtool.train import train

    s3["fs"].put(str(colour_data) + "/", f"{BUCKET}/train-data/", recursive=True)
    result = train(f"s3://{BUCKET}/train-data", tmp_path / "run", cfg=TrainConfig(epochs=1, image_size=16), quiet=True)
    assert read_meta(result.run_dir)["class_names"] == sorted(COLOURS)
    assert f"s3://{BUCKET}/train-data" in (result.run_dir / "cvtool.json").read_text()
    done = cli(s3, "train", f"s3://{BUCKET}/train-data", "--out", f"s3://{BUCKET}/runs/new", check=2)
    assert "written locally" in done.stderr


def test_ray_engine_reads_s3_and_writes_parquet_there_with_the_local_runs_rows(s3, photos, remote_run, local_preds):
    """The storage legs of the Ray engine (issue 15) and of the result formats: model, images and a Parquet
    result on S3, scored by Ray workers on this machine; the rows are the local CSV's, the bad object an errors row."""
    pytest.importorskip("ray")
    import io

    import pyarrow.parquet as pq

    out = f"s3://{BUCKET}/ray/preds.parquet"
    env = {"CVTOOL_ENGINE": "ray", "RAY_ADDRESS": None}  # no cluster address: Ray starts on this machine
    done = cli(s3, "predict", remote_run, f"s3://{BUCKET}/photos", "--out", out, "-k", "2", "-b", "4", env=env)
    assert done.returncode == 1, done.stderr  # broken.jpg
    table = pq.read_table(io.BytesIO(s3["fs"].cat_file(f"{BUCKET}/ray/preds.parquet")))
    expected = list(csv.DictReader(local_preds.read_text().splitlines()))
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    for got, want in zip(rows, expected):
        assert (got["label"], got["label_2"]) == (want["label"], want["label_2"])
        assert abs(got["score"] - float(want["score"])) <= 1e-5 and isinstance(got["score"], float)
    errors = pq.read_table(io.BytesIO(s3["fs"].cat_file(f"{BUCKET}/ray/preds.errors.parquet"))).to_pylist()
    assert [e["path"] for e in errors] == ["broken.jpg"]
    assert keys(s3, "ray") == ["ray/preds.errors.parquet", "ray/preds.job.json", "ray/preds.parquet"]


def test_visualize_reads_images_from_s3_and_writes_its_pictures_locally(s3, photos, remote_run, tmp_path):
    out = tmp_path / "vis"
    cli(s3, "visualize", remote_run, f"s3://{BUCKET}/photos/red", "--out", out, "--filters", "0", check=0)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.activations.png"))
    assert written and all(name.startswith(("red-", "deep/red-")) for name in written), written
    refused = cli(s3, "visualize", remote_run, f"s3://{BUCKET}/photos/red", "--out", f"s3://{BUCKET}/vis", check=2)
    assert "locally" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_secrets_in_urls_never_reach_messages_or_object_names(s3, photos, remote_run, tmp_path):
    signed = f"s3://{BUCKET}/signed/q.csv?X-Amz-Signature=SIGNATURE1234"
    for extra in ([], ["--format", "csv"]):
        done = cli(s3, "predict", remote_run, f"s3://{BUCKET}/photos", "--out", signed, *extra, check=2)
        assert "SIGNATURE1234" not in done.stderr and "query string" in done.stderr
    assert keys(s3, "signed") == []  # nothing written under a name that holds the signature
    done = cli(s3, "predict", f"s3://user:pa55word@{BUCKET}/runs/colours", str(photos), "--out", tmp_path / "p.csv")
    assert done.returncode in (2, 3) and "pa55word" not in done.stderr + done.stdout, done.stderr
