"""`rlaif eval`: win rates against independent computations, categories, the report in a real browser."""

import dataclasses
import html
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import PROMPTS, cli_env, run_cli
from PIL import Image

from rlaif.errors import RlaifError
from rlaif.eval import check_images_held_out, compare, reward_hacking, unsteady_relative
from rlaif.pair_eval import judged_batches, trained_table
from rlaif.report import _win_table
from rlaif.scorers.jpeg import jpeg_kilobytes
from rlaif.stats import paired_effect, significance


def test_with_one_comparison_per_prompt_the_interval_is_the_binomial_one():
    """Each prompt its own cluster: n = 2000 comparisons with p = 0.7, the bootstrap interval matches the
    normal one, 0.7 +- 1.96 * 0.01025."""
    rng = np.random.default_rng(1)
    wins = rng.permutation(np.r_[np.ones(1400), np.zeros(600)])
    result = paired_effect(np.full(2000, 0.5), wins, np.arange(2000))
    half_width = 1.96 * np.sqrt(0.7 * 0.3 / 2000)
    assert result.win_rate == 0.7 and abs((result.ci_high - result.ci_low) / 2 - half_width) < 0.1 * half_width
    assert result.delta == pytest.approx(0.2) and result.prompts == 2000


def test_reward_hacking_is_flagged_when_the_trained_score_rises_and_a_held_out_one_falls():
    def row(scorer, role, low, high, p=0.01):
        return {"scorer": scorer, "role": role, "delta": (low + high) / 20, "delta_low": low / 10,
                "delta_high": high / 10, "relative": (low + high) / 2, "relative_low": low, "relative_high": high,
                "p_value": p}

    summary = pl.DataFrame([row("pickscore", "optimised", 0.02, 0.05), row("aesthetic", "held-out", -0.04, -0.01),
                            row("clip", "held-out", -0.02, 0.01)])
    (warning,) = reward_hacking(summary)
    assert warning == ("reward hacking? pickscore rose while held-out aesthetic fell significantly: -0.0025 (-0.0040 "
                       "to -0.0010) (-2.5% (-4.0% to -1.0%) of the base mean; 95% CIs), p = 0.01")
    assert reward_hacking(summary.with_columns(delta_low=pl.lit(-0.01))) == []  # the trained score did not rise
    # the intervals exclude 0, but the signed-rank test does not agree: not significant, no warning
    assert reward_hacking(summary.with_columns(p_value=pl.lit(0.5))) == []


def test_a_relative_interval_that_the_base_mean_swings_is_called_unsteady():
    """A score near 0 on some prompts (a new user's redness: -144% to -1% at a base mean of 0.18): the ratio's
    bootstrap swings with its denominator, and eval says to read the delta. A base mean well away from 0: quiet."""
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(12), 4)
    near_zero = np.repeat(np.r_[np.full(9, 0.004), np.full(3, 0.7)], 4)  # 3 red prompts, 9 with hardly any red
    steady = np.repeat(rng.uniform(0.9, 1.1, 12), 4)
    rows = []
    for name, base in (("redness", near_zero), ("brightness", steady)):
        tuned = base + rng.normal(0.01, 0.02, base.size)
        rows.append({"scorer": name, **dataclasses.asdict(paired_effect(base, tuned, clusters))})
    summary = pl.DataFrame(rows)
    (said,) = unsteady_relative(summary)
    red = rows[0]
    times = (red["relative_high"] - red["relative_low"]) / ((red["delta_high"] - red["delta_low"]) / red["mean_base"])
    assert times > 2 and said == (f"redness: the relative interval is {times:.0f} times as wide as the delta's over "
                                  "the base mean, as the base mean swings between resampled prompts (near 0 on "
                                  "some): read the delta's interval")


def test_a_handful_of_prompts_is_never_called_significant():
    """Two prompts of four seeds: the percentile bootstrap can draw only three distinct resamples, and its
    intervals exclude 0 on both scorers. The signed-rank test cannot reach p < 0.05 with 2 prompts, so neither
    the report's colours nor the reward-hacking warning call them significant (found by a review)."""
    clusters = np.repeat([0, 1], 4)
    base = np.zeros(8)
    rose = paired_effect(base, np.r_[np.full(4, 0.1), np.full(4, 0.2)] + np.tile([0, 0.01, 0.02, 0.03], 2), clusters)
    fell = paired_effect(base + 1.0, 1.0 - np.r_[np.full(4, 0.1), np.full(4, 0.3)], clusters)
    assert rose.delta_low > 0 and fell.delta_high < 0 and rose.p_value == fell.p_value == 0.5
    assert significance(rose.delta_low, rose.delta_high, rose.p_value) == 0
    assert significance(rose.ci_low, rose.ci_high, rose.p_value, null=0.5) == 0
    summary = pl.DataFrame([{"scorer": "pickscore", "role": "optimised", **dataclasses.asdict(rose)},
                            {"scorer": "aesthetic", "role": "held-out", **dataclasses.asdict(fell)}])
    assert reward_hacking(summary) == []
    # with six prompts that all rise, the test agrees with the interval
    six = paired_effect(np.zeros(24), np.repeat(np.arange(1, 7) / 10, 4), np.repeat(np.arange(6), 4))
    assert six.p_value < 0.05 and significance(six.delta_low, six.delta_high, six.p_value) == 1


