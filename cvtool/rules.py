"""Rules that reduce several probability rows into one: TTA views (``--reduce``) and ensemble members (``--rule``).

Each rule takes ``probs`` shaped [images, sources, classes] (sources are the
views of an image, or the members of an ensemble) and returns [images,
classes] rows that sum to 1, so the result can be written and ranked exactly
like one model's output. Adding a rule is one small function here, registered
in :data:`VIEW_REDUCERS`, :data:`ENSEMBLE_RULES` or both; the command line's
choices and help are built from those tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from cvtool.errors import UsageError
from cvtool.registry import Registry

Rule = Callable[[np.ndarray], np.ndarray]
_EPS = 1e-12

VIEW_REDUCERS = Registry("--reduce")  # how the TTA views of one image become one row
ENSEMBLE_RULES = Registry("--rule")  # how the members of an ensemble become one row


@VIEW_REDUCERS.register("mean", help="average")
@ENSEMBLE_RULES.register("mean", help="average")
def mean(probs: np.ndarray) -> np.ndarray:
    """Arithmetic mean of the probabilities."""
    return probs.mean(axis=1)


@ENSEMBLE_RULES.register("weighted", help="weighted average, --rule-weights one per model")
def weighted(probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean; ``weights`` (one per source) are normalised to sum to 1."""
    w = np.asarray(weights, dtype=np.float64)
    return np.einsum("nsc,s->nc", probs.astype(np.float64), w / w.sum()).astype(np.float32)


@ENSEMBLE_RULES.register("geometric", help="geometric mean")
def geometric(probs: np.ndarray) -> np.ndarray:
    """Geometric mean of the probabilities, renormalised to sum to 1 (punishes any source that says 'no')."""
    logp = np.log(np.clip(probs.astype(np.float64), _EPS, 1.0)).mean(axis=1)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@VIEW_REDUCERS.register("max", help="per-class maximum")
def maximum(probs: np.ndarray) -> np.ndarray:
    """Per-class maximum over the sources, renormalised to sum to 1."""
    p = probs.max(axis=1).astype(np.float64)
    return (p / np.maximum(p.sum(axis=1, keepdims=True), _EPS)).astype(np.float32)


@VIEW_REDUCERS.register("vote", help="majority of top-1 classes")
@ENSEMBLE_RULES.register("vote", help="majority of top-1 classes")
def vote(probs: np.ndarray) -> np.ndarray:
    """Majority of the sources' top-1 classes, ties broken by the mean probability.

    Scores are ``(votes + mean probability) / (sources + 1)``: they sum to 1,
    rank classes by votes first, and among equal votes by mean probability.
    """
    n, s, c = probs.shape
    votes = np.zeros((n, c), dtype=np.float64)
    top1 = probs.argmax(axis=2)
    np.add.at(votes, (np.repeat(np.arange(n), s), top1.ravel()), 1.0)
    return ((votes + probs.mean(axis=1)) / (s + 1)).astype(np.float32)


def get_rule(name: str, registry: Registry, weights: Sequence[float] | None = None, sources: int = 0) -> Rule:
    """The rule called ``name`` in ``registry``; ``weighted`` binds ``weights`` (one per source).

    Weights given to another rule are refused, not ignored (see :func:`check_weights`).

    Args:
        name: the rule's name.
        registry: :data:`VIEW_REDUCERS` or :data:`ENSEMBLE_RULES` (an unknown name lists its choices).
        weights: the weighted rule's weights.
        sources: how many sources the weights are for (0: not known yet).

    Example: ``get_rule("weighted", ENSEMBLE_RULES, [2, 1], 2)(probs)``.
    """
    rule = registry.get(name)
    check_weights(name, weights, sources)
    if name == "weighted":
        return lambda probs: weighted(probs, weights)
    return rule


def check_weights(rule: str, weights: Sequence[float] | None, sources: int = 0) -> None:
    """Refuse (exit 2) weights that the rule would ignore or that make no weighted mean.

    Only ``weighted`` takes weights: one per source (when ``sources`` is known), each a
    finite number >= 0, not all zero. ``nan`` or ``inf`` would write ``nan`` scores.

    Args:
        rule: the rule's name.
        weights: the weights given (None or empty: none).
        sources: how many members the weights are for (0: not known yet).

    Example: ``check_weights("weighted", [0.5, 0.5], 2)``.
    """
    if rule != "weighted":
        if weights:
            raise UsageError(f"--rule-weights are for --rule weighted; --rule {rule} does not use them")
        return
    if not weights:
        raise UsageError("the weighted rule needs --rule-weights, one per model (e.g. 0.5,0.3,0.2)")
    if sources and len(weights) != sources:
        raise UsageError(
            f"--rule-weights has {len(weights)} values for {sources} models "
            "(an ensemble run directory counts as each of its members)"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(
            f"--rule-weights must be finite numbers >= 0, not all zero; got {','.join(str(w) for w in weights)}"
        )


def parse_weights(text: str | None) -> list[float] | None:
    """``--rule-weights`` as numbers; empty -> None. ``nan`` and ``inf`` are refused (exit 2).

    Args:
        text: the option's value, a comma list.

    Example: ``parse_weights("0.5,0.3,0.2")`` is ``[0.5, 0.3, 0.2]``.
    """
    if not text or not text.strip():
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--rule-weights takes a comma list of numbers, got {text!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--rule-weights must be finite numbers, got {text!r}")
    return weights
