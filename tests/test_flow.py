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
