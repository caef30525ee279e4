"""`rlaif train --config FILE.toml`: the paper's recipes in examples/, command-line flags overriding the file,
and one-line errors for bad files."""

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli
from test_train import log

from rlaif.cli_options import read_settings
from rlaif.config import OFFICIAL_LOSS, TrainConfig
from rlaif.errors import RlaifError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("recipe", "warmup", "resolution", "optimizer"), [
    ("sd15_dpo.toml", 500, 512, "adamw"), ("sdxl_dpo.toml", 200, 1024, "adafactor")])
def test_paper_recipes(recipe, warmup, resolution, optimizer):
    settings = read_settings(EXAMPLES / recipe, TrainConfig)
    config = TrainConfig(pairs=Path("p.parquet"), out=Path("o"), **settings)
    config.check_values()
    processes = 16  # the official launchers' GPU count, for which the files are written
    assert config.batch_size * config.accumulation * processes == 2048
    assert config.scale_lr and math.isclose(config.learning_rate * 2048, 2.048e-5)
    assert (config.beta, config.max_steps, config.warmup_steps, config.resolution) == (5000, 2000, warmup,
                                                                                          resolution)
    assert config.optimizer == optimizer and config.gradient_checkpointing == (optimizer == "adafactor")
    assert config.loss == "sigmoid" and {name: getattr(config, name) for name in OFFICIAL_LOSS} == OFFICIAL_LOSS
    assert OFFICIAL_LOSS == {"beta": 5000, "dpo_positive": 0, "keep_unconditional": 0, "caption_dropout": 0.2}


def test_flags_override_the_config_file(tiny_pairs, tmp_path):
    (tmp_path / "run.toml").write_text(f'model = "tiny"\nout = "{tmp_path / "o"}"\nmax_steps = 3\nbatch_size = 2\n'
                                       'learning_rate = 0.001\nbeta = 2500.0\nhflip = true\nfull = true\n')
    result = run_cli("train", tiny_pairs, "--config", tmp_path / "run.toml", "--max-steps", 2, "--no-full")
    assert result.returncode == 0, result.stderr
    assert [e["step"] for e in log(tmp_path / "o")] == [1, 2]  # the flag won
    recorded = json.loads((tmp_path / "o" / "train.json").read_text())["config"]
    assert (recorded["beta"], recorded["batch_size"], recorded["learning_rate"]) == (2500.0, 2, 0.001)
    assert (recorded["hflip"], recorded["full"]) == (True, False)  # a `true` of the file undone by --no-full


def test_a_dpo_lora_recipe_taken_to_sft_or_full_leaves_its_extras_out(tiny_pairs, tmp_path):
    """A shipped recipe sets beta and LoRA settings: `--config recipe --loss sft` (or `--full`) was refused,
    telling the user to drop a value they cannot unset on the command line (found by a review). The file's
    unused settings are left out with a note; given on the command line they are still refused."""
    (tmp_path / "run.toml").write_text(f'model = "tiny"\nout = "{tmp_path / "o"}"\nmax_steps = 1\nbatch_size = 2\n'
                                       'beta = 2500.0\nlora_rank = 16\n')
    result = run_cli("train", tiny_pairs, "--config", tmp_path / "run.toml", "--loss", "sft", "--full",
                     "--learning-rate", 1e-5)
    assert result.returncode == 0, result.stderr
    assert (f"note: --beta, --lora-rank from --config {tmp_path / 'run.toml'} left out: unused with this run's "
            "--loss / --full") in result.stderr
    recorded = json.loads((tmp_path / "o" / "train.json").read_text())["config"]
    assert (recorded["beta"], recorded["lora_rank"], recorded["loss"], recorded["full"]) == (None, 32, "sft", True)
    typed = run_cli("train", tiny_pairs, "--config", tmp_path / "run.toml", "--loss", "sft", "--beta", 100,
                    "--out", tmp_path / "typed")
    assert typed.returncode == 2 and "--beta applies to the DPO losses" in typed.stderr


@pytest.mark.parametrize(("text", "message"), [
    ('model = "tiny"\nbetta = 1.0\n', "run.toml: unknown setting 'betta'; did you mean 'beta'?"),
    ('model = "tiny"\nbeta = "high"\n', "run.toml beta: expected float, got 'high'"),
    ('max_steps = 2\n', "missing --model: give it on the command line or in --config"),
    ('model = [\n', "config file"),
])
def test_bad_config_files(tmp_path, text, message):
    (tmp_path / "run.toml").write_text(text)
    result = run_cli("train", tmp_path / "p.parquet", "--out", tmp_path / "o", "--config", tmp_path / "run.toml")
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_integers_are_not_booleans(tmp_path):
    (tmp_path / "run.toml").write_text("full = 1\n")
    with pytest.raises(RlaifError, match="full: expected bool, got 1"):
        read_settings(tmp_path / "run.toml", TrainConfig)


