"""Prompt-clustered statistics: hand-computed cases, and coverage of the intervals on simulated evaluations
whose seeds are correlated within a prompt (as real ones are)."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from rlaif.stats import bounds_text, interval_text, paired_effect, signed_rank_p, wins


def test_hand_computed_effect():
    # two prompts (a, b), two seeds each
    base = np.array([1.0, 2.0, 3.0, 4.0])
    tuned = np.array([2.0, 2.0, 1.0, 6.0])
    effect = paired_effect(base, tuned, np.array(["a", "a", "b", "b"]))
    assert (effect.n, effect.prompts) == (4, 2)
    assert effect.win_rate == (1 + 0.5 + 0 + 1) / 4
    assert (effect.mean_base, effect.mean_tuned, effect.delta) == (2.5, 2.75, 0.25)
    assert effect.relative == pytest.approx(0.1)
    # a bootstrap over 2 prompts can only draw {a,a}, {a,b}, {b,b}: win rates 0.75, 0.625, 0.5
    assert effect.ci_low == pytest.approx(0.5) and effect.ci_high == pytest.approx(0.75)
    # per-prompt deltas: a +0.5, b 0.0 -> drawn means 0.5, 0.25, 0.0
    assert effect.delta_low == pytest.approx(0.0) and effect.delta_high == pytest.approx(0.5)
    # relative to each draw's base mean: 0.5 / 1.5, 0.25 / 2.5, 0 / 3.5
    assert effect.relative_low == pytest.approx(0.0) and effect.relative_high == pytest.approx(1 / 3)
    # a score below zero (compressibility's negative kilobytes): a fall is a negative relative change
    negative = paired_effect(-base, -tuned, np.array(["a", "a", "b", "b"]))
    assert negative.relative == pytest.approx(-0.1)
    assert negative.relative_low == pytest.approx(-1 / 3) and negative.relative_high == pytest.approx(0.0)


def test_the_interval_is_a_function_of_the_seed():
    """30 prompts, so resamples differ: the same seed gives the same interval, another seed another."""
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(30), 4)
    base, tuned = rng.normal(size=120), rng.normal(0.2, 1.0, size=120)
    effect = paired_effect(base, tuned, clusters, seed=0)
    assert paired_effect(base, tuned, clusters, seed=0) == effect
    other = paired_effect(base, tuned, clusters, seed=1)
    assert (other.delta_low, other.delta_high) != (effect.delta_low, effect.delta_high)


def test_identical_models_and_bad_input():
    scores = np.arange(6.0)
    effect = paired_effect(scores, scores, np.repeat([0, 1, 2], 2))
    assert (effect.win_rate, effect.ci_low, effect.ci_high, effect.delta, effect.p_value) == (0.5, 0.5, 0.5, 0.0,
                                                                                              1.0)
    with pytest.raises(ValueError):
        paired_effect(np.zeros(3), np.zeros(4), np.zeros(3))


def test_signed_rank_p_matches_the_exact_distribution():
    # 5 positive differences of distinct sizes: W+ = 15 is the most extreme of 2^5 sign patterns -> p = 2/32
    assert signed_rank_p(np.array([0.1, 0.2, 0.3, 0.4, 0.5])) == pytest.approx(2 / 32)
    assert signed_rank_p(np.array([0.1, -0.2, 0.3, -0.4, 0.5])) > 0.5


def test_signed_rank_p_with_ties_is_the_exact_permutation_test():
    """Few prompts with tied deltas: the p-value is the exact share of the 2^7 sign patterns whose rank sum lies
    as far from its mean (scipy >= 1.15; older scipy took the normal approximation here, 0.041 against 0.0625,
    either side of 0.05: rlaif requires scipy >= 1.15)."""
    import itertools

    differences = np.array([1.0, 1.0, 2.0, 3.0, -1.0, 4.0, 5.0])
    ranks = np.array([2.0, 2.0, 4.0, 5.0, 2.0, 6.0, 7.0])  # |d| ranked, the three 1s sharing rank 2
    observed = ranks[differences > 0].sum()
    centre = ranks.sum() / 2
    patterns = [ranks[np.array(signs, dtype=bool)].sum() for signs in itertools.product([0, 1], repeat=7)]
    expected = np.mean([abs(w - centre) >= abs(observed - centre) - 1e-12 for w in patterns])
    assert expected == 0.0625 and signed_rank_p(differences) == pytest.approx(expected)


def test_signed_rank_p_sees_a_tie_and_a_zero_that_float_round_off_split():
    """Two prompts whose mean deltas are equal, or one whose delta is 0, summed in another order differ in their
    last bits: the tie, the zero and with them scipy's choice of method must not hang on that (a new user's demo
    reported 1.2e-11 where its per-prompt table gave 1.0e-8)."""
    from scipy.stats import wilcoxon

    exact = np.random.default_rng(0).normal(0.3, 1.0, size=30)
    exact[5], exact[6] = exact[4], 0.0
    noisy = exact.copy()
    noisy[5], noisy[6] = np.nextafter(exact[4], 9.0), 1e-17
    assert wilcoxon(noisy).pvalue != wilcoxon(exact).pvalue
    assert signed_rank_p(noisy) == signed_rank_p(exact) == wilcoxon(exact).pvalue


def simulate(rng, prompts=30, seeds=4, shift=0.3, prompt_sd=1.0, noise_sd=0.2):
    """An evaluation whose score gain varies mostly by prompt: delta = shift + prompt effect + seed noise."""
    clusters = np.repeat(np.arange(prompts), seeds)
    base = rng.normal(size=prompts * seeds)
    delta = shift + rng.normal(scale=prompt_sd, size=prompts)[clusters] + rng.normal(scale=noise_sd,
                                                                                    size=prompts * seeds)
    return base, base + delta, clusters


def naive_interval(values, rng, resamples=1000):
    """The interval of a bootstrap over comparisons, as if a prompt's seeds were independent."""
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    return np.percentile(values[draws].mean(axis=1), [2.5, 97.5])