def test_compare_breaks_down_by_category():
    paired = pl.DataFrame({"scorer": ["s"] * 4, "score_base": [0.0, 0.0, 1.0, 1.0], "score_tuned": [1.0, 1.0, 0.0, 1.0],
                           "Category": ["A", "A", "B", "B"], "prompt_id": ["p", "q", "r", "r"]})
    rows = compare(paired, 100, ["Category"]).select("category", "n", "win_rate", "mean_tuned").rows()
    assert rows == [("A", 2, 1.0, 1.0), ("B", 2, 0.25, 0.5)]
    (overall,) = compare(paired, 100, []).rows(named=True)
    assert (overall["n"], overall["prompts"], overall["win_rate"], overall["delta"]) == (4, 3, 0.625, 0.25)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_pairs):
    """A LoRA trained for a few steps on tiny, evaluated on 4 prompts with PartiPrompts-style categories."""
    folder = tmp_path_factory.mktemp("eval")
    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", folder / "lora",
                      "--max-steps", 8, "--batch-size", 2, "--learning-rate", 1e-3)
    assert trained.returncode == 0, trained.stderr
    pl.DataFrame({"Prompt": PROMPTS[4:8], "Category": ["Shapes", "Shapes", "Colours", "Colours"],
                  "Challenge": ["Basic"] * 4}).write_csv(folder / "held_out.tsv", separator="\t")
    result = run_cli("eval", "--base", "tiny", "--tuned", folder / "lora", "--prompts", folder / "held_out.tsv",
                     "--scorer", "compressibility", "--held-out", "incompressibility", "--per-prompt", 3, "--steps", 6,
                     "--batch-size", 12, "--out", folder / "eval", "--grid", 5)
    assert result.returncode == 0, result.stderr
    return folder / "eval", result


def test_eval_tables_match_an_independent_computation(evaluated):
    out, result = evaluated
    base = pl.read_parquet(out / "base" / "samples.parquet").sort("sample_id")
    tuned = pl.read_parquet(out / "tuned" / "samples.parquet").sort("sample_id")
    assert base["seed"].to_list() == tuned["seed"].to_list() and base.height == 12  # identical seeds
    from rlaif.seeding import image_seed

    # at eval's run seed 1, never the training samples' 0 (a sampler that ignored it would pass the line above)
    assert base["seed"].to_list() == [image_seed(1, prompt, candidate)
                                      for prompt, candidate in zip(base["prompt"], base["candidate"], strict=True)]
    kb_base = np.array([jpeg_kilobytes(Image.open(out / "base" / p)) for p in base["image"]])
    kb_tuned = np.array([jpeg_kilobytes(Image.open(out / "tuned" / p)) for p in tuned["image"]])
    assert not np.array_equal(kb_base, kb_tuned)  # the LoRA changed the images
    expected = ((kb_tuned < kb_base) + 0.5 * (kb_tuned == kb_base)).mean()
    table = {row["scorer"]: row for row in pl.read_parquet(out / "eval.parquet").iter_rows(named=True)}
    assert table["compressibility"]["n"] == 12
    assert (table["compressibility"]["role"], table["incompressibility"]["role"]) == ("optimised", "held-out")
    assert table["compressibility"]["win_rate"] == pytest.approx(expected)
    assert table["incompressibility"]["win_rate"] == pytest.approx(1 - expected)
    assert table["compressibility"]["mean_base"] == pytest.approx(-kb_base.mean())
    assert table["compressibility"]["ci_low"] <= expected <= table["compressibility"]["ci_high"]
    by_category = pl.read_parquet(out / "eval_by_category.parquet").filter(pl.col("scorer") == "compressibility")
    assert sorted(zip(by_category["column"], by_category["category"], by_category["n"], strict=True)) == [
        ("Category", "Colours", 6), ("Category", "Shapes", 6), ("Challenge", "Basic", 12)]
    assert f"{table['compressibility']['win_rate']:.3f}" in result.stdout
    assert "note: 4 prompts are too few for these intervals to mean much" in result.stderr
    assert "4 prompts are too few for these intervals to mean much" in (out / "report.html").read_text()  # shared
    delta = -(kb_tuned.mean() - kb_base.mean())
    assert table["compressibility"]["delta"] == pytest.approx(delta)
    assert table["compressibility"]["relative"] == pytest.approx(delta / kb_base.mean())
    assert table["compressibility"]["prompts"] == 4
    prompts = pl.read_parquet(out / "eval_by_prompt.parquet").filter(pl.col("scorer") == "compressibility")
    assert prompts.height == 4 and prompts["n"].to_list() == [3] * 4
    per_prompt = {pid: -(kb_tuned[i] - kb_base[i]).mean() for pid, i in
                  ((pid, (base["prompt_id"] == pid).to_numpy()) for pid in base["prompt_id"].unique())}
    assert dict(zip(prompts["prompt_id"], prompts["delta"], strict=True)) == pytest.approx(per_prompt)


