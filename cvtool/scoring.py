"""From decoded images to class probabilities: one model, TTA views, or an ensemble of models.

A :class:`Scorer` is the one thing predict, tta, ensemble and evaluate run in
their shared loop (:mod:`cvtool.inference`):

- :meth:`Scorer.decode` runs in the decode threads: it opens each image once
  per member input size (with that size's JPEG draft scale, so each member sees
  predict's pixels), then builds every view at that size;
- :meth:`Scorer.score` runs the views of a whole batch of images through each
  member in one ``predict`` call, reduces the views of each image
  (``reduce_views``), aligns each member's classes to the scorer's class order
  by name, and combines the members (``rule``).

A plain model is a scorer with one member and one view, so ``predict`` gives
exactly the model's own probabilities.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvtool import rules
from cvtool.bundle import Classifier, ModelSet, load_models
from cvtool.errors import UnusableError, UsageError
from cvtool.images import InputItem, open_rgb_sizes, resize

# views(image, (height, width), rng) -> list of uint8 HxWx3 arrays, the same number for every image.
Views = Callable[[Image.Image, tuple[int, int], np.random.Generator], list[np.ndarray]]


def plain_view(img: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    """The image as the model sees it in predict: resized to the input size."""
    return [resize(img, size)]


@dataclass
class Member:
    """One model of a scorer, and where its output columns go in the scorer's class order."""

    classifier: Classifier
    order: np.ndarray  # order[j] = the member's column for the scorer's class j

    @property
    def size(self) -> tuple[int, int]:
        return self.classifier.image_size


@dataclass
class Scorer:
    """Maps a batch of decoded images to probabilities [images, classes] in ``class_names`` order."""

    members: list[Member]
    class_names: list[str]
    views: Views = plain_view
    reduce_views: rules.Rule = rules.mean
    rule: rules.Rule = rules.mean
    rule_name: str = "mean"
    rule_weights: list[float] | None = None  # the weighted rule's, one per member
    seed: int = 0
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def decode(self, item: InputItem) -> list[np.ndarray]:
        """One [views, h, w, 3] array per member (shared between members of one size).

        Each member size gets its own JPEG draft scale (:func:`~cvtool.images.open_rgb_sizes`): a member
        sees exactly the pixels it sees in predict and training (a draft for a larger member would change them).
        """
        images = open_rgb_sizes(item.path, [m.size for m in self.members])
        by_size: dict[tuple[int, int], np.ndarray] = {}
        for m in self.members:
            if m.size not in by_size:
                img = images[m.size]
                # Seeded per image (not per thread or position): random views are reproducible, the same for
                # every member, and independent of batch size and decode order.
                rng = np.random.default_rng([self.seed, zlib.crc32(item.rel.encode("utf-8", "surrogateescape"))])
                by_size[m.size] = np.stack(self.views(img, m.size, rng))
        return [by_size[m.size] for m in self.members]

    def member_probs(self, payloads: Sequence[list[np.ndarray]]) -> np.ndarray:
        """Probabilities [images, members, views, classes], classes aligned to ``class_names``."""
        n = len(payloads)
        if n == 0:
            return np.zeros((0, len(self.members), 1, self.num_classes), dtype=np.float32)
        out = []
        for i, m in enumerate(self.members):
            views = np.stack([p[i] for p in payloads])  # [n, v, h, w, 3]
            v = views.shape[1]
            flat = views.reshape(n * v, *views.shape[2:])
            # Model calls of at most max(n, 32) images: on CPU, activations of huge batches spill out of cache.
            step = max(n, 32)
            probs = np.concatenate([m.classifier.predict(flat[j : j + step]) for j in range(0, n * v, step)])
            out.append(probs[:, m.order].reshape(n, v, -1))
        return np.stack(out, axis=1)

    def reduce_views_then_members(self, member_probs: np.ndarray) -> np.ndarray:
        """[images, members, views, classes] -> [images, classes]: reduce views per member, then members."""
        n, k, v, c = member_probs.shape
        if n == 0:
            return np.zeros((0, c), dtype=np.float32)
        per_member = member_probs[:, :, 0] if v == 1 else self.reduce_views(member_probs.reshape(n * k, v, c))
        per_member = per_member.reshape(n, k, c)
        return per_member[:, 0] if k == 1 else self.rule(per_member)

    def score(self, payloads: Sequence[list[np.ndarray]]) -> np.ndarray:
        return self.reduce_views_then_members(self.member_probs(payloads))

    # --- as an engine's work (cvtool.engines.Work): the scoring loop on every engine ---------------------------

    key = None  # images of every size are resized to the members' sizes: any of them stack

    def run(self, payloads: Sequence[list[np.ndarray]]) -> np.ndarray:
        """The engine's per-batch work: :meth:`member_probs`."""
        return self.member_probs(payloads)

    def join(self, results: list[np.ndarray]) -> np.ndarray:
        """Per-image scores [members, views, classes] stacked as :meth:`run` returns them."""
        if not results:
            return np.zeros((0, len(self.members), 1, self.num_classes), dtype=np.float32)
        return np.stack(results)

    def portable(self) -> Scorer:
        """This scorer without its models, to send to Ray's decode tasks and replicas (each replica loads them
        again). A model built in Python (not loaded from a path) cannot be loaded elsewhere: usage error."""
        return dataclasses.replace(self, members=[Member(m.classifier.without_model(), m.order) for m in self.members])

    def loaded(self) -> Scorer:
        """The portable scorer with its models loaded again, through :meth:`cvtool.bundle.Classifier.reload`."""
        return dataclasses.replace(self, members=[Member(m.classifier.reload(), m.order) for m in self.members])

    def decode_bytes(self) -> int:
        """One image's decoded views: every view at every member size."""
        options = getattr(self.views, "options", None)
        if options is not None:
            from cvtool.tta import view_counts

            views = sum(view_counts(options).values())
        else:
            views = 1
        return views * sum(h * w * 3 for h, w in {m.size for m in self.members})


