"""Flow-matching training inputs and the Flow-DPO loss, against independent computations."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling

from rlaif.train.flow import WEIGHTINGS, draw_u, flow_inputs, flux_tokens, shifted_sigma
from rlaif.train.loss import flow_dpo_loss


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_are_the_schedulers_training_sigmas(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = torch.tensor([0.0, 0.0004, 0.25, 0.5, 0.7531, 0.999, 0.99999])
    expected = scheduler.sigmas[(u * 1000).long()]  # how diffusers' SD3 / FLUX scripts index them
    assert torch.allclose(shifted_sigma(u, 1000, shift), expected, atol=1e-6)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_u_draws_follow_diffusers_densities(weighting):
    ours = draw_u(weighting, torch.Generator().manual_seed(7), 0.0, 1.0, 1.29)
    theirs = compute_density_for_timestep_sampling(weighting, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(7))
    assert ours == pytest.approx(float(theirs[0]), abs=1e-7)
    assert 0.0 <= ours <= 1.0


def test_noised_input_and_velocity_target():
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    noisy, target = flow_inputs(latents, noise, torch.tensor([0.0, 0.25]))
    assert torch.equal(noisy[0], latents[0])  # s = 0: the data itself
    assert torch.allclose(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    assert torch.equal(target, noise - latents)


def independent_flow_dpo(velocity, ref_velocity, x0, e, beta, positive=0.0):
    """Flow-DPO written out per pair in float64, as in flow_grpo's train_sd3_dpo.py: MSE of each velocity
    prediction against e - x0, winner-minus-reference minus loser-minus-reference, -0.5 * beta, -logsigmoid;
    ``positive`` > 0 subtracts DPO-Positive's beta * lambda * max(0, 0.5 * (winner's model - reference MSE))."""
    b = x0.shape[0] // 2
    total = 0.0
    for i in range(b):
        def err(pred, j):
            return float(((pred[j].double() - (e[j].double() - x0[j].double())) ** 2).mean())
        w_diff = err(velocity, i) - err(ref_velocity, i)
        l_diff = err(velocity, b + i) - err(ref_velocity, b + i)
        inside = -0.5 * beta * (w_diff - l_diff) - beta * positive * max(0.0, 0.5 * w_diff)
        total += math.log1p(math.exp(-inside))
    return total / b


def near_velocity(weight: torch.Tensor, noisy: torch.Tensor, x0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """A stand-in velocity model: the true velocity plus a small channel mix of its input, so the MSEs are ~1e-2
    and float32 rounding (seen <= 1e-7 on the loss) stays below the 1e-6 tolerance."""
    return (e - x0) + 0.1 * torch.einsum("oc,bchw->bohw", weight, noisy)


@pytest.mark.parametrize(("beta", "positive"), [(100.0, 0.0), (500.0, 0.0), (500.0, 2.0)])
def test_flow_dpo_matches_an_independent_implementation(beta, positive):
    torch.manual_seed(0)
    b = 3
    x0 = torch.randn(2 * b, 4, 6, 6)  # winners, then losers
    e = torch.randn(b, 4, 6, 6).repeat(2, 1, 1, 1)  # the same noise and s for a pair's two images
    s = torch.rand(b).repeat(2)
    noisy, _ = flow_inputs(x0, e, s)
    reference = torch.eye(4)
    policy = reference + torch.randn(4, 4)
    velocity, ref_velocity = near_velocity(policy, noisy, x0, e), near_velocity(reference, noisy, x0, e)
    loss, metrics = flow_dpo_loss(velocity, ref_velocity, x0, e, beta=beta, positive=positive)
    expected = independent_flow_dpo(velocity, ref_velocity, x0, e, beta, positive)
    if positive:  # the case is one where the penalty applies: some winner is predicted worse than by the reference
        assert expected > independent_flow_dpo(velocity, ref_velocity, x0, e, beta) + 1e-3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert abs(float(loss) - math.log(2)) > 0.02  # the policy differs enough to move it 20000x the tolerance


def test_flow_dpo_is_ln2_when_the_model_is_its_reference():
    torch.manual_seed(1)
    x0, e = torch.randn(4, 4, 5, 5), torch.randn(2, 4, 5, 5).repeat(2, 1, 1, 1)
    noisy, _ = flow_inputs(x0, e, torch.tensor([0.3, 0.8, 0.3, 0.8]))
    velocity = near_velocity(torch.randn(4, 4), noisy, x0, e)
    loss, metrics = flow_dpo_loss(velocity, velocity.clone(), x0, e)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["reward_margin"]) == 0.0


def test_a_step_toward_the_winners_velocity_lowers_the_loss():
    torch.manual_seed(2)
    x0, e = torch.randn(2, 4, 5, 5), torch.randn(1, 4, 5, 5).repeat(2, 1, 1, 1)
    velocity = torch.randn(2, 4, 5, 5)
    target = e - x0
    better = velocity.clone()
    better[0] = velocity[0] + 0.1 * (target[0] - velocity[0])  # closer to the winner's velocity only
    loss, metrics = flow_dpo_loss(better, velocity, x0, e)
    assert float(loss) < math.log(2)
    assert float(metrics["implicit_acc"]) == 1.0


def test_flux_tokens_are_2x2_patches_and_the_ids_flux_samples_with():
    """Packing must be undone by the pipeline's own unpacking (a transposed patch would train on scrambled
    latents), and the ids must be (0, row, column) of each patch, with zero ids for the text tokens."""
    latents, noise = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    (packed, packed_noise), ids = flux_tokens([latents, noise], text_length=7)
    assert packed.shape == (2, 4 * 3, 16)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 48, 8), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed_noise, 64, 48, 8), noise)
    assert torch.equal(ids["img_ids"], torch.tensor([[0.0, row, col] for row in range(4) for col in range(3)]))
    assert ids["txt_ids"].shape == (7, 3) and not ids["txt_ids"].any()


def test_dynamic_shifting_trains_on_the_plain_schedule():
    """FLUX.1-dev shifts by resolution when it samples (use_dynamic_shifting): its training sigmas are the
    unshifted schedule's, as diffusers' train_dreambooth_lora_flux.py indexes them."""
    from rlaif.train.flow import training_shift

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    u = torch.tensor([0.0, 0.25, 0.5, 0.999])
    assert training_shift(scheduler.config) == 1.0
    assert torch.allclose(shifted_sigma(u, 1000, training_shift(scheduler.config)), scheduler.sigmas[(u * 1000).long()],
                          atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_the_objective_gives_each_transformer_its_own_inputs(model):
    """What the transformer is called with, written out: latents (x - shift_factor) * scaling_factor, the noised
    point at sigma, the time input sigma * 1000 for SD3 and sigma for FLUX (its pipeline divides by 1000), and for
    FLUX.1-dev its distilled guidance. A swap here would pass the ln 2 test (policy and reference get the same
    wrong inputs): found missing by a review."""
    from rlaif.models import load_pipeline
    from rlaif.train.objective import objective_for

    pipe = load_pipeline(model)
    assert not pipe.vae.config.shift_factor  # the tiny VAEs have none: the real ones' (SD3 0.0609, FLUX 0.1159)
    pipe.vae.register_to_config(shift_factor=0.1159)  # so a swapped order, (x * scale - shift), would show
    objective = objective_for(pipe, "uniform", 5.0)
    shape = (4, 8, 8) if model == "tiny-sd3" else (pipe.vae.config.latent_channels, 8, 8)
    generator = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(2, *shape, generator=generator), torch.randn(1, *shape, generator=generator)
    embeds, pooled = torch.randn(1, 5, pipe.transformer.config.joint_attention_dim), torch.randn(1, 8)
    u = torch.tensor([0.25])
    inputs = objective.inputs(sample, noise, u, embeds, pooled, torch.zeros(2, 6))
    sigma = float(shifted_sigma(u, 1000, objective.shift)[0])
    latents = (sample - 0.1159) * pipe.vae.config.scaling_factor
    if model == "tiny-flux":
        latents = FluxPipeline._pack_latents(latents, 2, shape[0], 8, 8)
        noise = FluxPipeline._pack_latents(noise, 1, shape[0], 8, 8)
        assert torch.equal(inputs.conditions["guidance"], torch.full((2,), 5.0))
        assert torch.allclose(inputs.timestep, torch.full((2,), sigma))
    else:
        assert "guidance" not in inputs.conditions
        assert torch.allclose(inputs.timestep, torch.full((2,), sigma * 1000))
    noise = noise.expand_as(latents)  # a pair's two images share their noise
    assert torch.allclose(inputs.latents, latents)
    assert torch.allclose(inputs.noisy, (1 - sigma) * latents + sigma * noise)
    assert torch.allclose(inputs.target, noise - latents)


def test_flux_dev_trains_at_the_guidance_its_pairs_were_sampled_at():
    """Pairs sampled at --guidance 5 were drawn under distilled guidance 5: training them at diffusers' 3.5 would
    learn the preference for another conditioning (a review). Records of other models or in disagreement: 3.5."""
    from rlaif.train.objective import FLUX_TRAIN_GUIDANCE, distilled_guidance
    from rlaif.train.pair_table import sampled_by

    flux = "black-forest-labs/FLUX.1-dev"

    def weights():
        asked.append(1)
        return "w1"

    def guidance(samplings: list[dict], model: str = flux) -> float:
        return distilled_guidance(sampled_by(samplings, model, weights))

    asked = []
    same = [{"model": flux, "guidance": 5}, {"model": flux, "guidance": 5.0}]
    assert guidance(same) == 5.0 and not asked  # named alike: the weights not hashed
    disagree = [{"model": flux, "guidance": 5.0}, {"model": flux, "guidance": 3.0}]
    assert guidance(disagree) == 3.5
    assert guidance([{"model": "sd15", "guidance": 7.5}]) == FLUX_TRAIN_GUIDANCE == 3.5
    assert guidance([]) == 3.5
    # sampled from the hub id, trained from a local copy of it: the same weights (a review)
    assert guidance([{"model": flux, "model_weights": "w1", "guidance": 4.0}], "/models/flux") == 4.0
    assert guidance([{"model": flux, "model_weights": "w2", "guidance": 4.0}], "/models/flux") == 3.5