def test_eval_records_what_its_numbers_were_measured_under(evaluated):
    """eval.parquet's metadata and the report say the prompts, steps, guidance (as resolved: tiny's pipeline
    default, not given) and seed: two evaluations at two guidance scales are otherwise alike."""
    import pyarrow.parquet as pq

    from rlaif.tables import EVAL_METADATA

    out, _ = evaluated
    settings = json.loads(pq.read_schema(out / "eval.parquet").metadata[EVAL_METADATA.encode()])
    assert {key: settings[key] for key in ("prompt_count", "per_prompt", "steps", "guidance", "seed", "dtype")} == \
        {"prompt_count": 4, "per_prompt": 3, "steps": 6, "guidance": 7.5, "seed": 1, "dtype": "fp32"}
    page = (out / "report.html").read_text()
    assert f"Measured under: prompts {out.parent / 'held_out.tsv'}; prompt count 4; per prompt 3; steps 6; " \
        "guidance 7.5; seed 1; width 64; height 64" in page


class Page(html.parser.HTMLParser):
    """Collects what a person would look for on the report."""

    def __init__(self):
        super().__init__()
        self.images, self.curves, self.cells, self._in_cell = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "svg" and "curve" in attrs.get("class", ""):
            self.curves.append(attrs["data-metric"])
        if tag == "td":
            self._in_cell = True

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell and data.strip():
            self.cells.append(data.strip())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_report_renders_in_a_headless_browser(evaluated, tmp_path):
    out, _ = evaluated
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr
    page = Page()
    page.feed(dom.stdout)
    assert len(page.images) == 10 and [i["class"] for i in page.images[:2]] == ["base", "tuned"]
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.images)  # self-contained
    assert page.curves == ["loss", "implicit_acc", "reward_margin"]
    rows = pl.read_parquet(out / "eval.parquet")
    for row in rows.iter_rows(named=True):
        assert row["scorer"] in page.cells and f"{row['win_rate']:.3f}" in page.cells
    shot = tmp_path / "shot.png"
    rendered = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,2400",
                               (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 60  # the tiny model's images, not text or borders
    assert colourful.mean() > 0.05


def test_eval_of_a_missing_tuned_folder_is_one_line(tmp_path):
    result = run_cli("eval", "--base", "tiny", "--tuned", tmp_path / "nope", "--prompts", tmp_path / "p.txt",
                     "--scorer", "compressibility", "--out", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip() == f"error: --tuned {tmp_path / 'nope'} does not exist"
    assert not (tmp_path / "o").exists()


def test_retraining_into_the_same_folder_remakes_the_tuned_samples(tiny_pairs, tmp_path):
    """Tuned samples are keyed by the tuned weights' content, not the folder's path: a model retrained into
    the same folder is sampled and scored anew; the base samples are reused."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[4:6]) + "\n")
    train = ["train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 3,
             "--batch-size", 2, "--learning-rate", 1e-2]
    evaluate = ["eval", "--base", "tiny", "--tuned", tmp_path / "lora", "--prompts", tmp_path / "p.txt",
                "--scorer", "compressibility", "--per-prompt", 2, "--steps", 4, "--out", tmp_path / "eval"]

    def images(side):
        return {p.relative_to(tmp_path): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted((tmp_path / "eval" / side / "images").rglob("*.png"))}

    assert run_cli(*train).returncode == 0
    assert run_cli(*evaluate).returncode == 0
    tuned_before, base_before = images("tuned"), images("base")
    retrained = run_cli(*train, "--overwrite", "--seed", 7, "--learning-rate", 3e-2)
    assert retrained.returncode == 0, retrained.stderr
    (tmp_path / "eval" / "eval_by_category.parquet").write_bytes(b"an earlier evaluation's, on categories")
    result = run_cli(*evaluate)
    assert result.returncode == 0, result.stderr
    # the samples it removes (hours of a real base model's, when a folder's weights changed) are said
    assert (f"note: {tmp_path / 'eval' / 'tuned'} holds images of other settings or another model (tuned "
            in result.stderr and "removing them and sampling again" in result.stderr), result.stderr
    assert f"{tmp_path / 'eval' / 'base'} holds" not in result.stderr
    assert not (tmp_path / "eval" / "eval_by_category.parquet").exists()  # these prompts have no categories
    tuned_after = images("tuned")
    assert tuned_after.keys() == tuned_before.keys()
    assert all(tuned_after[k][0] != tuned_before[k][0] for k in tuned_after)  # every tuned image made anew
    assert images("base") == base_before  # same bytes, never rewritten
    (row,) = pl.read_parquet(tmp_path / "eval" / "eval.parquet").rows(named=True)
    expected = np.mean([-jpeg_kilobytes(Image.open(tmp_path / k)) for k in tuned_after])
    assert row["mean_tuned"] == pytest.approx(expected)


def test_eval_pairs_judges_a_table_with_the_tuned_model_and_each_scorer(tiny_pairs, tmp_path):
    """`rlaif eval --pairs`: the scorer that made the labels agrees with all of them, its opposite with none, and
    a model trained on these pairs ranks their winners first more often than not (its DPO implicit accuracy)."""
    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 60,
                      "--batch-size", 2, "--learning-rate", 1e-3)
    assert trained.returncode == 0, trained.stderr
    result = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "--pairs", tiny_pairs, "--max-pairs", 24,
                     "-s", "compressibility", "-s", "incompressibility")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "scorer compressibility: accuracy 1.000 on 24 pairs" in lines
    assert "scorer incompressibility: accuracy 0.000 on 24 pairs" in lines
    assert "judged against the labels of column label_0 (--label-column chooses another)" in result.stderr
    assert f"{tiny_pairs} is the table it was trained on ({tmp_path / 'lora'}): on the pairs it trained on, " \
        "accuracy says what it learnt, not how it generalises" in result.stderr
    record = tmp_path / "lora" / "train.json"  # as a run of a table of more captions records its held-out pairs
    record.write_text(json.dumps({**json.loads(record.read_text()), "pairs_held_out": 3,
                                  "label_column": "ai_label_0"}))  # and as if trained on a relabelled table's AI labels
    again = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "--pairs", tiny_pairs, "--max-pairs", 2,
                    "-s", "compressibility")
    assert again.returncode == 0, again.stderr
    assert "on the pairs it trained on (all but the 3 pairs it held out by caption, whose accuracy its log gives as " \
        "the held-out accuracy), accuracy says what it learnt" in again.stderr
    assert "note: it trained on the labels of column ai_label_0, not label_0; pass --label-column ai_label_0 to " \
        "judge against those" in again.stderr
    flipped = tmp_path / "flipped.parquet"  # another label column beside label_0, as --relabel writes one
    pl.read_parquet(tiny_pairs).with_row_index().with_columns(  # one human tie, one pair without a label
        flipped=pl.when(pl.col("index") == 0).then(0.5).when(pl.col("index") == 1).then(None)
        .otherwise(1.0 - pl.col("label_0")),
        are_different=pl.col("index") != 2,  # and one pair of one picture twice, as Pick-a-Pic marks them
        **{side: pl.lit(f"{tiny_pairs.parent}/") + pl.col(side) for side in ("image_0", "image_1")},  # elsewhere now
    ).write_parquet(flipped)
    other = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "--pairs", flipped, "--max-pairs", 24,
                    "-s", "compressibility", "--label-column", "flipped")
    assert other.returncode == 0, other.stderr
    assert "scorer compressibility: accuracy 0.000 on 21 pairs" in other.stdout.splitlines()
    assert "judged against the labels of column flipped (--label-column chooses another); of the table's rows, " \
        "these are not judged, as none states a preference between two different pictures: 1 pair labelled 0.5, " \
        "1 pair without a label, 1 pair of one picture twice (are_different false)" in other.stderr
    assert "was trained on" not in other.stderr
    (model,) = [line for line in lines if line.startswith("tuned model (DPO implicit accuracy): accuracy ")]
    print(model)
    assert float(model.split()[6]) > 0.5 and "on 24 pairs, reward margin +" in model
    # a count that no batch of 4 divides: every pair is judged (before, 7 became 4, and 3 became 0 and "nan")
    for asked in (7, 3):
        result = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "--pairs", tiny_pairs, "--max-pairs",
                         asked, "-s", "compressibility")
        assert result.returncode == 0, result.stderr
        assert f"scorer compressibility: accuracy 1.000 on {asked} pairs" in result.stdout.splitlines()
        (model,) = [line for line in result.stdout.splitlines() if line.startswith("tuned model")]
        correct = float(model.split()[6]) * asked  # a whole number of pairs (a margin of exactly 0 is a miss)
        assert f"on {asked} pairs, reward margin" in model and correct == pytest.approx(round(correct), abs=0.01)
    missing = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "-s", "compressibility")
    assert missing.returncode == 2 and "missing --prompts (or give --pairs TABLE" in missing.stderr


def test_pairs_are_judged_all_in_equal_batches():
    assert judged_batches(600, 512, 4) == (512, 4, 1)
    assert judged_batches(6, 512, 4) == (6, 3, 1)
    assert judged_batches(7, 512, 4) == (7, 1, 1)
    assert judged_batches(10, 3, 4) == (3, 3, 1)
    assert judged_batches(600, 512, 4, processes=8) == (512, 4, 8)  # 64 pairs each
    assert judged_batches(12, 512, 4, processes=2) == (12, 3, 2)  # 6 each, in batches of 3
    assert judged_batches(7, 512, 4, processes=2) == (7, 1, 1)  # not split: both judge all 7


def test_eval_pairs_in_two_processes_splits_the_pairs_and_gives_the_numbers_of_one(tiny_pairs, tmp_path):
    """`eval --pairs` under torchrun: each process judges half the pairs (before, each judged all of them: no
    speed-up), and the accuracies are those of one process."""
    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 20,
                      "--batch-size", 2, "--learning-rate", 1e-3)
    assert trained.returncode == 0, trained.stderr
    args = ["eval", "-m", "tiny", "--tuned", str(tmp_path / "lora"), "--pairs", str(tiny_pairs), "--max-pairs", "12",
            "-s", "compressibility", "-s", "label_plugins:recording_brightness"]
    plugins = str(Path(__file__).parent)
    one = run_cli(*args, env=cli_env(PYTHONPATH=plugins, RLAIF_TEST_COUNT=str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(31500 + os.getpid() % 1000), "-m", "rlaif", *args],
        env=cli_env(OMP_NUM_THREADS="1", PYTHONPATH=plugins, RLAIF_TEST_COUNT=str(tmp_path / "two")),
        capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    ranks = [line.split()[0] for line in (tmp_path / "two").read_text().splitlines()]
    assert len((tmp_path / "one").read_text().splitlines()) == 24 and sorted(ranks) == ["0"] * 12 + ["1"] * 12

    def judged(output: str) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in output.splitlines() if ": accuracy " in line)

    alone, split = judged(one.stdout), judged(two.stdout)
    assert alone.keys() == split.keys() and len(alone) == 3, (one.stdout, two.stdout)
    model = "tuned model (DPO implicit accuracy)"
    assert {k: v for k, v in alone.items() if k != model} == {k: v for k, v in split.items() if k != model}
    accuracy, margin = (alone[model].split()[1], float(alone[model].split()[-1]))
    assert split[model].split()[1] == accuracy and float(split[model].split()[-1]) == pytest.approx(margin, rel=1e-3)


def test_the_report_colours_the_relative_change_by_its_own_interval():
    row = {"scorer": "s", "prompts": 40, "n": 80, "win_rate": 0.6, "ci_low": 0.45, "ci_high": 0.7, "mean_base": 2.0,
           "mean_tuned": 2.02, "delta": 0.02, "delta_low": 0.01, "delta_high": 0.03, "relative": 0.01,
           "relative_low": 0.005, "relative_high": 0.015, "p_value": 0.01}
    cells = _win_table(pl.DataFrame([row]), "t")
    assert '<span class="">0.600</span>' in cells  # the win rate's interval holds 0.5
    assert '<span class="good">+0.020 (+0.010 to +0.030)</span>' in cells
    assert "<td>2.000</td><td>2.020</td>" in cells  # the means to the delta's digits (not 2 and 2.02)
    assert '<span class="good">+1.00% (+0.50% to +1.50%)</span>' in cells
    falling = _win_table(pl.DataFrame([{**row, "relative": -0.01, "relative_low": -0.015, "relative_high": -0.005}]),
                         "t")
    assert '<span class="bad">-1.00% (-1.50% to -0.50%)</span>' in falling
    # the interval excludes 0 but the signed-rank test does not agree (a handful of prompts): left uncoloured
    unsure = _win_table(pl.DataFrame([{**row, "p_value": 0.25}]), "t")
    assert '<span class="">+0.020 (+0.010 to +0.030)</span>' in unsure


def test_captions_held_out_of_training_are_not_called_trained_on(tmp_path):
    """A table's --val-fraction captions were held out of training: evaluating on them is evaluating on prompts
    the model never trained on, and eval must not say otherwise (a review)."""
    from rlaif.eval import _trained_prompts
    from rlaif.train.pair_table import PairTable

    captions = [f"Prompt {i}" for i in range(40)]
    images = [f"i{i}.png" for i in range(80)]
    pl.DataFrame({"caption": captions, "image_0": images[:40], "image_1": images[40:], "label_0": [1.0] * 40}
                 ).write_parquet(tmp_path / "t.parquet")
    for name in images:
        (tmp_path / name).write_bytes(b"")
    held = {p.caption for p in PairTable(tmp_path / "t.parquet", hold_out=0.25).held_out_pairs()}
    assert 3 <= len(held) <= 18
    files = [str(tmp_path / "t.parquet")]
    assert set(_trained_prompts(files, captions, 0.25)) == set(captions) - held
    assert _trained_prompts(files, captions, None) == _trained_prompts(files, captions, 0.0) == captions


def test_eval_refuses_the_images_the_model_was_trained_on(tiny_pairs, tmp_path):
    """tiny_pairs was sampled at run seed 0: evaluating on its prompts at seed 0 would compare the training samples
    themselves (a new user's run scored 0.750 there against 0.562 on held-out prompts)."""
    shutil.copytree(tiny_pairs.parent, tmp_path / "run")  # a copy: this test rewrites its table
    table = tmp_path / "run" / tiny_pairs.name
    trained = run_cli("train", table, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 1)
    assert trained.returncode == 0, trained.stderr
    info = json.loads((tmp_path / "lora" / "train.json").read_text())
    assert info["sampled_seeds"] == [0] and info["pairs_file"].startswith(str(table.resolve()))
    trained_prompts = (tiny_pairs.parent.parent / "p.txt").read_text().splitlines()
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["a prompt never trained on", *trained_prompts]) + "\n")
    result = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "-p", prompts, "-s", "compressibility",
                     "--seed", 0, "-o", tmp_path / "e")
    assert result.returncode == 2 and not (tmp_path / "e").exists()
    assert result.stderr.startswith(f"error: --seed 0 with 4 of 5 prompts that {tmp_path / 'lora'} was trained on "
                                    f"(its pairs table {table.resolve()} was sampled at run seed 0, e.g. ")
    # new seeds of trained prompts: evaluated, and said to be what they are (a new user's trial)
    seeds = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "-p", prompts, "-s", "compressibility",
                    "--seed", 1, "-n", 1, "-o", tmp_path / "e1")
    assert seeds.returncode == 0, seeds.stderr
    said = (f"4 of the 5 prompts are captions of {tmp_path / 'lora'}'s pairs table {table.resolve()} (e.g. "
            f"{trained_prompts[0]!r}): at --seed 1 they are new images of prompts it trained on, which says less "
            "than prompts it never saw would about how it generalises")
    assert f"note: {said}" in seeds.stderr
    assert html.escape(said) in (tmp_path / "e1" / "report.html").read_text()
    assert check_images_held_out(tmp_path / "lora", ["a prompt never trained on"], 0) is None  # a new prompt: fine
    # the table relabelled in place after training, now without the first prompt: read as it is now, that prompt
    # would pass as held out at the very seed it was trained at
    assert trained_table(tmp_path / "lora", str(table)) == "the table it was trained on"
    pl.read_parquet(table).filter(pl.col("caption") != trained_prompts[0]).write_parquet(table)
    assert trained_table(tmp_path / "lora", str(table)) == "the table it was trained on, changed since"
    for reason in ("changed", "gone"):
        with pytest.raises(RlaifError, match=f"^--seed 0: .* was trained on images sampled at run seed 0, and its "
                                             f"pairs table .* is {reason} since, so which prompts it saw cannot be "
                                             "checked; pass another --seed"):
            check_images_held_out(tmp_path / "lora", [trained_prompts[0]], 0)
        table.unlink(missing_ok=True)
    check_images_held_out(tmp_path / "lora", [trained_prompts[0]], 1)  # another seed needs no table


