"""`rlaif train --keep-unconditional`: the term against an independent computation, a run that holds the
empty caption's prediction at the reference's while the prompted one still moves, and the refusals of training
otherwise than the pairs were sampled (a negative prompt under the default anchor, another T5 length)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli

from rlaif.config import TrainConfig
from rlaif.errors import RlaifError
from rlaif.models import load_pipeline
from rlaif.tables import SAMPLING_METADATA
from rlaif.train.loss import diffusion_dpo_loss, unconditional_anchor
from rlaif.train.pair_table import PairTable, sampled_by
from rlaif.train.trainer import check_sampling


def test_the_anchor_is_weight_half_beta_times_the_mean_squared_distance_and_pulls_only_the_policy():
    torch.manual_seed(0)
    model = torch.randn(3, 4, 2, 2, requires_grad=True)
    reference = torch.randn(3, 4, 2, 2, requires_grad=True)
    term, drift = unconditional_anchor(model, reference, beta=1000.0, weight=2.0)
    expected = ((model.detach().double() - reference.detach().double()) ** 2).mean(dim=(1, 2, 3)).mean()
    assert float(drift) == pytest.approx(float(expected), rel=1e-6)
    assert float(term.detach()) == pytest.approx(2.0 * 0.5 * 1000.0 * float(expected), rel=1e-6)
    term.backward()
    assert reference.grad is None  # the reference is a constant
    # d/dmodel of 1000 * mean((m - r)^2) over 48 values: 1000 * 2 (m - r) / 48
    torch.testing.assert_close(model.grad, 1000.0 * 2 * (model - reference).detach() / 48)
    same, zero = unconditional_anchor(reference, reference, beta=1000.0, weight=2.0)
    assert float(same.detach()) == 0 and float(zero) == 0


def predictions(pipe, prompt: str) -> torch.Tensor:
    """The UNet's predictions for ``prompt`` at three noise levels of one fixed noisy latent."""
    embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([100, 500, 900]), embeds.expand(3, -1, -1)).sample


def test_keep_unconditional_holds_the_empty_caption_back(tiny_pairs, tmp_path):
    """Trained without and with the anchor (its default weight): the empty caption's prediction moves less with it,
    while the model still learns (a positive reward margin); the log carries the drift the anchor pays for. How much
    less depends on the model and the draws: to 6% on the first committed tiny, 20% and 63% on the one retrained on
    2026-11-28 under two draws of the VAE noise, where the trained prompt's fell about as much (39%, 48%). Held
    selectively, empty caption far more than prompt, it is on the first model only (bench/RESULTS.md)."""
    base = load_pipeline("tiny")
    prompt = pl.read_parquet(tiny_pairs)["caption"][0]  # a prompt DPO trains on
    moved, margins = {}, {}
    for keep in (0, 1):
        out = tmp_path / f"keep{keep}"
        result = run_cli("train", tiny_pairs, "--out", out, "--model", "tiny", "--max-steps", 30, "--batch-size", 2,
                         "--learning-rate", 3e-3, "--keep-unconditional", keep, "--caption-dropout", 0,
                         "--val-fraction", 0)
        assert result.returncode == 0, result.stderr
        entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert ("uncond_drift" in entries[-1]) == bool(keep)
        margins[keep] = sum(entry["reward_margin"] for entry in entries[-10:]) / 10
        tuned = load_pipeline("tiny", tuned=out)
        moved[keep] = {caption: float((predictions(tuned, caption) - predictions(base, caption)).pow(2).mean())
                       for caption in ("", prompt)}
    # measured (empty caption, prompt), without / with: first tiny 2.9e-3, 6.5e-3 / 1.6e-4, 1.1e-2; retrained
    # tiny 4.7e-3, 1.2e-2 / 9.2e-4, 4.7e-3 (side-keyed draws) and 2.0e-3, 9.7e-3 / 1.3e-3, 4.7e-3 (content-keyed)
    assert moved[1][""] < 0.8 * moved[0][""]  # an anchor that held nothing moves it as far (ratio ~1)
    assert margins[1] > 0


