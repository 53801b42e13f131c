"""--engine ray: the same rows, files, errors file and exit codes as the local engine, on real Ray.

Ray is started for real: once embedded by the CLI itself, and as a 2-node cluster on this machine
(``ray.cluster_utils.Cluster``) that the CLI joins through RAY_ADDRESS. One inference replica is killed
with SIGKILL mid-run and the result must still be exact; a node is lost mid-run and the run stops in one
line, and ``--resume`` completes it exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import colour_image

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CVTOOL_QUIET": "1", **(env or {})}
    for name, value in list(full_env.items()):
        if value is None:
            del full_env[name]
    return subprocess.run(
        [sys.executable, "-m", "cvtool", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


@pytest.fixture(scope="module")
def photos(colour_data, tmp_path_factory) -> Path:
    """36 images in class folders, a nested folder, a JPEG and a file that is not an image."""
    root = tmp_path_factory.mktemp("ray-photos") / "in"
    shutil.copytree(colour_data / "validation", root)
    (root / "green" / "nested").mkdir()
    colour_image((40, 180, 60), size=(48, 40), seed=7).save(root / "green" / "nested" / "photo.jpg", quality=90)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def local_csv(trained_run, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-local") / "preds.csv"
    done = cli("predict", str(trained_run), str(photos), "--out", str(out), "--top-k", "2")
    assert done.returncode == 1, done.stderr  # the broken file
    return out


def same_results(a: Path, b: Path, broken: bool = True) -> None:
    """Same rows in the same order (scores within 1e-5) and the same errors file (naming the broken file)."""
    rows_a, rows_b = a.read_text().splitlines(), b.read_text().splitlines()
    assert [r.split(",")[0] for r in rows_a] == [r.split(",")[0] for r in rows_b]
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        ca, cb = ra.split(","), rb.split(",")
        assert ca[1::2] == cb[1::2]  # path and labels
        assert all(abs(float(x) - float(y)) <= 1e-5 for x, y in zip(ca[2::2], cb[2::2]))
    if broken:
        err_a, err_b = (p.with_name(p.stem + ".errors.csv") for p in (a, b))
        assert err_a.read_text() == err_b.read_text()
        assert "red/broken.jpg" in err_b.read_text()


def test_embedded_ray_engine_writes_the_local_engines_rows_and_errors(trained_run, photos, local_csv, tmp_path):
    out = tmp_path / "preds.csv"
    env = {"RAY_ADDRESS": None, "CVTOOL_ENGINE": "ray"}  # no cluster: the CLI starts Ray on this machine
    done = cli(
        "predict", str(trained_run), str(photos), "--out", str(out), "--top-k", "2", "--batch-size", "5", env=env
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("37 images done, 1 failed"), done.stderr
    same_results(local_csv, out)
    assert not list(tmp_path.glob("*.part*"))


@pytest.fixture(scope="module")
def cluster():
    """A 2-node Ray cluster on this machine (1 CPU each); the test process is connected to it."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_cli_joins_a_two_node_cluster_through_ray_address(cluster, trained_run, photos, local_csv, tmp_path):
    out = tmp_path / "preds.csv"
    env = {"RAY_ADDRESS": cluster.address}
    done = cli(
        "predict", str(trained_run), str(photos), "--out", str(out), "-k", "2", "--engine", "ray", "-b", "4", env=env
    )
    assert done.returncode == 1, done.stderr
    same_results(local_csv, out)


def test_tta_ensemble_and_evaluate_on_ray_equal_local(cluster, trained_run, photos, colour_data, tmp_path):
    from cvtool.ensemble import ensemble
    from cvtool.evaluate import evaluate
    from cvtool.tta import TtaOptions, tta

    views = TtaOptions(transforms=("identity", "hflip", "scale"), copies=2)
    for engine in ("local", "ray"):
        r = tta(trained_run, photos, tmp_path / f"tta-{engine}.csv", options=views, quiet=True, engine=engine)
        assert (r.processed, r.failed) == (37, 1)
        ensemble([trained_run, trained_run], photos, tmp_path / f"ens-{engine}.csv", quiet=True, engine=engine)
        evaluate(trained_run, colour_data, tmp_path / f"eval-{engine}", split="validation", quiet=True, engine=engine)
    same_results(tmp_path / "tta-local.csv", tmp_path / "tta-ray.csv")
    same_results(tmp_path / "ens-local.csv", tmp_path / "ens-ray.csv")
    local_eval, ray_eval = (tmp_path / f"eval-{e}" / "predictions.csv" for e in ("local", "ray"))
    assert local_eval.read_text().splitlines()[0] == ray_eval.read_text().splitlines()[0]
    assert len(ray_eval.read_text().splitlines()) == 37  # header + 36 validation images