def test_a_scorer_the_model_was_trained_on_is_not_held_out(tiny_pairs, tmp_path):
    """The roles come from the pairs the model learnt from (their labelling record), not from the option typed: a
    label scorer passed as --held-out would be reported as held out and hide reward hacking (found by a review);
    a --scorer that labelled none of them is reported as optimised, with a note."""
    from rlaif.config import EvalConfig
    from rlaif.eval import check_roles

    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 1)
    assert trained.returncode == 0, trained.stderr

    def roles(scorers, held_out):
        return check_roles(EvalConfig(base="tiny", tuned=tmp_path / "lora", prompts="p.txt", out=tmp_path / "e",
                                      scorers=scorers, held_out=held_out))

    assert roles(["compressibility"], ["incompressibility"]) == []
    with pytest.raises(RlaifError, match=rf"^--held-out compressibility: {tmp_path / 'lora'} was trained on pairs "
                                         rf"labelled by compressibility \({tiny_pairs.resolve()}\), so it is not held "
                                         "out; pass it as --scorer$"):
        roles(["incompressibility"], ["compressibility"])
    assert roles(["incompressibility"], []) == [
        f"--scorer incompressibility: {tmp_path / 'lora'} was trained on pairs labelled by compressibility, not by "
        "this scorer; it is reported as optimised all the same (pass it as --held-out to have it watched for reward "
        "hacking)"]
    # a relabelled table (human label_0, the scorer's ai_label_0 beside it) trained on its human labels: the scorer
    # that wrote the AI labels did not train the model, and may be held out (a review found it refused)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(tiny_pairs)
    relabelled = tmp_path / "relabelled.parquet"
    pq.write_table(table.append_column("ai_label_0", pa.array([0.0] * table.num_rows)), relabelled)
    record = tmp_path / "lora" / "train.json"
    info = json.loads(record.read_text())
    for column, refused in (("label_0", False), ("ai_label_0", True)):
        record.write_text(json.dumps({**info, "config": {**info["config"], "pairs": str(relabelled)},
                                      "label_column": column}))
        if refused:
            with pytest.raises(RlaifError, match="^--held-out compressibility: "):
                roles(["incompressibility"], ["compressibility"])
        else:
            assert roles(["incompressibility"], ["compressibility"]) == []