@pytest.mark.parametrize(("alias", "full"), [("tiny", False), ("tiny-xl", False), ("tiny", True)])
def test_the_anchor_runs_in_the_dpo_calls_and_equals_an_independent_computation(tiny_pairs, alias, full):
    """The anchored step adds exactly weight x 0.5 beta x the MSE between policy and reference on the winners,
    noised alike and conditioned as the sampler's unconditional branch, computed here with separate UNet calls:
    its value and its gradient; the DPO rows it shares its calls with keep their loss; and the step makes no more
    UNet calls than plain DPO. LoRA (the reference: adapters off) and full fine-tuning (a frozen copy); SDXL
    (pooled embeddings and size conditioning)."""
    from diffusers import DDPMScheduler

    from rlaif.models import default_size
    from rlaif.train.batches import BatchSettings, MicroBatches
    from rlaif.train.encoding import Encoder, latent_shape
    from rlaif.train.objective import objective_for
    from rlaif.train.trainer import _dpo_micro_step, trainable_network, with_family_defaults

    torch.manual_seed(0)
    config = with_family_defaults(TrainConfig(pairs=tiny_pairs, model=alias, out=Path("unused"), beta=1000.0,
                                              keep_unconditional=2.0, full=full))
    pipe = load_pipeline(alias)
    unet, frozen, params = trainable_network(pipe, config)
    with torch.no_grad():  # LoRA starts as the identity, a full copy as the reference: move the policy away
        for param in params:
            param.add_(0.02 * torch.randn_like(param))
    size = default_size(pipe)
    settings = BatchSettings(0, 3, 1, 0, size, False, False, 0.0, latent_shape(pipe, size), 1000)
    batch = MicroBatches(PairTable(tiny_pairs), settings, None)[0]
    encoder, objective, cpu = Encoder(pipe, None), objective_for(pipe), torch.device("cpu")
    calls = []
    for network in {unet, frozen} - {None}:
        network.register_forward_hook(lambda *_: calls.append(1))

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(grads, params, strict=True)])

    plain, _ = _dpo_micro_step(config, batch, encoder, unet, frozen, objective, size, cpu, 0.0)
    anchored, metrics = _dpo_micro_step(config, batch, encoder, unet, frozen, objective, size, cpu, 2.0)
    assert len(calls) == 4  # policy and reference, each once per step, with the anchor as without
    anchor_gradient = gradient(anchored) - gradient(plain)

    posterior = encoder.latent_distribution(batch.images, cpu)
    winners = (posterior.mean + posterior.std * batch.vae_draws)[:3] * pipe.vae.config.scaling_factor
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(winners, batch.noise, batch.timesteps)
    empty, pooled = encoder.unconditional(3, cpu)
    added = {} if pooled is None else {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor(
        [[*a.original_size, *a.crop_top_left, size, size] for a in batch.augmentations[:3]], dtype=torch.float32)}}
    policy = unet(noisy, batch.timesteps, empty, **added).sample
    with torch.no_grad():
        if frozen is not None:
            reference = frozen(noisy, batch.timesteps, empty, **added).sample
        else:
            unet.disable_adapters()
            reference = unet(noisy, batch.timesteps, empty, **added).sample
            unet.enable_adapters()
    drift = (policy - reference).pow(2).mean(dim=(1, 2, 3)).mean()
    term = 2.0 * 0.5 * 1000.0 * drift
    assert drift > 0
    torch.testing.assert_close(metrics["uncond_drift"], drift.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(anchored.detach() - term.detach(), plain.detach(), rtol=0, atol=1e-4)
    expected = gradient(term)
    assert float((anchor_gradient - expected).norm() / expected.norm()) < 1e-3

    # the DPO rows themselves, with separate calls conditioned on the captions: the loss the trainer passes its
    # --loss, --beta and --dpo-positive (1 here, SD's default) to, and hinge too (a review found no test would see
    # a trainer that dropped one of them)
    assert pipe.scheduler.config.prediction_type == "epsilon" and config.dpo_positive == 1.0
    captions, caption_pooled = encoder.text(batch.captions, cpu)
    latents = (posterior.mean + posterior.std * batch.vae_draws) * pipe.vae.config.scaling_factor
    noise, steps = batch.noise.repeat(2, 1, 1, 1), batch.timesteps.repeat(2)
    noised = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, steps)
    conditioned = {} if caption_pooled is None else {"added_cond_kwargs": {
        "text_embeds": caption_pooled.repeat(2, 1), "time_ids": torch.tensor(
            [[*a.original_size, *a.crop_top_left, size, size] for a in batch.augmentations], dtype=torch.float32)}}
    with torch.no_grad():
        model_pred = unet(noised, steps, captions.repeat(2, 1, 1), **conditioned).sample
        if frozen is not None:
            ref_pred = frozen(noised, steps, captions.repeat(2, 1, 1), **conditioned).sample
        else:
            unet.disable_adapters()
            ref_pred = unet(noised, steps, captions.repeat(2, 1, 1), **conditioned).sample
            unet.enable_adapters()
    for loss_type in ("sigmoid", "hinge"):
        step, _ = _dpo_micro_step(replace(config, loss=loss_type), batch, encoder, unet, frozen, objective, size,
                                  cpu, 0.0)
        expected_loss, _ = diffusion_dpo_loss(model_pred, ref_pred, noise, beta=1000.0, loss_type=loss_type,
                                              positive=1.0)
        torch.testing.assert_close(step.detach(), expected_loss, rtol=1e-4, atol=1e-5)


