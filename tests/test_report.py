"""report.html of evaluate and train, opened in a real headless Chromium.

Pages are loaded from file:// URLs; the browser's own network log shows every request
it made, so "nothing leaves the machine" is what the browser did, not what the HTML says.
A screenshot of each page is kept under the test's temporary folder (and copied to
``$CVTOOL_REPORT_SHOTS`` when it is set).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import COLOURS, colour_image, make_colour_dataset

CHROMIUM, CHROMEDRIVER = (
    shutil.which("chromium") or "/usr/bin/chromium",
    shutil.which("chromedriver") or "/usr/bin/chromedriver",
)
HOSTILE = "<b>&\"'é.png"  # markup, an entity, both quotes and a non-ASCII letter
HOSTILE_BROKEN = "<i>bad&'\".png"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver, page: Path, shot: Path) -> dict:
    """Load ``page``; returns its images' natural widths, the URLs the browser requested, captions and text."""
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(page.resolve().as_uri())
    for _ in range(100):
        if driver.execute_script("return document.readyState") == "complete":
            break
        time.sleep(0.05)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(height + 40, 8000))
    driver.save_screenshot(str(shot))
    if os.environ.get("CVTOOL_REPORT_SHOTS"):
        Path(os.environ["CVTOOL_REPORT_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["CVTOOL_REPORT_SHOTS"]) / shot.name)
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    return {
        "images": driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])"
        ),
        "requests": requests,
        "captions": driver.execute_script(
            "return [...document.querySelectorAll('figure.thumb')]"
            ".map(f => [f.closest('.gallery').dataset.gallery, f.className, f.innerText])"
        ),
        "sections": driver.execute_script("return [...document.querySelectorAll('h2')].map(h => h.id)"),
        "scripts": driver.execute_script("return document.querySelectorAll('script, link, iframe, object').length"),
        "injected": driver.execute_script("return document.querySelectorAll('main b, main i').length"),
        "text": driver.execute_script("return document.body.innerText"),
        "refresh": driver.execute_script("return document.querySelectorAll('meta[http-equiv=refresh]').length"),
    }


def assert_offline_and_decoded(page: dict) -> None:
    assert page["images"], "the page shows no image"
    broken = [src for src, width in page["images"] if not width > 0]
    assert not broken, f"images that did not decode: {broken}"
    assert len(page["requests"]) > len(page["images"]) // 2  # the log did record the page's requests
    outside = [u for u in page["requests"] if not u.startswith(("file:", "data:"))]
    assert not outside, f"requests that leave the machine: {outside}"
    assert page["scripts"] == 0
    assert page["injected"] == 0, "a file name became markup"


@pytest.fixture(scope="module")
def report_data(tmp_path_factory) -> Path:
    """Three colour classes; validation holds 3 red images filed as green, a red one with a hostile name filed
    as blue (all four misclassified), and an unreadable file with a hostile name."""
    root = make_colour_dataset(tmp_path_factory.mktemp("report-data"), per_class=6)
    for i in range(3):
        colour_image(COLOURS["red"], seed=500 + i).save(root / "validation" / "green" / f"really_red_{i}.png")
    colour_image(COLOURS["red"], seed=600).save(root / "validation" / "blue" / HOSTILE)
    (root / "validation" / "green" / HOSTILE_BROKEN).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def watched_run(report_data, tmp_path_factory):
    """A 3-epoch run, with every distinct state of its report.html seen while it trained."""
    from cvtool.config import TrainConfig
    from cvtool.train import train

    run = tmp_path_factory.mktemp("report-runs") / "run"
    seen, done = [], threading.Event()

    def watch():
        while True:
            finished = done.is_set()  # one more look after training returned: the final page
            try:
                text = (run / "report.html").read_text(encoding="utf-8")
            except OSError:
                text = ""
            state = re.search(r"(running: \d+ of \d+ epochs done|finished after \d+ epochs)", text)
            if state and (not seen or seen[-1] != state[1]):
                seen.append(state[1])
            if finished:
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train(report_data, run, cfg=TrainConfig(epochs=3, image_size=32, batch_size=8, seed=1), quiet=True)
    finally:
        done.set()
        watcher.join()
    return run, seen