def test_an_optimised_scorer_is_scored_with_the_options_it_labelled_with(tiny_pairs, tmp_path):
    """A new user's trial labelled with a plugin's option and evaluated without it: eval reported another score as
    the one optimised, without a word. It now says so, with the options that score it as trained (`rlaif loop`
    fills them in; a note, not a refusal, since a model path in an option may differ between machines alone)."""
    import pyarrow.parquet as pq

    from rlaif.config import EvalConfig
    from rlaif.eval import check_roles
    from rlaif.label import LABELLING_METADATA

    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 1)
    assert trained.returncode == 0, trained.stderr

    def roles(options):
        return check_roles(EvalConfig(base="tiny", tuned=tmp_path / "lora", prompts="p.txt", out=tmp_path / "e",
                                      scorers=["compressibility"], scorer_options=options))

    assert roles([]) == []
    (said,) = roles(["compressibility.level=9"])
    assert re.fullmatch(r"--scorer compressibility: .* was trained on pairs it labelled with no options \(.*\); "
                        "scored otherwise here, it is reported as optimised though it may not be the score trained "
                        "on: to score it as trained, drop its --scorer-option", said), said
    table = pq.read_table(tiny_pairs)  # as if labelled with --scorer-option compressibility.level=9, and a repeat
    metadata = dict(table.schema.metadata)  # of one key, as an rlaif before 2026-11-29 let through (the last won)
    labelling = json.loads(metadata[LABELLING_METADATA.encode()])
    metadata[LABELLING_METADATA.encode()] = json.dumps(
        {**labelling, "scorer_options": ["compressibility.level=1", "compressibility.level=9"]})
    pq.write_table(table.replace_schema_metadata(metadata), tmp_path / "levelled.parquet")
    record = tmp_path / "lora" / "train.json"
    info = json.loads(record.read_text())
    record.write_text(json.dumps({**info, "config": {**info["config"], "pairs": str(tmp_path / "levelled.parquet")}}))
    assert roles(["compressibility.level=9"]) == []
    for options in ([], ["compressibility.level=8"], ["compressibility.level=9", "compressibility.other=1"]):
        (said,) = roles(options)
        assert re.search(r"labelled with level=9 \(.*levelled.parquet\); .*: to score it as trained, give it "
                         "exactly --scorer-option compressibility.level=9$", said), said


