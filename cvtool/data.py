"""Labelled folders and tf.data pipelines for training.

A labelled folder holds one sub-folder per class, or ``train/``,
``validation/`` (or ``val/``) and ``test/`` splits that each hold class
sub-folders. :func:`discover` reads either layout; :func:`decode_set` decodes
a split once into a uint8 array (the cache), and :func:`training_dataset`
serves shuffled, augmented batches from it with tf.data.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvtool.batches import Failure, decode_stream
from cvtool.errors import UnusableError, UsageError, env_int
from cvtool.images import InputItem, list_images, load_image
from cvtool.progress import Progress

SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
DEFAULT_CACHE_LIMIT = 6 * 1024**3  # decoded bytes held in memory before caching on disk


@dataclass
class LabelledSet:
    """Files with integer labels into ``class_names``."""

    items: list[InputItem] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices) -> LabelledSet:
        return LabelledSet([self.items[i] for i in indices], [self.labels[i] for i in indices])


@dataclass
class Splits:
    class_names: list[str]
    train: LabelledSet
    validation: LabelledSet
    test: LabelledSet
    layout: str  # "splits" (train/validation/test folders) or "classes"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for d in _subdirs(root):
        split = SPLIT_NAMES.get(d.name.lower())
        if split is not None:
            if split in found:
                raise UsageError(f"{root} has both {found[split].name}/ and {d.name}/; keep one")
            found[split] = d
    return found


def read_class_folders(
    folder: Path, class_names: list[str] | None = None, exclude: Path | None = None
) -> tuple[list[str], LabelledSet]:
    """Read ``folder/<class>/**/image`` files. With ``class_names`` given, folders must be among them.

    ``exclude``: a folder to leave out (the command's own output folder, when it is inside ``folder``).
    """
    skip = exclude.resolve() if exclude is not None else None
    class_dirs = {d.name: d for d in _subdirs(folder) if d.resolve() != skip}
    per_class = {name: list_images(d, exclude) for name, d in class_dirs.items()}
    per_class = {name: items for name, items in per_class.items() if items}
    if class_names is None:
        class_names = sorted(per_class)
    else:
        unknown = sorted(set(per_class) - set(class_names))
        if unknown:
            known = ", ".join(class_names[:20]) + (f", ... ({len(class_names)})" if len(class_names) > 20 else "")
            raise UnusableError(f"{folder} has classes the model does not know: {', '.join(unknown)} (known: {known})")
        shared = sorted(name for name in per_class if class_names.count(name) > 1)
        if shared:
            raise UnusableError(f"{folder}: the model has several classes named {', '.join(shared)}; use class ids")
    out = LabelledSet()
    for label, name in enumerate(class_names):
        for item in per_class.get(name, []):
            rel = f"{name}/{item.rel}"
            out.items.append(InputItem(item.path, rel))
            out.labels.append(label)
    return class_names, out


def discover(root: str | os.PathLike, val_split: float = 0.2, seed: int = 0) -> Splits:
    """Find classes and splits in a labelled folder.

    Without a validation folder, a stratified ``val_split`` fraction of each
    class is held out (seeded; 0 trains on everything).
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder not found: {root}")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val-split must be in [0, 1), got {val_split}")
    splits = split_dirs(root)
    if "train" in splits:
        class_names, train = read_class_folders(splits["train"])
        _check_classes(class_names, splits["train"])
        validation = read_class_folders(splits["validation"], class_names)[1] if "validation" in splits else None
        test = read_class_folders(splits["test"], class_names)[1] if "test" in splits else LabelledSet()
        layout = "splits"
    else:
        class_names, train = read_class_folders(root)
        _check_classes(class_names, root)
        validation, test, layout = None, LabelledSet(), "classes"
    if validation is None:
        train, validation = stratified_split(train, val_split, seed)
    return Splits(class_names, train, validation, test, layout)


def _check_classes(class_names: list[str], folder: Path) -> None:
    if len(class_names) < 2:
        found = f"found {len(class_names)}: {', '.join(class_names)}" if class_names else "found none"
        raise UnusableError(
            f"{folder} needs at least two class sub-folders with images ({found}); "
            "expected DATA/<class>/*.jpg or DATA/train/<class>/*.jpg"
        )


def stratified_split(data: LabelledSet, fraction: float, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """Hold out ``fraction`` of each class (at least one image per class when fraction > 0)."""
    if fraction <= 0:
        return data, LabelledSet()
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    train_idx, val_idx = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) > 1 else 0
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return data.subset(sorted(train_idx)), data.subset(sorted(val_idx))


@dataclass
class DecodedSet:
    """A split decoded once: images uint8 [N, H, W, 3] (in memory or memory-mapped), labels int32 [N]."""

    images: np.ndarray
    labels: np.ndarray
    items: list[InputItem]
    failures: list[Failure]


def decode_set(
    data: LabelledSet, image_size: tuple[int, int], desc: str = "decoding", quiet: bool = False, cache_dir=None
) -> DecodedSet:
    """Decode every file of ``data`` at ``image_size``; bad files become failures, the rest are kept."""
    n = len(data)
    nbytes = n * image_size[0] * image_size[1] * 3
    limit = env_int("CVTOOL_CACHE_LIMIT", DEFAULT_CACHE_LIMIT)
    if nbytes > limit:
        fd, name = tempfile.mkstemp(prefix="cvtool-cache-", suffix=".npy", dir=cache_dir)
        os.close(fd)
        images = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=(n, *image_size, 3))
        os.unlink(name)  # the mapping lives on until the array is dropped
    else:
        images = np.empty((n, *image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int32)
    kept_items, failures, kept = [], [], 0
    label_of = {id(item): label for item, label in zip(data.items, data.labels)}
    with Progress(n, desc, quiet) as progress:
        for item, result in decode_stream(data.items, lambda it: load_image(it.path, image_size)):
            progress.update()
            if isinstance(result, Failure):
                failures.append(result)
                continue
            images[kept] = result
            labels[kept] = label_of[id(item)]
            kept_items.append(item)
            kept += 1
    return DecodedSet(images[:kept], labels[:kept], kept_items, failures)


def training_dataset(
    decoded: DecodedSet,
    batch_size: int,
    shuffle: bool,
    seed: int,
    augment=None,
    num_classes: int | None = None,
    class_weights=None,
):
    """tf.data over a decoded split: shuffled indices -> batch gather -> augmentation -> prefetch.

    Labels are one-hot when ``num_classes`` is given (needed for label smoothing).
    With ``class_weights`` (one weight per class) batches are (x, y, sample_weight).
    ``decoded.images`` may also hold feature vectors [N, D] (hub backbones).
    """
    from cvtool.runtime import tf

    images, labels = decoded.images, decoded.labels
    n = len(labels)
    shape = [None, *images.shape[1:]]
    in_dtype = tf.as_dtype(images.dtype)
    weights = None if class_weights is None else tf.constant(np.asarray(class_weights, np.float32))
    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def gather(idx):
        order = np.sort(idx)  # sorted reads are kinder to a memory-mapped cache
        return images[order], labels[order]

    def load(idx):
        x, y = tf.numpy_function(gather, [idx], [in_dtype, tf.int32], stateful=False)
        x = tf.ensure_shape(tf.cast(x, tf.float32), shape)
        y = tf.ensure_shape(y, [None])
        w = None if weights is None else tf.gather(weights, y)
        if num_classes is not None:
            y = tf.one_hot(y, num_classes)
        return (x, y) if w is None else (x, y, w)

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if augment is not None:
        ds = ds.map(lambda x, *rest: (augment(x, training=True), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