def test_train_report_shows_data_then_curves_and_is_rewritten_every_epoch(watched_run, browser, tmp_path):
    run, seen = watched_run
    # the page existed before the first epoch ended, was rewritten as epochs ended, and says when it is done
    assert seen[0] == "running: 0 of 3 epochs done"
    assert "running: 1 of 3 epochs done" in seen or "running: 2 of 3 epochs done" in seen
    assert seen[-1] == "finished after 3 epochs"
    page = open_page(browser, run / "report.html", tmp_path / "train-report.png")
    assert_offline_and_decoded(page)
    assert page["refresh"] == 0  # a finished run's page no longer reloads itself
    assert list(page["sections"]) == ["data", "unreadable", "curves", "config", "metrics", "files"]
    per_class = captions(page, "class")
    for name in COLOURS:
        assert sum(f"class: {name}" in c for c in per_class) == 4
    assert f"green/{HOSTILE_BROKEN}" in page["text"]  # unreadable, listed literally with its reason
    assert "not an image" in page["text"]
    assert any(src.startswith("history.png") for src, _ in page["images"])
    with open(run / "history.csv", newline="", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 3
    thumbs = list((run / "report_files" / "thumbs").iterdir())
    assert len(thumbs) == 12 and all(max(Image.open(t).size) <= 128 for t in thumbs)


def test_evaluate_report_every_error_captioned_escaped_and_explained(watched_run, report_data, browser, tmp_path):
    from cvtool.evaluate import evaluate
    from cvtool.tta import TtaOptions

    run, _ = watched_run
    out = tmp_path / "eval"
    result = evaluate(run, report_data, out, quiet=True, explain=2, tta=TtaOptions(transforms=("identity", "hflip")))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["calibration"]["bins"] == 15 and 0 <= metrics["ece"] <= 1
    page = open_page(browser, out / "report.html", tmp_path / "evaluate-report.png")
    assert_offline_and_decoded(page)
    wrong = read_misclassified(out)
    assert len(wrong) == result.metrics["samples"] - round(result.metrics["accuracy"] * result.metrics["samples"])
    assert len(wrong) >= 4
    shown = captions(page, "misclassified", "wrong")
    by_path = {row["path"]: row for row in wrong}
    assert sorted(c.splitlines()[0] for c in shown) == sorted(by_path)  # every error has its captioned thumbnail
    for caption in shown:
        assert_caption(caption, by_path[caption.splitlines()[0]])
    scores = [float(by_path[c.splitlines()[0]]["score"]) for c in shown]
    assert scores == sorted(scores, reverse=True)  # the most confident first
    assert any(c.startswith(f"blue/{HOSTILE}\n") for c in shown)  # shown literally, not as markup
    assert f"green/{HOSTILE_BROKEN}" in page["text"]
    assert "comparison" in page["sections"] and "+ tta" in page["text"]  # members and TTA side by side
    explained = captions(page, "explain", "wrong")
    assert [c.splitlines()[0] for c in explained] == [c.splitlines()[0] for c in shown[:2]]
    assert "green → red" in page["text"]  # the most confused pair
    right = captions(page, "correct", "right")
    assert right and all(re.search(r"true: (\w+)\npredicted: \1 ", c) for c in right)


def test_evaluate_report_max_caps_the_gallery_and_no_report_turns_it_off(watched_run, report_data, browser, tmp_path):
    from cvtool.cli import app

    run, _ = watched_run
    out = tmp_path / "capped"
    args = ["evaluate", str(run), str(report_data), "--out", str(out), "--report-max", "2", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # the unreadable file
    page = open_page(browser, out / "report.html", tmp_path / "evaluate-capped.png")
    assert_offline_and_decoded(page)
    wrong = read_misclassified(out)
    wrong.sort(key=lambda r: -float(r["score"]))
    shown = captions(page, "misclassified", "wrong")
    assert len(shown) == 2 < len(wrong)
    by_path = {r["path"]: r for r in wrong}
    for caption in shown:
        assert_caption(caption, by_path[caption.splitlines()[0]])
    hidden = [r for r in wrong if r["path"] not in {c.splitlines()[0] for c in shown}]
    assert min(float(by_path[c.splitlines()[0]]["score"]) for c in shown) >= max(float(r["score"]) for r in hidden)
    assert len(list((out / "report_files" / "thumbs").iterdir())) <= 4  # 2 errors, 2 correct: nothing else decoded

    bare = tmp_path / "bare"
    result = CliRunner().invoke(app, ["evaluate", str(run), str(report_data), "--out", str(bare), "--no-report", "-q"])
    assert result.exit_code == 1, result.output
    assert not (bare / "report.html").exists() and not (bare / "report_files").exists()
    args = ["evaluate", str(run), str(report_data), "--out", str(out), "--no-report", "--overwrite", "-q"]
    assert CliRunner().invoke(app, args).exit_code == 1
    assert not (out / "report.html").exists() and not (out / "report_files").exists()  # no stale page left
    assert "ece" in json.loads((bare / "metrics.json").read_text(encoding="utf-8"))
    refused = CliRunner().invoke(
        app, ["evaluate", str(run), str(report_data), "--out", str(bare), "--report-max", "5000"]
    )
    assert refused.exit_code == 2 and "--report-max" in refused.output


def test_train_no_report_writes_no_page(tmp_path):
    from cvtool.config import TrainConfig
    from cvtool.train import train

    data = make_colour_dataset(tmp_path / "data", per_class=3)
    train(data, tmp_path / "run", cfg=TrainConfig(epochs=1, image_size=16, batch_size=8, report=False), quiet=True)
    assert (tmp_path / "run" / "model.keras").exists()
    assert not (tmp_path / "run" / "report.html").exists() and not (tmp_path / "run" / "report_files").exists()


def read_misclassified(out: Path) -> list[dict]:
    with open(out / "misclassified.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def captions(page: dict, gallery: str, kind: str = "") -> list[str]:
    """Captions of the thumbnails in the galleries named ``gallery`` (of class ``kind``), in page order."""
    return [text for name, cls, text in page["captions"] if name == gallery and (not kind or kind in cls.split())]


def assert_caption(caption: str, row: dict) -> None:
    """Relative path, true label, predicted label and score (as a percentage, to two decimals)."""
    lines = caption.splitlines()
    assert lines[0] == row["path"]
    assert lines[1] == f"true: {row['true']}"
    found = re.fullmatch(r"predicted: (.+) (\d+\.\d\d)%", lines[2])
    assert found and found[1] == row["label"]
    assert abs(float(found[2]) - 100 * float(row["score"])) <= 0.01 + 1e-9