@pytest.mark.parametrize(("pairs", "accepted"), [
    ("yuvalkirstain/pickapic_v2", True), ("yuvalkirstain/pickapic_v2@0123abcd", True), ("org/name@v1.0", True),
    ("runs/pairs.parquet", False), ("org/name@", False), ("org/name@rev/extra", False), ("a/b/c", False)])
def test_hub_dataset_ids_may_pin_a_revision(pairs, accepted, tmp_path):
    """`--pairs ORG/NAME@REVISION` is a hub id (pinned); a missing local file or a malformed id is one clear line."""
    config = TrainConfig(pairs=pairs, model="tiny", out=tmp_path / "out")
    if accepted:
        config.validate()
    else:
        with pytest.raises(RlaifError, match=f"pairs table {pairs} does not exist"):
            config.validate()


@pytest.mark.parametrize(("model", "optimizer", "decay"), [
    ("tiny", "adamw", 1e-2), ("tiny-xl", "adafactor", 1e-2), ("tiny-sd3", "adamw", 1e-4), ("tiny", "sgd", 0.0)])
def test_weight_decay_defaults_to_the_official_recipes(tmp_path, model, optimizer, decay):
    """DiffusionDPO's train.py gives AdamW and Adafactor weight decay 1e-2 (Adafactor also update clipping at 1);
    flow_grpo gives 1e-4. The family's value is filled in, recorded, and reaches the optimizer."""
    import torch

    from rlaif.train.trainer import make_optimizer, with_family_defaults

    config = with_family_defaults(TrainConfig(pairs="p", model=model, out=tmp_path, optimizer=optimizer))
    assert config.weight_decay == decay
    group = make_optimizer(optimizer, [torch.nn.Parameter(torch.ones(3))], 1e-3, config.weight_decay).param_groups[0]
    assert group["weight_decay"] == decay  # plain SGD: none, and none recorded
    if optimizer == "adafactor":
        assert (group["clip_threshold"], group["relative_step"], group["scale_parameter"]) == (1.0, False, False)


@pytest.mark.parametrize(("model", "loss", "beta", "positive", "keep", "dropout"), [
    ("tiny", "sigmoid", 1000.0, 1.0, 1.0, 0.0), ("tiny-xl", "hinge", 1000.0, 1.0, 1.0, 0.0),
    ("tiny", "ipo", 1000.0, 0.0, 0.0, 0.2), ("tiny", "sft", None, 0.0, 0.0, 0.2),
    ("tiny-sd3", "sigmoid", 100.0, 0.0, 0.0, 0.0), ("tiny-flux", "sigmoid", 100.0, 0.0, 0.0, 0.0)])
def test_the_loss_defaults_by_family(tmp_path, model, loss, beta, positive, keep, dropout):
    """UNets: beta 1000 with DPO-Positive's penalty and the unconditional prediction held where they were
    measured (sigmoid, hinge; IPO's loss has another scale, SFT no reference), and caption dropout 0 where the
    anchor holds, else 0.2; flow transformers: Flow-DPO as released in flow_grpo (beta 100, no penalty, no anchor,
    every pair trained with its caption: a review found 0.2 there, unlike examples/sd35_dpo.toml and
    examples/flux_dpo.toml). The resolved values are what a run records."""
    from rlaif.train.trainer import with_family_defaults

    config = with_family_defaults(TrainConfig(pairs="p", model=model, out=tmp_path, loss=loss))
    assert (config.beta, config.dpo_positive, config.keep_unconditional) == (beta, positive, keep)
    assert config.caption_dropout == dropout


@pytest.mark.parametrize(("given", "resolved"), [
    ({"keep_unconditional": 0.0}, (0.0, 0.2)), ({"keep_unconditional": 3.0}, (3.0, 0.0)),
    ({"caption_dropout": 0.1}, (1.0, 0.1)), ({"keep_unconditional": 0.0, "caption_dropout": 0.0}, (0.0, 0.0))])
def test_caption_dropout_follows_the_anchor_unless_given(tmp_path, given, resolved):
    from rlaif.train.trainer import with_family_defaults

    config = with_family_defaults(TrainConfig(pairs="p", model="tiny", out=tmp_path, **given))
    assert (config.keep_unconditional, config.caption_dropout) == resolved


@pytest.mark.parametrize(("given", "resolved"), [
    ({}, 3e-4), ({"full": True}, 1e-5), ({"full": True, "learning_rate": 2e-5}, 2e-5), ({"learning_rate": 1e-4}, 1e-4)])
def test_the_learning_rate_defaults_by_what_is_trained(tmp_path, given, resolved):
    """LoRA at 3e-4 (the suite's recipe); the whole network at 1e-5: at LoRA's rate it diverged (loss 0.69 -> 9.9
    -> 13.7 in 5 steps, a new user's run)."""
    from rlaif.train.trainer import with_family_defaults

    assert with_family_defaults(TrainConfig(pairs="p", model="tiny", out=tmp_path, **given)).learning_rate == resolved
