"""Which CAM method and target layer explain a trained run best: empty maps and the insertion metric.

    python bench/cam_quality.py RUN [FOLDER] [--options default:gradcam default:gradcam++ block3_bn2:gradcam]

FOLDER defaults to clothing-small/validation. Each option is LAYER:METHOD (LAYER ``default`` is cvtool's
own choice). For every image and its top-1 class:

  empty      maps with no positive value (the overlay shows no heat)
  insertion  Petsiuk et al.'s insertion AUC: start from the image blurred (Gaussian, sigma 5), put back
             its pixels in the order of the map (ties broken at random), 16 steps; the area under the
             class probability (higher: the map found the pixels the model uses). Baselines in the same
             run: a random order and a centred Gaussian (objects here are mostly centred).

The deletion metric is left out: pixels set to black are far outside these photos, so a random
order already scores best on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import default_folder

STEPS = 16


def insertion_auc(model, images: np.ndarray, classes: np.ndarray, saliency: np.ndarray, seed: int = 0) -> float:
    import cv2

    n, side = len(images), images.shape[1]
    pixels = side * side
    noise = 1e-6 * np.random.default_rng(seed).random((n, pixels))
    order = np.argsort(-(saliency.reshape(n, -1) + noise), axis=1)
    blurred = np.stack([cv2.GaussianBlur(im, (0, 0), 5) for im in images])
    curve = []
    for s in range(STEPS + 1):
        mask = np.zeros((n, pixels), np.float32)
        np.put_along_axis(mask, order[:, : round(pixels * s / STEPS)], 1.0, axis=1)
        mask = mask.reshape(n, side, side, 1)
        probs = model.predict(blurred * (1 - mask) + images * mask, verbose=0, batch_size=128)
        curve.append(probs[np.arange(n), classes])
    return float(np.trapezoid(np.stack(curve), dx=1 / STEPS, axis=0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("folder", type=Path, nargs="?", default=default_folder())
    parser.add_argument("--options", nargs="+", default=["default:gradcam", "default:gradcam++"])
    args = parser.parse_args()

    import cv2

    from cvtool.bundle import load_classifier
    from cvtool.cam import CamModel
    from cvtool.images import list_images, load_image

    clf = load_classifier(args.run)
    side = clf.model.input_shape[1]
    files = list_images(args.folder)
    images = np.stack([load_image(f.path, (side, side)) for f in files]).astype(np.float32)  # predict's pixels
    classes = clf.model.predict(images, verbose=0, batch_size=128).argmax(1)
    yy, xx = np.mgrid[0:side, 0:side]
    centre = np.exp(-((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (2 * (side / 4) ** 2))
    print(f"{args.run}: {len(files)} images of {args.folder} at {side} px")
    print("| layer | method | empty maps | insertion AUC |")
    print("| --- | --- | --- | --- |")
    rng = np.random.default_rng(1)
    for name, saliency in (("(random order)", rng.random(images.shape[:3])), ("(centred Gaussian)", centre)):
        saliency = np.broadcast_to(saliency, images.shape[:3])
        print(f"| {name} | - | - | {insertion_auc(clf.model, images, classes, saliency):.3f} |", flush=True)
    for option in args.options:
        layer, method = option.split(":")
        cams = CamModel(clf, layer=None if layer == "default" else layer, method=method)
        maps = np.concatenate(
            [
                np.asarray(cams.compute(images[i : i + 64].astype(np.uint8), classes=classes[i : i + 64]).maps)[:, 0]
                for i in range(0, len(images), 64)
            ]
        )
        empty = int((maps.reshape(len(maps), -1).max(axis=1) <= 0).sum())
        up = np.stack([cv2.resize(m.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR) for m in maps])
        auc = insertion_auc(clf.model, images, classes, up)
        print(f"| {cams.layer_name} | {cams.method_name} | {empty} of {len(maps)} | {auc:.3f} |", flush=True)


if __name__ == "__main__":
    main()
