"""Diffusion-DPO loss against an independent computation of the official formula."""

import math

import pytest
import torch

from rlaif.train.loss import diffusion_dpo_loss, sft_loss

U = 2.0**-24  # float32 unit roundoff: rlaif computes the loss in float32, official() below in float64
NOISE = 0.1  # predictions are target + NOISE * randn, so every per-sample MSE is ~ NOISE**2


def inside_tolerance(beta: float) -> float:
    """Bound on the float32 error of inside = -0.5 * beta * (4 MSEs, signed): each MSE (a pairwise float32 sum of
    256 squares) is off by at most ~log2(256) = 8 ulps, u * NOISE**2 each; the loss and the reward margin
    (slope <= 1 in inside) inherit it. 4.8e-5 at beta 5000, where a real bug moves the loss by > 0.1."""
    return 0.5 * beta * 4 * 8 * U * NOISE**2


def official(model_pred, ref_pred, target, beta, positive=0.0):
    """Written the way the official train.py computes it, sample by sample; ``positive`` > 0 adds DPO-Positive's
    penalty as Pal et al. 2024 write it, beta * lambda * max(0, -log ratio of the winner), whose diffusion
    log ratio is -0.5 * (model err - ref err) of the winner."""
    def err(pred, i):
        return float(((pred[i].double() - target[i].double()) ** 2).mean())
    b = model_pred.shape[0] // 2
    terms = []
    for i in range(b):
        model_diff = err(model_pred, i) - err(model_pred, b + i)
        ref_diff = err(ref_pred, i) - err(ref_pred, b + i)
        winner_log_ratio = -0.5 * (err(model_pred, i) - err(ref_pred, i))
        terms.append(-0.5 * beta * (model_diff - ref_diff) - beta * positive * max(0.0, -winner_log_ratio))
    loss = sum(math.log1p(math.exp(-t)) if t > -30 else -t for t in terms) / b
    return loss, sum(t > 0 for t in terms) / b, terms


@pytest.mark.parametrize("beta", [5000.0, 2500.0, 1.0])
def test_sigmoid_loss_matches_official_formula(beta):
    torch.manual_seed(0)
    target = torch.randn(8, 4, 8, 8)
    model_pred = target + NOISE * torch.randn_like(target)
    ref_pred = target + NOISE * torch.randn_like(target)
    loss, metrics = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta)
    expected, accuracy, terms = official(model_pred, ref_pred, target, beta)
    # rel: the float32 rounding of the result itself (16 u); abs: the MSEs' rounding through inside (seen 4e-7)
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=inside_tolerance(beta))
    assert float(metrics["implicit_acc"]) == accuracy  # exact: a count over 4 pairs
    assert float(metrics["reward_margin"]) == pytest.approx(sum(terms) / len(terms), rel=1e-6,
                                                            abs=inside_tolerance(beta))
    # the logged rewards and errors, each against its own definition (a swapped pair of keys would pass the above)
    def err(pred, i):
        return float(((pred[i].double() - target[i].double()) ** 2).mean())

    tolerance = {"rel": 1e-5, "abs": inside_tolerance(beta)}
    winners, losers = range(4), range(4, 8)
    for name, pred, rows in (("model_mse_w", model_pred, winners), ("model_mse_l", model_pred, losers),
                             ("ref_mse_w", ref_pred, winners), ("ref_mse_l", ref_pred, losers)):
        assert float(metrics[name]) == pytest.approx(sum(err(pred, i) for i in rows) / 4, rel=1e-5)
    for name, rows in (("chosen_reward", winners), ("rejected_reward", losers)):
        expected_reward = sum(-0.5 * beta * (err(model_pred, i) - err(ref_pred, i)) for i in rows) / 4
        assert float(metrics[name]) == pytest.approx(expected_reward, **tolerance)
    assert float(metrics["chosen_reward"]) != pytest.approx(float(metrics["rejected_reward"]), **tolerance)


@pytest.mark.parametrize("positive", [1.0, 5.0])
def test_dpo_positive_penalises_only_winners_denoised_worse_than_the_reference(positive):
    torch.manual_seed(4)
    target = torch.randn(8, 4, 8, 8)
    ref_pred = target + NOISE * torch.randn_like(target)
    model_pred = ref_pred.clone()
    model_pred[:2] += 0.3 * NOISE * torch.randn_like(target[:2])  # winners 0, 1: denoised worse than the reference
    model_pred[2:4] = target[2:4] + 0.8 * (ref_pred[2:4] - target[2:4])  # winners 2, 3: better
    model_pred[4:] += 0.3 * NOISE * torch.randn_like(target[4:])  # every loser worse
    beta = 1000.0
    expected, _, terms = official(model_pred, ref_pred, target, beta, positive)
    _, accuracy, plain_terms = official(model_pred, ref_pred, target, beta)
    # the case the test is about: the penalty lowers the terms of winners 0 and 1 only, below 0 from above it (so
    # an accuracy counted with the penalty would read 0.5, not 1)
    assert [t < p for t, p in zip(terms, plain_terms, strict=True)] == [True, True, False, False]
    assert all(p > 0 for p in plain_terms) and sum(t > 0 for t in terms) == 2
    loss, metrics = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, positive=positive)
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=inside_tolerance(beta) * (1 + positive))
    # the implicit classifier and its margin stay the official ones: the penalty regularises, it judges nothing
    assert float(metrics["implicit_acc"]) == accuracy
    assert float(metrics["reward_margin"]) == pytest.approx(sum(plain_terms) / 4, rel=1e-6, abs=inside_tolerance(beta))
    official_loss, _ = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta)
    assert float(loss) > float(official_loss)  # the penalty only ever adds
    hinge, _ = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, loss_type="hinge", positive=positive)
    assert float(hinge) == pytest.approx(sum(max(0.0, 1 - t) for t in terms) / 4, rel=1e-6,
                                         abs=inside_tolerance(beta) * (1 + positive))
    with pytest.raises(ValueError, match="applies to sigmoid and hinge, not ipo"):  # in ipo's square it could pay
        diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, loss_type="ipo", positive=positive)