def test_the_anchor_holds_what_the_sampler_feeds_its_unconditional_branch():
    """SD1.5: the empty caption's embeddings; SDXL (``force_zeros_for_empty_prompt``): zeros, pooled ones too."""
    from rlaif.train.encoding import Encoder, encode_captions

    sd, xl = load_pipeline("tiny"), load_pipeline("tiny-xl")
    assert not sd.config.get("force_zeros_for_empty_prompt", False) and xl.config.force_zeros_for_empty_prompt
    embeds, pooled = Encoder(sd, None).unconditional(2, torch.device("cpu"))
    torch.testing.assert_close(embeds, encode_captions(sd, [""], "cpu")[0].expand(2, -1, -1))
    assert pooled is None
    embeds, pooled = Encoder(xl, None).unconditional(2, torch.device("cpu"))
    assert embeds.shape[0] == pooled.shape[0] == 2 and not embeds.any() and not pooled.any()


def test_flux_which_samples_without_guidance_refuses_the_anchor(tiny_pairs, tmp_path):
    result = run_cli("train", tiny_pairs, "--model", "tiny-flux", "--out", tmp_path / "o", "--max-steps", 1,
                     "--keep-unconditional", 1)
    assert result.returncode != 0
    assert "FLUX.1 samples without classifier-free guidance" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "o" / "train.json").exists()


def test_label_records_the_sampling_and_train_refuses_the_default_anchor_after_a_negative_prompt(tiny_pairs, tmp_path):
    """Pairs sampled with a negative prompt (so guided by it, not by the empty caption the anchor holds) train
    only once --keep-unconditional is chosen; rlaif label recorded run.json's generation settings in the table."""
    (recorded,) = PairTable(tiny_pairs).sampling
    generation = json.loads((tiny_pairs.parent / "run.json").read_text())["generation"]
    assert recorded == generation and recorded["model"] == "tiny" and recorded["negative_prompt"] == ""
    table = pq.read_table(tiny_pairs)
    negative = tiny_pairs.parent / f"negative-{tmp_path.name}.parquet"  # beside the original: its image paths hold
    metadata = {SAMPLING_METADATA: json.dumps({**generation, "negative_prompt": "blurry"})}
    pq.write_table(table.replace_schema_metadata(metadata), negative)
    argv = ("train", negative, "--model", "tiny", "--max-steps", 1)
    refused = run_cli(*argv, "--out", tmp_path / "refused")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and not (tmp_path / "refused").exists()
    assert "was sampled with negative prompt 'blurry', which replaces the empty caption in guidance" in refused.stderr
    for keep in (0, 1):  # chosen either way: trained
        chosen = run_cli(*argv, "--out", tmp_path / f"keep{keep}", "--keep-unconditional", keep)
        assert chosen.returncode == 0, chosen.stderr
    assert run_cli("train", tiny_pairs, "--model", "tiny", "--max-steps", 1, "--out", tmp_path / "plain"
                   ).returncode == 0  # no negative prompt: the default anchor trains


SD3 = {"model": "tiny-sd3"}


@pytest.mark.parametrize(("sampling", "length", "refused"), [
    ({}, 32, None), ({**SD3, "max_sequence_length": 32}, 32, None),
    ({**SD3, "max_sequence_length": None}, None, None),
    ({"model": "tiny-flux", "max_sequence_length": 256}, 32, None),  # another model's length: nothing to compare
    ({**SD3, "max_sequence_length": 32}, 8, "was sampled at T5 prompt length 32, and training would encode its "
                                            "captions at 8; pass --max-sequence-length 32"),
    ({"model": "/models/sd3-copy", "model_weights": "tiny-sd3 weights", "max_sequence_length": 32}, 8,
     "was sampled at T5 prompt length 32"),  # a copy of this model's weights under another name
    ({"model": "/models/sd3-copy", "model_weights": "other weights", "max_sequence_length": 32}, 8, None),
])
def test_check_sampling_refuses_another_t5_length_of_the_same_model(sampling, length, refused):
    config = TrainConfig(pairs="p.parquet", model="tiny-sd3", out=Path("o"), keep_unconditional=0.0)
    own = sampled_by([sampling], config.model, lambda: "tiny-sd3 weights")
    if refused is None:
        check_sampling([sampling], own, config, False, length)
    else:
        with pytest.raises(RlaifError, match=re.escape(f"p.parquet {refused}")):
            check_sampling([sampling], own, config, False, length)