def test_eval_refuses_the_images_of_the_init_chain_too(tiny_pairs, tmp_path):
    """Round 2 of iterative DPO (`train --init` round 1) learnt from round 1's images as well: its prompts at round
    1's seed are refused, though round 2's own table was sampled at another seed. Training on round 1's samples
    without --init round 1 says so."""
    import pyarrow.parquet as pq

    from rlaif.tables import SAMPLING_METADATA
    from rlaif.train.outputs import weights_identity

    shutil.copytree(tiny_pairs.parent, tmp_path / "run")
    first = tmp_path / "run" / tiny_pairs.name
    assert run_cli("train", first, "--model", "tiny", "--out", tmp_path / "r1", "--max-steps", 1).returncode == 0
    table = pq.read_table(first)  # round 2's table: the same rows, as if sampled from round 1 at run seed 7
    metadata = dict(table.schema.metadata)
    metadata[SAMPLING_METADATA.encode()] = json.dumps({**json.loads(metadata[SAMPLING_METADATA.encode()]),
                                                       "seed": 7, "tuned": weights_identity(tmp_path / "r1")}).encode()
    pq.write_table(table.replace_schema_metadata(metadata), tmp_path / "run" / "round2.parquet")
    second = run_cli("train", tmp_path / "run" / "round2.parquet", "--model", "tiny", "--init", tmp_path / "r1",
                     "--out", tmp_path / "r2", "--max-steps", 1)
    assert second.returncode == 0 and "note:" not in second.stderr, second.stderr
    forgot = run_cli("train", tmp_path / "run" / "round2.parquet", "--model", "tiny", "--out", tmp_path / "off",
                     "--max-steps", 1)  # round 2 without --init: the base trained on round 1's samples
    assert forgot.returncode == 0 and (f"note: pairs table {tmp_path / 'run' / 'round2.parquet'} was sampled from a "
                                       "tuned model, and this run starts from tiny itself; for the next round of "
                                       "iterative DPO, pass --init the model that sampled it") in forgot.stderr
    info = json.loads((tmp_path / "r2" / "train.json").read_text())
    assert info["sampled_seeds"] == [7] and [t["sampled_seeds"] for t in info["earlier_tables"]] == [[0]]
    trained_prompts = (tiny_pairs.parent.parent / "p.txt").read_text().splitlines()
    for seed, table_name in ((0, first.name), (7, "round2.parquet")):
        with pytest.raises(RlaifError, match=f"^--seed {seed} with 4 of 4 prompts that .*r2 was trained on \\(its "
                                             f"pairs table .*{table_name} was sampled at run seed {seed}"):
            check_images_held_out(tmp_path / "r2", trained_prompts, seed)
    assert check_images_held_out(tmp_path / "r2", trained_prompts, 1).startswith(  # new seeds: a note
        f"4 of the 4 prompts are captions of {tmp_path / 'r2'}'s pairs table ")
    assert check_images_held_out(tmp_path / "r2", ["a prompt never trained on"], 1) is None
    assert trained_table(tmp_path / "r2", str(first)) == "the table it was trained on through --init"
    assert trained_table(tmp_path / "r2", str(tmp_path / "run" / "round2.parquet")) == "the table it was trained on"


