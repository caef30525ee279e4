"""Preference values and pairing strategies against hand computations."""

import math

import numpy as np
import polars as pl
import pytest

from rlaif.pairing import candidate_pairs, make_pairs, preference

SCORES = pl.DataFrame({
    "prompt_id": ["a"] * 4 + ["b"] * 3,
    "sample_id": ["a0", "a1", "a2", "a3", "b0", "b1", "b2"],
    "scorer": ["x"] * 7,
    "score": [1.0, 4.0, 2.0, 4.0, 5.0, 5.0, 5.0],
})


def values(frame: pl.DataFrame) -> dict[str, float]:
    return dict(zip(frame["sample_id"], frame["value"], strict=True))


def test_one_scorer_keeps_raw_scores():
    assert values(preference(SCORES, {"x": 1.0})) == dict(zip(SCORES["sample_id"], SCORES["score"], strict=True))


def test_zscore_ensemble_matches_hand_computation():
    y = SCORES.with_columns(scorer=pl.lit("y"), score=pl.Series([0.0, 0.0, 3.0, 1.0, 2.0, 1.0, 0.0]))
    got = values(preference(pl.concat([SCORES, y]), {"x": 3.0, "y": 1.0}))
    # prompt a: x = [1, 4, 2, 4] -> mean 2.75, population std sqrt(1.6875); y = [0, 0, 3, 1] -> mean 1, std sqrt(1.5)
    zx = [(v - 2.75) / math.sqrt(1.6875) for v in (1, 4, 2, 4)]
    zy = [(v - 1.0) / math.sqrt(1.5) for v in (0, 0, 3, 1)]
    # pytest.approx's default (rel 1e-6, abs 1e-12): float64 on both sides, a few operations apart (~1e-15)
    for i in range(4):
        assert got[f"a{i}"] == pytest.approx((3 * zx[i] + zy[i]) / 4)
    # prompt b: x is constant (z = 0), y = [2, 1, 0] -> z = [1.2247, 0, -1.2247]
    assert got["b0"] == pytest.approx(math.sqrt(1.5) / 4)
    assert got["b1"] == pytest.approx(0.0)


def test_rank_ensemble_matches_hand_computation():
    y = SCORES.with_columns(scorer=pl.lit("y"), score=-pl.col("score"))
    got = values(preference(pl.concat([SCORES, y]), {"x": 2.0, "y": 1.0}, rule="rank"))
    # a: x ranks (1, 3.5, 2, 3.5) -> (0, 5/6, 1/3, 5/6); y is reversed -> (1, 1/6, 2/3, 1/6)
    # pytest.approx's default (rel 1e-6): float64 fractions on both sides (~1e-16 apart)
    assert got["a0"] == pytest.approx((2 * 0 + 1) / 3)
    assert got["a1"] == pytest.approx((2 * 5 / 6 + 1 / 6) / 3)
    assert got["a2"] == pytest.approx((2 / 3 + 2 / 3) / 3)


def test_strategies_pick_the_expected_pairs():
    items = [("s0", 0.1), ("s1", 0.9), ("s2", 0.5), ("s3", 0.7), ("s4", 0.3)]
    assert candidate_pairs(items, "best-worst") == [(1, 0)]
    assert len(candidate_pairs(items, "all-pairs")) == 10
    assert sorted(candidate_pairs(items, "top-vs-bottom", k=2)) == sorted([(1, 0), (1, 4), (3, 0), (3, 4)])
    assert candidate_pairs(items[:1], "best-worst") == []


def test_pairs_are_ordered_labelled_and_filtered():
    pairs = make_pairs(preference(SCORES, {"x": 1.0}), "all-pairs")
    assert pairs["prompt_id"].to_list() == ["a"] * 5  # b is all ties; a has one tie (a1, a3)
    row = pairs.filter((pl.col("sample_id_0") == "a0") & (pl.col("sample_id_1") == "a1")).row(0, named=True)
    assert (row["label_0"], row["score_0"], row["score_1"]) == (0.0, 1.0, 4.0)
    ties = make_pairs(preference(SCORES, {"x": 1.0}), "all-pairs", keep_ties=True)
    assert ties.height == 9 and ties.filter(pl.col("label_0") == 0.5).height == 4
    wide = make_pairs(preference(SCORES, {"x": 1.0}), "all-pairs", min_margin=2.0)
    assert sorted(zip(wide["sample_id_0"], wide["sample_id_1"], strict=True)) == [("a0", "a1"), ("a0", "a3"),
                                                                                     ("a1", "a2"), ("a2", "a3")]
    tenths = pl.DataFrame({"prompt_id": ["p"] * 3, "sample_id": ["s0", "s1", "s2"], "value": [0.3, 0.2, 0.25]})
    kept = make_pairs(tenths, "all-pairs", min_margin=0.1)  # 0.3 - 0.2 is 0.09999999999999998 in floats
    assert list(zip(kept["sample_id_0"], kept["sample_id_1"], strict=True)) == [("s0", "s1")]


@pytest.mark.parametrize("rule", ["zscore", "rank"])
def test_scorers_that_cancel_out_tie_exactly(rule):
    """Two scorers of equal weight that disagree on every prompt's two candidates cancel out: every pair is an
    exact tie (dropped by default, 0.5 when kept), never a winner picked by float round-off."""
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-5, 5, (200, 2)), rng.uniform(0, 1, (200, 2))
    y = np.where((x[:, :1] > x[:, 1:]) == (y[:, :1] > y[:, 1:]), y[:, ::-1], y)  # y always votes against x
    rows = [{"prompt_id": f"p{p}", "sample_id": f"p{p}-{s}", "scorer": name, "score": float(table[p, s])}
            for name, table in (("x", x), ("y", y)) for p in range(200) for s in range(2)]
    combined = preference(pl.DataFrame(rows), {"x": 1.0, "y": 1.0}, rule=rule)
    assert make_pairs(combined, "best-worst").is_empty()
    assert make_pairs(combined, "best-worst", keep_ties=True)["label_0"].unique().to_list() == [0.5]
