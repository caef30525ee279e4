"""Paired base-vs-tuned statistics that respect the design of an evaluation: seeds nested in prompts.

A prompt's seeds are correlated (the prompt decides much of the score), so the unit of resampling is the
prompt: confidence intervals come from a percentile bootstrap over prompts (a cluster bootstrap), never
over (prompt, seed) comparisons as if they were independent, which makes intervals too narrow. Beside the
win rate, the size of the effect: the mean delta (tuned - base), absolute and relative to the base mean,
each with its interval, and a Wilcoxon signed-rank p-value over the per-prompt mean deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Effect:
    """How the tuned model compares with the base on one scorer (95% intervals, prompt-clustered)."""

    n: int  # comparisons: (prompt, seed) pairs
    prompts: int
    win_rate: float  # share of comparisons the tuned image wins (ties count half)
    ci_low: float
    ci_high: float
    mean_base: float
    mean_tuned: float
    delta: float  # mean_tuned - mean_base
    delta_low: float
    delta_high: float
    relative: float  # delta / |mean_base|
    relative_low: float
    relative_high: float
    p_value: float  # two-sided Wilcoxon signed-rank test of the per-prompt mean deltas


def wins(base: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """1 where tuned scores higher, 0.5 on a tie, 0 where base does."""
    return (tuned > base) + 0.5 * (tuned == base)


def paired_effect(base: np.ndarray, tuned: np.ndarray, clusters: np.ndarray, resamples: int = 2000,
                  seed: int = 0) -> Effect:
    """The ``Effect`` of paired scores ``base``/``tuned`` whose comparisons belong to ``clusters`` (the prompt
    of each). The bootstrap draws prompts with replacement and keeps all of a drawn prompt's comparisons; a
    fixed ``seed`` gives the same interval for the same data."""
    base, tuned = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    clusters = np.asarray(clusters)
    if base.shape != tuned.shape or base.ndim != 1 or base.size == 0 or clusters.shape != base.shape:
        raise ValueError("base, tuned and clusters must be equally long, non-empty vectors")
    _, index = np.unique(clusters, return_inverse=True)
    k = int(index.max()) + 1
    count = np.bincount(index, minlength=k).astype(float)
    sums = {name: np.bincount(index, weights=values, minlength=k)
            for name, values in (("win", wins(base, tuned)), ("base", base), ("tuned", tuned))}
    # one prompt: every resample is that prompt, and its zero-width interval would claim a certainty that a
    # bootstrap over prompts cannot give; the intervals are then undefined (nan)
    draws = np.random.default_rng(seed).integers(0, k, size=(resamples if k > 1 else 0, k))
    n = count[draws].sum(axis=1)
    drawn = {name: total[draws].sum(axis=1) for name, total in sums.items()}
    win_rates = drawn["win"] / n
    deltas = (drawn["tuned"] - drawn["base"]) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        relatives = deltas / np.abs(drawn["base"] / n)
    mean_base, mean_tuned = float(base.mean()), float(tuned.mean())
    delta = mean_tuned - mean_base
    per_prompt = (sums["tuned"] - sums["base"]) / count
    return Effect(
        n=int(base.size), prompts=k, win_rate=float(wins(base, tuned).mean()), **_interval("ci", win_rates),
        mean_base=mean_base, mean_tuned=mean_tuned, delta=delta, **_interval("delta", deltas),
        relative=delta / abs(mean_base) if mean_base else float("nan"), **_interval("relative", relatives),
        p_value=signed_rank_p(per_prompt),
    )


def _interval(name: str, values: np.ndarray) -> dict[str, float]:
    defined = values.size and np.isfinite(values).all()
    low, high = np.percentile(values, [2.5, 97.5]) if defined else (float("nan"),) * 2
    return {f"{name}_low": float(low), f"{name}_high": float(high)}


ALPHA = 0.05  # the level at which a result is called significant


def significance(low: float, high: float, p_value: float, null: float = 0.0) -> int:
    """1 (significantly above ``null``) or -1 (below) when the interval excludes ``null`` *and* the signed-rank
    test agrees (p < ALPHA); else 0. A percentile bootstrap over 2-5 prompts can exclude the null by chance
    (it has only a few distinct resamples), while the test cannot reach p < 0.05 with fewer than 6 prompts."""
    if not p_value < ALPHA:
        return 0
    return 1 if low > null else -1 if high < null else 0


def signed_rank_p(differences: np.ndarray) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that ``differences`` centre on 0 (zeros dropped;
    1.0 when all are zero), as scipy >= 1.15 chooses its method: exact up to 50 differences without ties or
    zeros, a permutation test up to 13 with them, the normal approximation otherwise. The
    differences are first rounded to a billionth of the largest: per-prompt means summed in another order differ
    in their last bits, which would split a tie (or hide a zero) and switch the test's method by chance."""
    from scipy.stats import wilcoxon

    differences = np.asarray(differences, dtype=float)
    step = 1e-9 * np.abs(differences).max(initial=0.0)
    if step > 0:
        differences = np.round(differences / step) * step
    if not np.any(differences != 0):
        return 1.0
    return float(wilcoxon(differences, zero_method="wilcox").pvalue)


def interval_decimals(low: float, high: float, percent: bool = False) -> int:
    """The decimals that show an interval's width to two digits (4 when it has no width), for its bounds, its
    estimate and the numbers it is the difference of (the means beside a delta)."""
    width = (high - low) * (100.0 if percent else 1.0)
    return min(6, max(0, 1 - math.floor(math.log10(width)))) if math.isfinite(width) and width > 0 else 4


def bounds_text(low: float, high: float, separator: str = "-") -> str:
    """A win rate's interval, ``0.640-0.850``, or ``no interval`` when it is undefined (one prompt)."""
    return f"{low:.3f}{separator}{high:.3f}" if math.isfinite(low) and math.isfinite(high) else "no interval"


def interval_text(value: float, low: float, high: float, percent: bool = False) -> str:
    """``value (low to high)``, signed, all three to ``interval_decimals`` (``+0.0135 (+0.0100 to +0.0174)``;
    ``percent``: ``+0.62% (+0.41% to +0.80%)``). Each sign is its number's own, even where the digits round to
    zero: a bound just below 0 reads ``-0.000``, so an interval that holds 0 never looks as if it did not."""
    scale, unit = (100.0, "%") if percent else (1.0, "")
    decimals = interval_decimals(low, high, percent)

    def text(number: float) -> str:
        return f"{'-' if number < 0 else '+'}{abs(number * scale):.{decimals}f}{unit}"

    if not (math.isfinite(low) and math.isfinite(high)):  # a single prompt, say: nothing to bootstrap
        return f"{text(value)} (no interval)"
    return f"{text(value)} ({text(low)} to {text(high)})"