def test_clustered_intervals_cover_the_truth_and_per_comparison_ones_do_not():
    """True mean delta 0.3; true win rate P(delta > 0) = Phi(0.3 / sqrt(1 + 0.04)). With 4 strongly correlated
    seeds per prompt the effective sample is ~30 prompts, not 120 comparisons: the per-comparison interval is
    about half as wide as it should be and misses far more often than 5%."""
    rng = np.random.default_rng(2026)
    true_win = norm.cdf(0.3 / math.sqrt(1 + 0.2**2))
    covered = {"delta": 0, "win": 0, "naive delta": 0, "naive win": 0}
    runs = 300
    for run in range(runs):
        base, tuned, clusters = simulate(rng)
        effect = paired_effect(base, tuned, clusters, resamples=1000, seed=run)
        covered["delta"] += effect.delta_low <= 0.3 <= effect.delta_high
        covered["win"] += effect.ci_low <= true_win <= effect.ci_high
        low, high = naive_interval(tuned - base, rng)
        covered["naive delta"] += low <= 0.3 <= high
        low, high = naive_interval(wins(base, tuned), rng)
        covered["naive win"] += low <= true_win <= high
    coverage = {name: count / runs for name, count in covered.items()}
    # 300 draws: a true 95% coverage lands in [0.92, 0.98] with probability > 0.99 (binomial sd 1.3%); a
    # percentile bootstrap over 30 clusters runs a little narrow, hence the lower bound 0.90
    assert 0.90 <= coverage["delta"] <= 0.99, coverage
    assert 0.90 <= coverage["win"] <= 0.99, coverage
    assert coverage["naive delta"] < 0.80 and coverage["naive win"] < 0.85, coverage


def test_intervals_are_printed_to_the_decimals_their_width_needs():
    assert interval_text(0.01349, 0.0100, 0.0174) == "+0.0135 (+0.0100 to +0.0174)"  # not "+0.01349 (+0.01 to ..."
    assert interval_text(0.0062, 0.0041, 0.0080, percent=True) == "+0.62% (+0.41% to +0.80%)"
    assert interval_text(-0.00004, -0.0009, 0.0008, percent=True) == "-0.00% (-0.09% to +0.08%)"  # its own sign
    # a bound just below 0 keeps its sign: "+0.000" would hide that the interval holds 0 (a new user's eval)
    assert interval_text(0.012, -0.000157, 0.025) == "+0.012 (-0.000 to +0.025)"
    assert interval_text(0.0, 0.0, 0.002) == "+0.0000 (+0.0000 to +0.0020)"
    assert interval_text(0.5, float("nan"), float("nan")) == "+0.5000 (no interval)"
    assert bounds_text(0.64, 0.85) == "0.640-0.850" and bounds_text(float("nan"), float("nan")) == "no interval"


def test_one_prompt_has_no_interval():
    """A bootstrap over one prompt draws it every time: a zero-width interval would claim certainty (a category of
    PartiPrompts with one prompt under --max-prompts showed one)."""
    effect = paired_effect(np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 5.0]), np.array(["a", "a", "a"]))
    assert effect.prompts == 1 and effect.delta == pytest.approx(4 / 3)
    assert all(math.isnan(getattr(effect, f"{name}_{side}")) for name in ("ci", "delta", "relative")
               for side in ("low", "high"))
    two = paired_effect(np.array([1.0, 2.0]), np.array([2.0, 1.5]), np.array(["a", "b"]))
    assert math.isfinite(two.delta_low) and two.delta_low < two.delta_high
    assert interval_text(24.4, 15.3, 35.6) == "+24 (+15 to +36)"
    assert interval_text(0.5, 0.5, 0.5) == "+0.5000 (+0.5000 to +0.5000)"  # no width: 4 decimals
