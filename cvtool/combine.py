"""Rules that combine several probability rows into one: TTA views and ensemble members.

Each rule takes ``probs`` shaped [images, sources, classes] (sources are the
views of an image, or the members of an ensemble) and returns [images,
classes] rows that sum to 1, so the result can be written and ranked exactly
like one model's output. Adding a rule is adding one small function here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from cvtool.errors import UsageError

Rule = Callable[[np.ndarray], np.ndarray]
_EPS = 1e-12


def mean(probs: np.ndarray) -> np.ndarray:
    """Arithmetic mean of the probabilities."""
    return probs.mean(axis=1)


def weighted(probs: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean; ``weights`` (one per source) are normalised to sum to 1."""
    w = np.asarray(weights, dtype=np.float64)
    return np.einsum("nsc,s->nc", probs.astype(np.float64), w / w.sum()).astype(np.float32)


def geometric(probs: np.ndarray) -> np.ndarray:
    """Geometric mean of the probabilities, renormalised to sum to 1 (punishes any source that says 'no')."""
    logp = np.log(np.clip(probs.astype(np.float64), _EPS, 1.0)).mean(axis=1)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def maximum(probs: np.ndarray) -> np.ndarray:
    """Per-class maximum over the sources, renormalised to sum to 1."""
    p = probs.max(axis=1).astype(np.float64)
    return (p / np.maximum(p.sum(axis=1, keepdims=True), _EPS)).astype(np.float32)


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


def get_rule(name: str, choices: Sequence[str], weights: Sequence[float] | None = None, sources: int = 0) -> Rule:
    """The rule called ``name`` (one of ``choices``); ``weighted`` binds ``weights`` (one per source).

    Weights given to another rule are refused, not ignored (see :func:`check_weights`).
    """
    table = {"mean": mean, "max": maximum, "vote": vote, "geometric": geometric, "weighted": weighted}
    if name not in choices or name not in table:
        raise UsageError(f"unknown rule {name!r}; choose from {', '.join(choices)}")
    check_weights(name, weights, sources)
    if name == "weighted":
        return lambda probs: weighted(probs, weights)
    return table[name]


def check_weights(rule: str, weights: Sequence[float] | None, sources: int = 0) -> None:
    """Refuse (exit 2) weights that the rule would ignore or that make no weighted mean.

    Only ``weighted`` takes weights: one per source (when ``sources`` is known), each a
    finite number >= 0, not all zero. ``nan`` or ``inf`` would write ``nan`` scores.
    """
    if rule != "weighted":
        if weights:
            raise UsageError(f"--weights (--rule-weights) are for --rule weighted; --rule {rule} does not use them")
        return
    if not weights:
        raise UsageError("the weighted rule needs --weights, one per model (e.g. 0.5,0.3,0.2)")
    if sources and len(weights) != sources:
        raise UsageError(f"--weights has {len(weights)} values for {sources} models")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(
            f"--weights must be finite numbers >= 0, not all zero; got {','.join(str(w) for w in weights)}"
        )


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.5,0.3,0.2"`` -> [0.5, 0.3, 0.2]; empty -> None. ``nan`` and ``inf`` are refused (exit 2)."""
    if not text or not text.strip():
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise UsageError(f"--weights takes a comma list of numbers, got {text!r}") from None
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"--weights must be finite numbers, got {text!r}")
    return weights
