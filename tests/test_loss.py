"""Diffusion-DPO loss against an independent computation of the official formula."""

import math

import pytest
import torch

from rlaif.train.loss import diffusion_dpo_loss, sft_loss


def official(model_pred, ref_pred, target, beta):
    """Written the way the official train.py computes it, sample by sample."""
    def err(pred, i):
        return float(((pred[i].double() - target[i].double()) ** 2).mean())
    b = model_pred.shape[0] // 2
    terms = []
    for i in range(b):
        model_diff = err(model_pred, i) - err(model_pred, b + i)
        ref_diff = err(ref_pred, i) - err(ref_pred, b + i)
        terms.append(-0.5 * beta * (model_diff - ref_diff))
    loss = sum(math.log1p(math.exp(-t)) if t > -30 else -t for t in terms) / b
    return loss, sum(t > 0 for t in terms) / b, terms


@pytest.mark.parametrize("beta", [5000.0, 2500.0, 1.0])
def test_sigmoid_loss_matches_official_formula(beta):
    torch.manual_seed(0)
    target = torch.randn(8, 4, 8, 8)
    model_pred = target + 0.1 * torch.randn_like(target)
    ref_pred = target + 0.1 * torch.randn_like(target)
    loss, metrics = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta)
    expected, accuracy, terms = official(model_pred, ref_pred, target, beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert float(metrics["implicit_acc"]) == pytest.approx(accuracy)
    assert float(metrics["reward_margin"]) == pytest.approx(sum(terms) / len(terms), rel=1e-5, abs=1e-5)


def test_identical_model_and_reference_give_ln2():
    torch.manual_seed(1)
    target, pred = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    loss, metrics = diffusion_dpo_loss(pred, pred.clone(), target)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
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
    model_pred, ref_pred = target + 0.1 * torch.randn_like(target), target + 0.1 * torch.randn_like(target)
    _, _, terms = official(model_pred, ref_pred, target, 5000.0)
    hinge, _ = diffusion_dpo_loss(model_pred, ref_pred, target, loss_type="hinge")
    assert float(hinge) == pytest.approx(sum(max(0.0, 1 - t) for t in terms) / 2, rel=1e-5)
    ipo, _ = diffusion_dpo_loss(model_pred, ref_pred, target, loss_type="ipo")
    assert float(ipo) == pytest.approx(sum((t / 5000 - 1 / 10000) ** 2 for t in terms) / 2, rel=1e-5)
    winners, winner_target = model_pred[:2], target[:2]
    assert float(sft_loss(winners, winner_target)) == pytest.approx(float(((winners - winner_target) ** 2).mean()))
    with pytest.raises(ValueError, match="unknown loss_type"):
        diffusion_dpo_loss(model_pred, ref_pred, target, loss_type="nope")
