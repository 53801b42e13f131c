"""Batched Grad-CAM against a per-image loop: images/s and their ratio, measured in one run.

    python bench/gradcam.py [FOLDER] [--images 96] [--batch-size 32] [--arch small-cnn,mobilenet_v2]

FOLDER defaults to /work/shared/datasets/clothing-small/validation when it exists,
else generated images. Models are built with random weights (timing does not
depend on training). For each architecture, on the same decoded images:

  batched        CamModel.compute on batches of --batch-size (one tape per batch)
  per-image      CamModel.compute one image per call (the same compiled function)
  cookbook loop  the usual eager loop: GradientTape per image, top-1 class, mean gradients
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLOTHING = Path("/work/shared/datasets/clothing-small/validation")


def timed(fns: dict, repeat: int) -> dict:
    """Best wall time of each function over ``repeat`` interleaved rounds (the least disturbed by other load)."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def generated_folder(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def build_run(run: Path, arch: str, size: int, names: list[str]) -> Path:
    from cvtool.architectures import backbone_classifier, small_cnn
    from cvtool.backbones import get_backbone
    from cvtool.bundle import save_model, write_meta

    if arch == "small-cnn":
        model = small_cnn(len(names), (size, size))
    else:
        model = backbone_classifier(get_backbone(arch), len(names), (size, size), weights=None)
    save_model(model, run / "model.keras")
    write_meta(run, {"class_names": names, "image_size": [size, size], "arch": arch})
    return run


def cookbook_loop(cams, images: np.ndarray) -> None:
    """The per-image Grad-CAM most tutorials show, run eagerly (on the same gradient model)."""
    import tensorflow as tf

    for img in images:
        x = tf.convert_to_tensor(img[None].astype(np.float32))
        with tf.GradientTape() as tape:
            acts, feats = cams.tap(x, training=False)
            logits, probs = cams._scores(feats)
            loss = logits[:, int(tf.argmax(probs[0]))]
        grads = tape.gradient(loss, acts)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.reduce_sum(acts * weights[:, None, None, :], axis=-1))
        (cam / (tf.reduce_max(cam) + 1e-8)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=CLOTHING if CLOTHING.exists() else None)
    parser.add_argument("--images", type=int, default=96, help="images timed per method")
    parser.add_argument("--cookbook-images", type=int, default=32, help="images for the slow eager loop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="small-cnn,mobilenet_v2", help="comma list: small-cnn or a backbone name")
    parser.add_argument("--size", type=int, default=0, help="input side [default: 64 small-cnn, 128 others]")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds, methods interleaved (best kept)")
    args = parser.parse_args()

    import tensorflow as tf

    import cvtool.runtime  # noqa: F401 - quiet TensorFlow import, before tensorflow itself
    from cvtool.bundle import load_classifier
    from cvtool.cam import CamModel
    from cvtool.images import list_images, load_image

    tmp = Path(tempfile.mkdtemp(prefix="cvtool-bench-gradcam-"))
    folder = args.folder or generated_folder(tmp / "images", args.images)
    items = list_images(folder)[: args.images]
    names = sorted({i.rel.split("/")[0] for i in items}) if "/" in items[0].rel else ["a", "b", "c"]
    accel = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"# bench/gradcam.py: {platform.machine()}, {os.cpu_count()} cores, {accel}, TF {tf.__version__}")
    print(f"# {len(items)} images from {folder}; batch {args.batch_size}; best of {args.repeat} interleaved rounds")
    print(f"# load average at start: {os.getloadavg()[0]:.1f}")

    for arch in args.arch.split(","):
        size = args.size or (64 if arch == "small-cnn" else 128)
        run = build_run(tmp / f"run-{arch}", arch, size, names)
        clf = load_classifier(run)
        cams = CamModel(clf)
        images = np.stack([load_image(i.path, (size, size)) for i in items])
        bs = args.batch_size

        def batched(cams=cams, images=images, bs=bs):
            for s in range(0, len(images), bs):
                cams.compute(images[s : s + bs])

        def per_image(cams=cams, images=images):
            for s in range(len(images)):
                cams.compute(images[s : s + 1])

        batched()  # trace and warm up both shapes
        per_image()
        cookbook_loop(cams, images[:2])
        times = timed(
            {
                "batched": batched,
                "one": per_image,
                "cook": lambda cams=cams, images=images[: args.cookbook_images]: cookbook_loop(cams, images),
            },
            args.repeat,
        )
        t_batch, t_one, t_cook = times["batched"], times["one"], times["cook"]
        n, n_cook = len(images), min(len(images), args.cookbook_images)
        print(f"\n## {arch} at {size} px, target layer {cams.layer_name}")
        print(f"{'batched (batch ' + str(bs) + ')':<34} {n / t_batch:9.1f} images/s")
        print(f"{'per-image, same compiled fn':<34} {n / t_one:9.1f} images/s   batched is {t_one / t_batch:.2f}x")
        cook_ratio = (t_cook / n_cook) / (t_batch / n)
        print(f"{'per-image, eager cookbook loop':<34} {n_cook / t_cook:9.1f} images/s   batched is {cook_ratio:.2f}x")
    print(f"\n# load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
