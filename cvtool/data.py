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
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvtool.batches import Failure, decode_stream
from cvtool.errors import UnusableError, UsageError, env_int
from cvtool.images import InputItem, is_image_name, list_images, load_image
from cvtool.progress import Progress

SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
LAYOUTS = ("auto", "classes", "splits")
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


def _subdirs(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Visible sub-folders, sorted, without ``exclude`` (a command's own output folder)."""
    skip = Path(exclude).resolve() if exclude is not None else None
    visible = (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(p for p in visible if skip is None or p.resolve() != skip)


def class_name(folder_name: str) -> str:
    """The class a folder names, in Unicode NFC: folders made on macOS (NFD) name the same classes."""
    return unicodedata.normalize("NFC", folder_name)


def _looks_like_a_class(folder: Path) -> bool:
    """Image files right inside and no sub-folders: a class folder, whatever its name (CIFAR-100's ``train``)."""
    has_images = False
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            return False
        has_images = has_images or is_image_name(entry.name)
    return has_images


def split_dirs(root: Path, layout: str = "auto", exclude: Path | None = None) -> dict[str, Path]:
    """The split folders of ``root`` by split name (train, validation, test); ``{}`` for the classes layout.

    ``layout`` "auto" reads the top-level folders: folders named train/, validation/ (or val/)
    and test/ are splits when they hold class folders. A split-named folder that holds images
    itself is a class (CIFAR-100 has a ``train`` class). Split folders beside other folders are
    ambiguous and refused: "splits" then reads the split folders only, "classes" every folder.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "classes":
        return {}
    found, others = {}, []
    for d in _subdirs(root, exclude):
        split = SPLIT_NAMES.get(d.name.lower())
        if split is None:
            others.append(d)
            continue
        if split in found:
            raise UsageError(f"{root} has both {found[split].name}/ and {d.name}/; keep one")
        found[split] = d
    if layout == "splits":
        if not found:
            raise UsageError(f"--layout splits: {root} has no train/, validation/, val/ or test/ folder")
        return found
    if not found or all(_looks_like_a_class(d) for d in found.values()):
        return {}
    if others:
        names = ", ".join(f"{d.name}/" for d in found.values())
        other_names = ", ".join(f"{d.name}/" for d in others[:5]) + (", ..." if len(others) > 5 else "")
        raise UsageError(
            f"{root} has split folders ({names}) beside other folders ({other_names}); pass --layout splits to "
            "read the split folders only, or --layout classes to read every folder as a class"
        )
    return found


def read_class_folders(
    folder: Path,
    class_names: list[str] | None = None,
    exclude: Path | None = None,
    reference: str | None = None,
) -> tuple[list[str], LabelledSet]:
    """Read ``folder/<class>/**/image`` files. With ``class_names`` given, folders must be among them.

    Class names are compared in Unicode NFC (:func:`class_name`); paths keep the folders' own names.
    ``exclude``: a folder to leave out (the command's own output folder, when it is inside ``folder``).
    ``reference``: what ``class_names`` come from when it is not a model (the training split), for messages.
    """
    per_class: dict[str, list[InputItem]] = {}
    for d in _subdirs(folder, exclude):
        items = [InputItem(item.path, f"{d.name}/{item.rel}") for item in list_images(d, exclude)]
        if items:
            per_class.setdefault(class_name(d.name), []).extend(items)
    if class_names is None:
        class_names = sorted(per_class)
    else:
        wanted = [class_name(name) for name in class_names]
        unknown = sorted(set(per_class) - set(wanted))
        if unknown:
            known = ", ".join(class_names[:20]) + (f", ... ({len(class_names)})" if len(class_names) > 20 else "")
            if reference is not None:
                raise UnusableError(
                    f"{folder} has classes that {reference} does not have: {', '.join(unknown)} "
                    f"(it has: {known}); every class needs training images"
                )
            raise UnusableError(f"{folder} has classes the model does not know: {', '.join(unknown)} (known: {known})")
        shared = sorted(name for name in per_class if wanted.count(name) > 1)
        if shared:
            raise UnusableError(f"{folder}: the model has several classes named {', '.join(shared)}; use class ids")
        per_class = {class_names[wanted.index(name)]: items for name, items in per_class.items()}
    out = LabelledSet()
    for label, name in enumerate(class_names):
        for item in per_class.get(name, []):
            out.items.append(item)
            out.labels.append(label)
    return class_names, out


def discover(
    root: str | os.PathLike,
    val_split: float = 0.2,
    seed: int = 0,
    *,
    layout: str = "auto",
    exclude: str | os.PathLike | None = None,
) -> Splits:
    """Find classes and splits in a labelled folder.

    Without a validation folder, a stratified ``val_split`` fraction of each
    class is held out (seeded; 0 trains on everything). ``layout`` is
    :func:`split_dirs`'s; ``exclude`` a folder inside ``root`` never read as
    data (the run being written).

    Example: ``discover("photos/", 0.2, layout="classes", exclude="photos/run")``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"data folder not found: {root}")
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"--val-split must be in [0, 1), got {val_split}")
    exclude = Path(exclude) if exclude is not None else None
    splits = split_dirs(root, layout, exclude)
    if splits:
        if "train" not in splits:
            found = ", ".join(f"{d.name}/" for d in splits.values())
            raise UsageError(f"{root} has {found} but no train/ folder to train on")
        train_dir = splits["train"]
        class_names, train = read_class_folders(train_dir, exclude=exclude)
        _check_classes(class_names, train_dir)
        train = _under(train_dir.name, train)

        def other(split: str) -> LabelledSet | None:
            if split not in splits:
                return None
            found = read_class_folders(splits[split], class_names, exclude, reference=f"{train_dir.name}/")[1]
            return _under(splits[split].name, found)

        validation, test = other("validation"), other("test") or LabelledSet()
        layout = "splits"
    else:
        class_names, train = read_class_folders(root, exclude=exclude)
        _check_classes(class_names, root)
        validation, test, layout = None, LabelledSet(), "classes"
    if validation is None:
        train, validation = stratified_split(train, val_split, seed)
    return Splits(class_names, train, validation, test, layout)


def _under(split: str, data: LabelledSet) -> LabelledSet:
    """Items named from DATA (``train/dress/a.jpg``), so a file of one name in two splits stays two rows."""
    return LabelledSet([InputItem(item.path, f"{split}/{item.rel}") for item in data.items], data.labels)


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


def bootstrap_sample(decoded: DecodedSet, seed: int) -> DecodedSet:
    """``decoded`` resampled with replacement to its own size (seeded): a bagging member's training set.

    About 63% of the images appear, some several times. Example: ``bootstrap_sample(train_set, seed=43)``.
    """
    idx = np.sort(np.random.default_rng(seed).integers(0, len(decoded.labels), len(decoded.labels)))
    return DecodedSet(decoded.images[idx], decoded.labels[idx], [decoded.items[i] for i in idx], decoded.failures)


def drop_classes_without_images(
    class_names: list[str], train: DecodedSet, *others: DecodedSet
) -> tuple[list[str], list[str], list[DecodedSet]]:
    """(kept class names, dropped ones, [train, *others] relabelled) without the classes ``train`` has no image of.

    A class whose training files were all unreadable cannot be learnt: it is left out of
    every set (its validation images too) and the labels are renumbered in class order.
    """
    present = np.zeros(len(class_names), bool)
    present[np.unique(train.labels)] = True
    if present.all():
        return list(class_names), [], [train, *others]
    new_label = np.cumsum(present) - 1
    kept = [name for name, p in zip(class_names, present) if p]
    dropped = [name for name, p in zip(class_names, present) if not p]

    def relabel(s: DecodedSet) -> DecodedSet:
        keep = present[s.labels]
        items = [item for item, k in zip(s.items, keep) if k]
        return DecodedSet(s.images[keep], new_label[s.labels[keep]].astype(np.int32), items, s.failures)

    return kept, dropped, [relabel(s) for s in (train, *others)]


def training_dataset(
    decoded: DecodedSet,
    batch_size: int,
    shuffle: bool,
    seed: int,
    augment=None,
    num_classes: int | None = None,
    class_weights=None,
    mix=None,
):
    """tf.data over a decoded split: shuffled indices -> batch gather -> augmentation -> mixing -> prefetch.

    Labels are one-hot when ``num_classes`` is given (needed for label smoothing and ``mix``).
    ``mix``: (images, one-hot labels) -> (images, soft labels), MixUp/CutMix (:func:`cvtool.augment.build_mixer`).
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
    if mix is not None:
        ds = ds.map(lambda x, y, *rest: (*mix(x, y), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
