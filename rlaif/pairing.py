"""Pure functions that turn per-image scores into one preference value per image and winner/loser pairs.

Several scorers have incomparable scales (PickScore ~20, HPS ~0.3, aesthetics ~5), so each scorer's
scores are first made comparable *within each prompt's candidates*, then averaged with the weights given:

- ``zscore`` (default): (score - mean) / std over the prompt's candidates (0 where all are equal);
- ``rank``: the candidate's rank among the prompt's candidates scaled to [0, 1] (ties share the mean rank).

With one scorer the raw scores are kept, so margins stay in the scorer's own units. Several scorers' combined
values are rounded to 1e-9, so that scorers which cancel out make an exact tie rather than a float-noise winner.
"""

from __future__ import annotations

import math
from itertools import combinations, product

import polars as pl

from rlaif.config import COMBINE_RULES, STRATEGIES

# Combined values are rounded to 1e-9 (of a standard deviation, or of the rank scale): scorers that cancel out
# (equal weights, opposite votes) then tie exactly, where float round-off (~1e-15) would pick a winner at random.
DECIMALS = 9
# A gap of --min-margin that float subtraction leaves a hair short (0.3 - 0.2 = 0.09999999999999998) still counts.
MARGIN_ROUND_OFF = 1e-9


def preference(scores: pl.DataFrame, weights: dict[str, float], rule: str = "zscore") -> pl.DataFrame:
    """One ``value`` per (prompt_id, sample_id) from long ``scores`` (prompt_id, sample_id, scorer, score)."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {rule!r}; choose from {COMBINE_RULES}")
    scores = scores.filter(pl.col("scorer").is_in(list(weights)))
    if len(weights) == 1:
        return scores.select("prompt_id", "sample_id", pl.col("score").alias("value"))
    by_prompt = ["prompt_id", "scorer"]
    if rule == "zscore":
        std = pl.col("score").std(ddof=0).over(by_prompt)
        normal = pl.when(std > 0).then((pl.col("score") - pl.col("score").mean().over(by_prompt)) / std).otherwise(0.0)
    else:
        count = pl.len().over(by_prompt)
        rank = pl.col("score").rank("average").over(by_prompt)
        normal = pl.when(count > 1).then((rank - 1) / (count - 1)).otherwise(0.5)
    weight = pl.col("scorer").replace_strict(weights, return_dtype=pl.Float64)
    total = sum(weights.values())
    return (
        scores.with_columns((normal * weight).alias("part"))
        .group_by("prompt_id", "sample_id", maintain_order=True)
        .agg((pl.col("part").sum() / total).round(DECIMALS).alias("value"))
    )


def candidate_pairs(values: list[tuple[str, float]], strategy: str, k: int = 1) -> list[tuple[int, int]]:
    """Index pairs (i, j) into one prompt's ``values`` [(sample_id, value)] that the strategy compares.

    ``best-worst``: the highest against the lowest; ``all-pairs``: every pair; ``top-vs-bottom``: each of
    the ``k`` highest against each of the ``k`` lowest (disjoint when there are fewer than 2k candidates).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    n = len(values)
    if n < 2:
        return []
    if strategy == "all-pairs":
        return list(combinations(range(n), 2))
    order = sorted(range(n), key=lambda i: (-values[i][1], values[i][0]))  # best first, ties by id
    k = 1 if strategy == "best-worst" else min(k, n // 2)
    return list(product(order[:k], order[-k:]))


def make_pairs(
    values: pl.DataFrame, strategy: str, k: int = 1, min_margin: float = 0.0, keep_ties: bool = False
) -> pl.DataFrame:
    """Pairs from ``values`` (prompt_id, sample_id, value): sample_id_0 < sample_id_1, label_0 = 1 if 0 wins.

    Pairs whose |value difference| is below ``min_margin`` (beyond float round-off) are dropped; exact ties are
    dropped unless ``keep_ties``, which labels them 0.5.
    """
    rows = []
    for (pid,), group in values.sort("prompt_id", "sample_id").group_by("prompt_id", maintain_order=True):
        items = list(zip(group["sample_id"].to_list(), group["value"].to_list(), strict=True))
        for i, j in candidate_pairs(items, strategy, k):
            (id_0, v_0), (id_1, v_1) = sorted((items[i], items[j]))
            margin = abs(v_0 - v_1)
            if margin == 0 and not keep_ties:
                continue
            if margin < min_margin and margin != 0 and not math.isclose(margin, min_margin, rel_tol=MARGIN_ROUND_OFF):
                continue
            label = 0.5 if margin == 0 else float(v_0 > v_1)
            rows.append({"prompt_id": pid, "sample_id_0": id_0, "sample_id_1": id_1, "label_0": label,
                         "score_0": v_0, "score_1": v_1})
    schema = {"prompt_id": pl.String, "sample_id_0": pl.String, "sample_id_1": pl.String,
              "label_0": pl.Float64, "score_0": pl.Float64, "score_1": pl.Float64}
    return pl.DataFrame(rows, schema=schema)