def test_a_run_with_a_tflite_export_predicts_on_ray_as_locally(cluster, trained_run, photos, tmp_path):
    """Each replica loads the exported artefact itself: a LiteRT interpreter cannot travel to a worker."""
    pytest.importorskip("ai_edge_litert")
    from cvtool.export import export
    from cvtool.predict import predict

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    export(run, format="tflite", quiet=True)
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.csv"
        result = predict(run, photos, out, top_k=2, quiet=True, engine=engine, runtime="tflite")
        assert (result.processed, result.failed) == (37, 1)
    same_results(tmp_path / "local.csv", tmp_path / "ray.csv")


def test_sigkill_of_a_replica_mid_run_loses_and_duplicates_no_row(cluster, trained_run, tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(240):
        colour_image((40 + i % 200, 60, 200 - i % 150), size=(40, 32), seed=i).save(photos / f"{i:03d}.png")
    expected = tmp_path / "local.csv"
    assert cli("predict", str(trained_run), str(photos), "--out", str(expected)).returncode == 0
    out = tmp_path / "ray.csv"
    args = ["tta", str(trained_run), str(photos), "--out", str(out), "--transforms", "identity,hflip,crop"]
    views = ["--engine", "ray", "--batch-size", "2", "--replicas", "1"]
    run = subprocess.Popen(
        [sys.executable, "-m", "cvtool", *args, *views],
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address, "CVTOOL_QUIET": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        replicas = replica_pids()
        part = out.with_name(out.name + ".part")
        if replicas and part.exists() and len(part.read_text().splitlines()) > 10:  # mid-run: rows written
            killed = replicas[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    _, stderr = run.communicate(timeout=300)
    assert killed is not None, f"no replica was seen mid-run: {stderr}"
    assert run.returncode == 0, stderr
    rows = out.read_text().splitlines()
    assert len(rows) == 241 and len(set(rows)) == 241
    ref = [r.split(",")[0] for r in expected.read_text().splitlines()]
    assert [r.split(",")[0] for r in rows] == ref  # every input exactly once, in input order


def test_an_interrupted_ray_run_resumes_on_ray_with_every_row_once(cluster, trained_run, tmp_path):
    from cvtool.tta import TtaOptions, tta

    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(120):
        colour_image((200 - i, 60 + i, 90), size=(40, 32), seed=i).save(photos / f"{i:03d}.png")
    views = TtaOptions(transforms=("identity", "hflip", "crop"))
    expected = tmp_path / "local.csv"
    tta(trained_run, photos, expected, options=views, quiet=True)
    out = tmp_path / "ray.csv"
    args = ["tta", str(trained_run), str(photos), "--out", str(out), "--transforms", "identity,hflip,crop"]
    run = subprocess.Popen(
        [sys.executable, "-m", "cvtool", *args, "--engine", "ray", "--batch-size", "2"],
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address, "CVTOOL_QUIET": "1"},
        stderr=subprocess.PIPE,
        text=True,
    )
    part = out.with_name(out.name + ".part")
    deadline = time.monotonic() + 240
    while run.poll() is None and time.monotonic() < deadline:
        if part.exists() and len(part.read_text().splitlines()) > 5:
            run.send_signal(signal.SIGTERM)
            break
        time.sleep(0.1)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143, stderr  # stopped cleanly, the rows so far kept
    kept = len(part.read_text().splitlines()) - 1
    assert 0 < kept < 120
    result = tta(trained_run, photos, out, options=views, quiet=True, resume=True, engine="ray")
    assert result.processed == 120
    same = [r.split(",")[0] for r in out.read_text().splitlines()]
    assert same == [r.split(",")[0] for r in expected.read_text().splitlines()]


def replica_pids() -> list[int]:
    """Processes of the model replicas (Ray titles an actor's process ``ray::MapWorker(...ModelReplica...)``).

    (ray.util.state.list_actors needs Ray's dashboard, which the ray[data,train] extra does not install.)
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::") and b"ModelReplica" in title:
                pids.append(int(entry.name))
    return sorted(pids)


def test_two_ray_workers_train_a_run_directory_that_predicts(cluster, colour_data, photos, tmp_path):

    run = tmp_path / "run"
    args = ["train", str(colour_data), "--out", str(run), "--epochs", "1", "--image-size", "32", "--batch-size", "6"]
    done = cli(*args, "--engine", "ray", "--workers", "2", env={"RAY_ADDRESS": cluster.address}, timeout=600)
    assert done.returncode == 0, done.stderr
    meta = json.loads((run / "cvtool.json").read_text())
    training = meta["training"]
    assert (training["engine"], training["workers"], training["replicas"]) == ("ray", 2, 2)
    assert training["strategy"] == "CollectiveAllReduceStrategy" and training["loop"] == "custom"
    assert (run / "history.csv").read_text().count("\n") == 2  # header + one epoch, written once (the chief)
    assert (run / "checkpoints" / "last.json").exists()
    done = cli("predict", str(run), str(photos), "--out", str(tmp_path / "p.csv"))
    assert done.returncode == 1, done.stderr  # the broken file; every other image classified
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 38


def test_a_replica_asking_for_gpus_no_node_has_is_refused_in_one_line(cluster, trained_run, photos, tmp_path):
    env = {"RAY_ADDRESS": cluster.address}
    args = ["predict", str(trained_run), str(photos), "--out", str(tmp_path / "p.csv"), "--engine", "ray"]
    done = cli(*args, "--gpus-per-replica", "2", env=env)
    assert done.returncode == 3
    assert done.stderr.strip() == (
        "error: no Ray node has the 1 CPUs and 2 GPUs asked per model replica; "
        "the cluster's nodes have: 1 CPUs/0 GPUs, 1 CPUs/0 GPUs"
    )


def test_missing_ray_is_a_one_line_usage_error_naming_the_extra(trained_run, photos, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['cvtool', 'predict', sys.argv[1], sys.argv[2], "
        "'--out', sys.argv[3], '--engine', 'ray']; from cvtool.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(trained_run), str(photos), str(tmp_path / "p.csv")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2
    assert done.stderr.strip() == 'error: --engine ray needs Ray: pip install "cvtool[ray]"'


def same_files(local: Path, remote: Path) -> None:
    """The same files besides the CSVs (compared on their own): images byte-equal or pixel-equal within one
    level (JPEG of float maps), .npy maps within 1e-5."""
    import numpy as np
    from PIL import Image

    def files(root: Path) -> list[str]:
        found = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix != ".csv"]
        return sorted(name for name in found if not name.endswith(".job.json"))  # the job's start time differs

    names = files(local)
    assert names == files(remote)
    assert (local / "errors.csv").read_text() == (remote / "errors.csv").read_text()
    for name in names:
        if (local / name).read_bytes() == (remote / name).read_bytes():
            continue
        if name.endswith(".npy"):
            assert np.allclose(np.load(local / name), np.load(remote / name), atol=1e-5), name
        else:
            pa, pb = (np.asarray(Image.open(d / name), np.int16) for d in (local, remote))
            assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1, name


def same_index(a: Path, b: Path, score_column: int) -> None:
    """The same CSV rows in order, the score column within 1e-5."""
    rows_a, rows_b = (p.read_text().splitlines() for p in (a, b))
    assert len(rows_a) == len(rows_b) and rows_a[0] == rows_b[0]
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        ca, cb = ra.split(","), rb.split(",")
        assert ca[:score_column] + ca[score_column + 1 :] == cb[:score_column] + cb[score_column + 1 :]
        assert abs(float(ca[score_column]) - float(cb[score_column])) <= 1e-5


def test_gradcam_on_ray_writes_the_local_engines_pictures_rows_and_errors(cluster, trained_run, photos, tmp_path):
    from cvtool.gradcam import gradcam

    # The same batch size: a model call of another size can move a map in its 7th digit (oneDNN's kernels).
    options = {"top_k": 2, "save_heatmap": True, "npy": True, "batch_size": 5}
    local = gradcam(trained_run, photos, tmp_path / "local", quiet=True, **options)
    args = ["gradcam", str(trained_run), str(photos), "--out", str(tmp_path / "ray"), "-k", "2", "--save-heatmap"]
    done = cli(*args, "--npy", "--engine", "ray", "--batch-size", "5", env={"RAY_ADDRESS": cluster.address})
    assert (local.exit_code, done.returncode) == (1, 1), done.stderr  # the broken file
    assert done.stderr.strip().splitlines()[-1].startswith("37 images done, 1 failed"), done.stderr
    same_index(tmp_path / "local" / "gradcam.csv", tmp_path / "ray" / "gradcam.csv", score_column=2)
    assert "red/broken.jpg" in (tmp_path / "ray" / "errors.csv").read_text()
    same_files(tmp_path / "local", tmp_path / "ray")  # overlays, heatmaps, maps, index and errors
    assert (tmp_path / "ray" / "green" / "nested" / "photo.top2.gradcam.jpg").exists()


def test_segment_on_ray_writes_the_local_engines_masks_rows_and_legend(cluster, tools, photos, tmp_path):
    from cvtool.segment import SegmentConfig, segment

    cfg = SegmentConfig(model=str(tools["segmodel"]), batch_size=3, overlay_format="png")
    results = [segment(photos, tmp_path / engine, config=cfg, quiet=True, engine=engine) for engine in ("local", "ray")]
    assert [(r.processed, r.failed, r.exit_code) for r in results] == [(37, 1, 1)] * 2
    assert (tmp_path / "local" / "pixels.csv").read_text() == (tmp_path / "ray" / "pixels.csv").read_text()
    same_files(tmp_path / "local", tmp_path / "ray")  # masks, colour masks, overlays, legend, errors
    assert (tmp_path / "ray" / "green" / "nested" / "photo.mask.png").exists()  # the one image of another size


def test_a_lost_node_stops_the_run_in_one_line_and_resume_completes_it_exactly(cluster, trained_run, tmp_path):
    """The only node a replica fits on (2 CPUs) is removed mid-run: Ray Data would wait for room that never
    comes; cvtool stops after its stall timeout (exit 3), keeps the rows, and --resume finishes on a new node."""
    from cvtool.predict import predict

    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(160):
        colour_image((200 - i, 60 + i % 100, 90), size=(40, 32), seed=i).save(photos / f"{i:03d}.png")
    expected = tmp_path / "local.csv"
    assert predict(trained_run, photos, expected, quiet=True).exit_code == 0
    out = tmp_path / "ray.csv"
    args = ["predict", str(trained_run), str(photos), "--out", str(out), "--engine", "ray", "--batch-size", "2"]
    args += ["--cpus-per-replica", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address, "CVTOOL_QUIET": "1"}
    env["CVTOOL_RAY_STALL_TIMEOUT"] = "30"  # more than a replica's start-up (TensorFlow, the model) takes here
    big = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    added = [big]
    try:
        run = subprocess.Popen([sys.executable, "-m", "cvtool", *args], env=env, stderr=subprocess.PIPE, text=True)
        part = out.with_name(out.name + ".part")
        deadline = time.monotonic() + 240
        while run.poll() is None and time.monotonic() < deadline:
            if part.exists() and len(part.read_text().splitlines()) > 10:  # mid-run: rows written
                cluster.remove_node(big, allow_graceful=False)
                added.remove(big)
                break
            time.sleep(0.2)
        _, stderr = run.communicate(timeout=240)
        assert not added, f"the run was not seen mid-run: {stderr}"
        assert run.returncode == 3, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: the Ray engine made no progress for 30 s (the cluster's live nodes: "), stderr
        kept = len(part.read_text().splitlines()) - 1
        assert 10 <= kept < 160
        added.append(cluster.add_node(num_cpus=2))  # the node comes back (an autoscaler, an operator)
        cluster.wait_for_nodes()
        done = subprocess.run(
            [sys.executable, "-m", "cvtool", *args, "--resume"], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    finally:
        for node in added:
            cluster.remove_node(node)
    same_results(expected, out, broken=False)