def class_keys(classifier: Classifier) -> list[str]:
    """What identifies each class across models: WordNet ids where a model has them (ImageNet repeats
    two names, "crane" and "maillot"), else the class names."""
    return list(classifier.meta.get("wnids") or classifier.class_names)


def align(classifiers: Sequence[Classifier]) -> list[Member]:
    """Members in the first model's class order, matched by name; a different class set is refused (exit 3).

    Args:
        classifiers: the loaded models.

    Example: ``[m.order for m in align([a, b])]``.
    """
    if len(classifiers) == 1:
        c = classifiers[0]
        return [Member(c, np.arange(c.num_classes))]
    reference = class_keys(classifiers[0])
    members = []
    for c in classifiers:
        names = class_keys(c)
        if len(set(names)) != len(names):
            raise UnusableError(f"{c.source}: class names are not unique")
        if set(names) != set(reference):
            only_here = sorted(set(names) - set(reference))
            missing = sorted(set(reference) - set(names))
            raise UnusableError(
                f"models do not share one class set: {c.source} has {len(names)} classes vs {len(reference)} in "
                f"{classifiers[0].source} (only in {c.source}: {', '.join(only_here[:5]) or '-'}; "
                f"missing: {', '.join(missing[:5]) or '-'})"
            )
        members.append(Member(c, np.array([names.index(name) for name in reference])))
    return members


def load_model_sets(
    specs: Sequence[str | Path | Classifier],
    unsafe: bool = False,
    weights: str | Path | None = None,
    *,
    runtime: str = "auto",
) -> list[ModelSet]:
    """Load every MODEL argument; ``weights`` is for the ``imagenet:NAME`` ones.

    With one MODEL it is that model's weights file (or folder). With several, it goes to each
    ``imagenet:NAME`` model and must be a folder of ``NAME.h5`` files when there are several of those.

    Args:
        specs: run directories, ``.keras`` files, ``imagenet:NAME`` names or loaded classifiers.
        unsafe: allow models with Lambda layers or custom code.
        weights: a local weights file or folder for ``imagenet:NAME`` models.
        runtime: what runs each model: ``auto``, ``tf``, ``tflite`` or ``onnx`` (:func:`cvtool.bundle.choose_export`).

    Example: ``load_model_sets(["imagenet:resnet50", "imagenet:vgg16"], weights="weights/")``.
    """
    from cvtool.imagenet import is_imagenet_spec

    def takes_weights(spec) -> bool:
        return len(specs) == 1 or (not isinstance(spec, Classifier) and is_imagenet_spec(spec))

    if weights is not None and len(specs) > 1:
        if not any(takes_weights(s) for s in specs):
            raise UsageError("--weights is for imagenet:NAME models; none of the MODELs is one")
        if sum(takes_weights(s) for s in specs) > 1 and not Path(weights).is_dir():
            raise UsageError(
                "--weights names one model's weights file; for several imagenet: models give a folder of NAME.h5 "
                "files (or set CVTOOL_IMAGENET_WEIGHTS to one)"
            )
    return [
        ModelSet([s], source=s.source)
        if isinstance(s, Classifier)
        else load_models(s, unsafe, weights if takes_weights(s) else None, runtime=runtime)
        for s in specs
    ]


def build_scorer(
    sets: Sequence[ModelSet],
    rule: str | None = None,
    weights: Sequence[float] | None = None,
) -> Scorer:
    """A scorer over every member of ``sets`` (an ensemble run contributes all its members).

    Args:
        sets: the loaded MODEL arguments (:func:`load_model_sets`).
        rule: how members are combined (:data:`cvtool.rules.ENSEMBLE_RULES`); None takes the ensemble
            manifest's rule when a single ensemble run is given, else ``mean``.
        weights: the weighted rule's weights, one per member.

    Example: ``build_scorer(load_model_sets(["runs/a", "runs/b"]), rule="vote")``.
    """
    classifiers = [c for s in sets for c in s.members]
    if rule is None:
        rule = sets[0].rule if len(sets) == 1 and sets[0].rule else "mean"
        weights = weights or (sets[0].weights if len(sets) == 1 else None)
    members = align(classifiers)
    source = sets[0].source if len(sets) == 1 else ",".join(s.source for s in sets)
    scorer = Scorer(members, list(classifiers[0].class_names), source=source)
    combined = rules.get_rule(
        rule, rules.ENSEMBLE_RULES, weights, len(members)
    )  # checks the rule and weights, one model too
    if len(members) > 1:
        scorer.rule, scorer.rule_name = combined, rule
        scorer.rule_weights = [float(w) for w in weights] if rule == "weighted" else None
    return scorer


def load_scorer(
    model: str | Path | Classifier, unsafe: bool = False, weights: str | Path | None = None, *, runtime: str = "auto"
) -> Scorer:
    """The scorer for one MODEL argument: a model, or an ensemble run directory with its own rule.

    Args:
        model: a run directory, ``.keras`` file, ``imagenet:NAME``, ensemble run directory or classifier.
        unsafe: allow models with Lambda layers or custom code.
        weights: a local weights file (or folder) for an ``imagenet:NAME`` model.
        runtime: what runs the model: ``auto``, ``tf``, ``tflite`` or ``onnx``.

    Example: ``load_scorer("runs/ens").score(payloads)``.
    """
    return build_scorer(load_model_sets([model], unsafe, weights, runtime=runtime))
