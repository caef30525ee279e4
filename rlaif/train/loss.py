"""Diffusion-DPO losses as pure functions (Wallace et al., 2023, and the official DiffusionDPO code).

Predictions are laid out ``[winners; losers]`` along the batch: shape (2B, C, H, W), winner i and loser i
sharing noise and timestep. Per-sample errors are MSEs averaged over C, H, W. With

    model_diff = err(model, w) - err(model, l),   ref_diff = err(ref, w) - err(ref, l),
    inside = -0.5 * beta * (model_diff - ref_diff)

the official (``sigmoid``) loss is ``-logsigmoid(inside).mean()``; beta 5000 for SD1.5 and SDXL (a
convention without the 0.5 needs 2500). The reference path never carries gradient.

DPO-Positive (Pal et al. 2024, "Smaug", eq. 3) subtracts ``positive * 0.5 * beta * relu(err(model, w) -
err(ref, w))`` from ``inside``: the margin may no longer grow by denoising the winner worse than the reference
does. Plain Diffusion-DPO does exactly that on small tables (its ``chosen_reward`` falls below 0: the winners
get less likely too; Fu et al. 2025, Diffusion-SDPO, report it on Pick-a-Pic). ``positive = 0`` is the official
loss.

``unconditional_anchor`` is a separate term (``--keep-unconditional``): it holds the policy's prediction for the
empty caption at the reference's, which classifier-free guidance subtracts from the prompted prediction.

Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human Feedback", section 4) is the same comparison
for rectified-flow models, with velocity errors in place of noise errors (``flow_dpo_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlaif.config import LOSS_TYPES, POSITIVE_LOSS_TYPES


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample over all but the batch dimension, in float32."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def diffusion_dpo_loss(
    model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float = 5000.0,
    loss_type: str = "sigmoid", positive: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss and its metrics; ``positive`` > 0 adds DPO-Positive's penalty (module docstring) to
    ``inside``, for ``sigmoid`` and ``hinge`` (in ``ipo``'s square it could pay for a worse winner: refused).

    ``loss_type``:
    - ``sigmoid`` (official): ``-logsigmoid(inside)``;
    - ``hinge``: ``relu(1 - inside)`` (SLiC-style);
    - ``ipo``: ``(h - 1 / (2 * beta)) ** 2`` with ``h = -0.5 * (model_diff - ref_diff)`` = inside / beta.

    Metrics (detached scalars), of the implicit classifier, penalty aside (``margin`` = -0.5 * (model_diff -
    ref_diff)): implicit_acc = mean(margin > 0); chosen_reward / rejected_reward = mean of -0.5 * beta * (model err
    - ref err) for winners / losers; reward_margin = their difference (= mean beta * margin); model_mse_w,
    model_mse_l, ref_mse_w, ref_mse_l.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    if positive and loss_type not in POSITIVE_LOSS_TYPES:
        raise ValueError(f"DPO-Positive's penalty applies to {' and '.join(POSITIVE_LOSS_TYPES)}, not {loss_type}")
    if model_pred.shape[0] % 2:
        raise ValueError("predictions must hold winners then losers: an even batch size")
    model_w, model_l = per_sample_mse(model_pred, target).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = per_sample_mse(ref_pred.detach(), target).chunk(2)
    margin = -0.5 * ((model_w - model_l) - (ref_w - ref_l))  # the implicit reward margin / beta
    h = margin - positive * 0.5 * F.relu(model_w - ref_w)
    inside = beta * h
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - inside)
    else:
        losses = (h - 1.0 / (2.0 * beta)).pow(2)
    chosen = -0.5 * beta * (model_w - ref_w)
    rejected = -0.5 * beta * (model_l - ref_l)
    metrics = {
        "implicit_acc": (margin > 0).float().mean(),
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "reward_margin": (chosen - rejected).mean(),
        "model_mse_w": model_w.mean(),
        "model_mse_l": model_l.mean(),
        "ref_mse_w": ref_w.mean(),
        "ref_mse_l": ref_l.mean(),
    }
    return losses.mean(), {name: value.detach() for name, value in metrics.items()}


def unconditional_anchor(model_pred: torch.Tensor, ref_pred: torch.Tensor, beta: float, weight: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``--keep-unconditional``'s term: ``weight * 0.5 * beta`` times the mean squared distance of the policy's
    unconditional predictions from the reference's (per sample over C, H, W), the ELBO's KL between the two
    unconditional models up to the weighting DPO's beta already absorbs. Returns the term and the distance
    (detached, the ``uncond_drift`` metric)."""
    drift = per_sample_mse(model_pred, ref_pred.detach()).mean()
    return weight * 0.5 * beta * drift, drift.detach()


def sft_loss(winner_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The SFT baseline: plain MSE on the winners only (callers run the model on winners only, half the work)."""
    return per_sample_mse(winner_pred, target).mean()


def flow_dpo_loss(
    model_velocity: torch.Tensor, ref_velocity: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
    beta: float = 100.0, loss_type: str = "sigmoid", positive: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPO loss and its metrics, for models that predict the velocity at ``x_s = (1 - s) x0 + s e``.

    Winner and loser share ``e`` and ``s``; the target is ``v = e - x0`` (``latents`` = x0, laid out
    ``[winners; losers]`` like the predictions, ``noise`` = e). With per-sample velocity MSEs,

        inside = -0.5 * beta * ((|v_w - model_w|^2 - |v_w - ref_w|^2) - (|v_l - model_l|^2 - |v_l - ref_l|^2))

    and the sigmoid loss is ``-logsigmoid(inside)``: Liu et al. 2025, eq. (Flow-DPO), with a constant beta as
    in its text-to-image implementation (flow_grpo ``scripts/train_sd3_dpo.py``, which its README points to),
    where beta = 100 for SD3.5-Medium (``config/dpo.py``); the paper's derivation weights beta by the timestep,
    the released code does not. ``loss_type``, ``positive`` and the metrics are ``diffusion_dpo_loss``'s.
    """
    return diffusion_dpo_loss(model_velocity, ref_velocity, noise - latents, beta=beta, loss_type=loss_type,
                              positive=positive)