def test_a_hub_id_or_url_trained_on_is_named_as_the_training_table(tmp_path):
    """train.json records a hub dataset id or an fsspec URL as given: `eval --pairs` with the same one is the table
    the model trained on (it was named only for a local path)."""
    for source in ("someone/pairs", "file:///data/pairs"):
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "train.json").write_text(json.dumps({"config": {"pairs": source}, "pairs_file": "x"}))
        assert trained_table(tmp_path / "t", source) == "the table it was trained on"
        assert trained_table(tmp_path / "t", "someone/other") is None


def test_eval_notes_prompts_of_a_table_that_records_no_seeds(tiny_pairs, tmp_path):
    """A table rebuilt outside rlaif (pandas drops the parquet metadata) records no run seed: eval cannot refuse
    the training images, so it says which prompts it cannot check."""
    import pandas as pd

    rebuilt = tmp_path / "run" / "rebuilt.parquet"
    rebuilt.parent.mkdir()
    frame = pd.read_parquet(tiny_pairs)
    frame["image_0"] = [str(tiny_pairs.parent / p) for p in frame["image_0"]]
    frame["image_1"] = [str(tiny_pairs.parent / p) for p in frame["image_1"]]
    frame.to_parquet(rebuilt)
    trained = run_cli("train", rebuilt, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 1)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "lora" / "train.json").read_text())["sampled_seeds"] == []
    trained_prompts = (tiny_pairs.parent.parent / "p.txt").read_text().splitlines()
    assert check_images_held_out(tmp_path / "lora", ["a prompt never trained on"], 0) is None
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a prompt never trained on\n{trained_prompts[0]}\n")
    result = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "lora", "-p", prompts, "-s", "compressibility",
                     "--seed", 0, "-n", 1, "--steps", 2, "-o", tmp_path / "e")
    assert result.returncode == 0, result.stderr
    assert (f"note: 1 of the 2 prompts are captions of {tmp_path / 'lora'}'s pairs table {rebuilt.resolve()}, which "
            "records no run seed of its images (not paired by `rlaif label` from `rlaif sample` runs: Pick-a-Pic, or a "
            "table `label --relabel` wrote), so whether these are its training "
            "images cannot be checked: --seed 0 must differ from the seed they were sampled with") in result.stderr