def test_identical_model_and_reference_give_ln2():
    torch.manual_seed(1)
    target, pred = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    loss, metrics = diffusion_dpo_loss(pred, pred.clone(), target)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)  # inside is exactly 0; ln 2 in float32 is off by 2e-8
    assert float(metrics["implicit_acc"]) == 0.0


def test_no_gradient_reaches_the_reference():
    torch.manual_seed(2)
    target = torch.randn(4, 4, 8, 8)
    model_pred = torch.randn(4, 4, 8, 8, requires_grad=True)
    ref_pred = torch.randn(4, 4, 8, 8, requires_grad=True)
    loss, _ = diffusion_dpo_loss(model_pred, ref_pred, target)
    loss.backward()
    assert ref_pred.grad is None and model_pred.grad is not None and model_pred.grad.abs().sum() > 0


def test_hinge_ipo_and_sft():
    torch.manual_seed(3)
    target = torch.randn(4, 4, 8, 8)
    model_pred, ref_pred = target + NOISE * torch.randn_like(target), target + NOISE * torch.randn_like(target)
    # beta 500 puts both terms (0.63, 0.35) inside the hinge's margin of 1 (at beta 5000 both are past it: loss 0)
    _, _, terms = official(model_pred, ref_pred, target, 500.0)
    assert all(0 < t < 1 for t in terms)
    hinge, _ = diffusion_dpo_loss(model_pred, ref_pred, target, beta=500.0, loss_type="hinge")
    assert float(hinge) == pytest.approx(sum(1 - t for t in terms) / 2, rel=1e-6, abs=inside_tolerance(500.0))
    _, _, terms = official(model_pred, ref_pred, target, 5000.0)
    ipo, _ = diffusion_dpo_loss(model_pred, ref_pred, target, loss_type="ipo")
    # h = inside / beta (~1e-3) carries the MSEs' rounding (<= 16 u NOISE**2 = 1e-8); squaring h - 1 / (2 beta)
    # (~6e-4) doubles its relative error: <= 3.2e-5 (seen 2.4e-7)
    assert float(ipo) == pytest.approx(sum((t / 5000 - 1 / 10000) ** 2 for t in terms) / 2, rel=1e-4)
    winners, winner_target = model_pred[:2], target[:2]
    # the same 512 float32 squares summed in another order (per sample, then over samples): a few u apart
    assert float(sft_loss(winners, winner_target)) == pytest.approx(float(((winners - winner_target) ** 2).mean()),
                                                                    rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss_type"):
        diffusion_dpo_loss(model_pred, ref_pred, target, loss_type="nope")


def test_training_targets_follow_the_prediction_type():
    from diffusers import DDPMScheduler

    from rlaif.errors import RlaifError
    from rlaif.train.objective import training_target

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert training_target("epsilon", latents, noise, t, scheduler) is noise
    assert training_target("sample", latents, noise, t, scheduler) is latents
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)  # v = sqrt(a) * noise - sqrt(1 - a) * x0
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(training_target("v_prediction", latents, noise, t, scheduler), velocity, atol=1e-6)
    with pytest.raises(RlaifError, match="predicts 'flow_prediction'; rlaif trains epsilon, v_prediction and sample"):
        training_target("flow_prediction", latents, noise, t, scheduler)


def test_adapters_come_back_on_after_an_error_and_sft_has_no_reference():
    from peft import LoraConfig

    from rlaif.config import TrainConfig
    from rlaif.models import load_pipeline
    from rlaif.train.trainer import adapters_disabled, frozen_reference

    unet = load_pipeline("tiny").unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q"]))
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500]),
              torch.randn(1, 5, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        policy = unet(*inputs).sample
        with pytest.raises(RuntimeError, match="in the reference pass"), adapters_disabled(unet):
            assert not torch.allclose(unet(*inputs).sample, policy)  # adapters off: another function
            raise RuntimeError("in the reference pass")
        assert torch.equal(unet(*inputs).sample, policy)  # back on
    config = TrainConfig(pairs=None, model="tiny", out=None, full=True)
    assert isinstance(frozen_reference(unet, config), type(unet))
    config.loss = "sft"
    assert frozen_reference(unet, config) is None
    config.loss, config.full = "sigmoid", False
    assert frozen_reference(unet, config) is None