def test_eval_refuses_another_base_than_the_one_trained_from(tiny_pairs, tmp_path):
    """A tuned model compared with another base than the one it was trained from measures the two bases'
    difference too (a trial's +1.07% was +0.76% against the right base): refused, in eval and eval --pairs. The
    same weights elsewhere (a copy, the hub cache's snapshot) are the same base."""
    from conftest import install_in_hf_cache
    from diffusers import UNet2DConditionModel

    from rlaif.tiny import TINY_SD_DIR
    from rlaif.train.outputs import check_trained_from

    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 1,
                      "--batch-size", 2)
    assert trained.returncode == 0, trained.stderr
    shutil.copytree(TINY_SD_DIR, tmp_path / "copy")
    install_in_hf_cache("someone/tiny-copy", TINY_SD_DIR)
    for same in ("tiny", str(tmp_path / "copy"), "someone/tiny-copy"):
        check_trained_from(tmp_path / "lora", same)  # no error
    shutil.copytree(TINY_SD_DIR, tmp_path / "other")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "other" / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)  # another revision: the same architecture, other weights
    unet.save_pretrained(tmp_path / "other" / "unet")
    (tmp_path / "p.txt").write_text(PROMPTS[6] + "\n")
    message = (f"error: --tuned {tmp_path / 'lora'} was trained from tiny, whose weights differ from --model "
               f"{tmp_path / 'other'}'s: a comparison with another base measures the bases' difference too; pass "
               "--model tiny")
    evaluated = run_cli("eval", "--model", tmp_path / "other", "--tuned", tmp_path / "lora", "--prompts",
                        tmp_path / "p.txt", "--scorer", "compressibility", "--out", tmp_path / "eval")
    assert evaluated.returncode == 2 and evaluated.stderr.strip() == message, evaluated.stderr
    assert not (tmp_path / "eval").exists()
    judged = run_cli("eval", "--model", tmp_path / "other", "--tuned", tmp_path / "lora", "--pairs", tiny_pairs,
                     "--scorer", "compressibility")
    assert judged.returncode == 2 and judged.stderr.strip() == message, judged.stderr
    # trained from a folder that was rewritten since: the same name, other weights
    shutil.copytree(TINY_SD_DIR, tmp_path / "folder")
    assert run_cli("train", tiny_pairs, "--model", tmp_path / "folder", "--out", tmp_path / "from-folder",
                   "--max-steps", 1, "--batch-size", 2).returncode == 0
    shutil.copytree(tmp_path / "other" / "unet", tmp_path / "folder" / "unet", dirs_exist_ok=True)
    rewritten = run_cli("eval", "--model", tmp_path / "folder", "--tuned", tmp_path / "from-folder", "--pairs",
                        tiny_pairs, "--scorer", "compressibility")
    assert rewritten.returncode == 2 and rewritten.stderr.strip() == (
        f"error: --tuned {tmp_path / 'from-folder'} was trained from {tmp_path / 'folder'}, whose weights have "
        "changed since (a new revision, or a rewritten folder): a comparison with other base weights measures their "
        "difference too; evaluate against the weights it was trained from"), rewritten.stderr


def test_eval_pairs_meeting_a_bad_image_leaves_the_tuned_models_log(tiny_pairs, tmp_path):
    """eval --pairs measures with the training code's held-out step, whose bad-input stop rolls a training run's
    log back: not the log of the model it judges."""
    assert run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "lora", "--max-steps", 2,
                   "--batch-size", 2).returncode == 0
    log = (tmp_path / "lora" / "train_log.jsonl").read_bytes()
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(tiny_pairs).with_row_index().with_columns(
        image_0=pl.when(pl.col("index") == 0).then(pl.lit(str(tmp_path / "missing.png")))
        .otherwise(pl.lit(f"{tiny_pairs.parent}/") + pl.col("image_0")),
        image_1=pl.lit(f"{tiny_pairs.parent}/") + pl.col("image_1")).drop("index").write_parquet(bad)
    judged = run_cli("eval", "--model", "tiny", "--tuned", tmp_path / "lora", "--pairs", bad, "-s", "compressibility")
    assert judged.returncode == 2 and "missing.png" in judged.stderr, judged.stderr
    assert (tmp_path / "lora" / "train_log.jsonl").read_bytes() == log


def test_pairs_judged_for_an_sft_output_say_why_the_model_has_no_accuracy(tiny_pairs, tmp_path):
    """An SFT model has no reference, so no DPO implicit accuracy: `eval --pairs` said "accuracy nan" without a
    reason (a new user's trial). It says why, and the scorers are judged as ever."""
    trained = run_cli("train", tiny_pairs, "--model", "tiny", "--out", tmp_path / "sft", "--loss", "sft",
                      "--max-steps", 1, "--batch-size", 2)
    assert trained.returncode == 0, trained.stderr
    judged = run_cli("eval", "-m", "tiny", "--tuned", tmp_path / "sft", "--pairs", tiny_pairs, "--max-pairs", 4,
                     "-s", "compressibility")
    assert judged.returncode == 0, judged.stderr
    lines = judged.stdout.splitlines()
    assert "tuned model: no DPO implicit accuracy (trained with --loss sft, without a reference model)" in lines
    assert "nan" not in judged.stdout
    assert any(line.startswith("scorer compressibility: accuracy ") for line in lines)
