"""Rectified-flow training inputs (SD3 / SD3.5, FLUX.1) as pure functions.

A pair is trained at a point ``s`` of the straight path from its clean latents ``x0`` (s = 0) to noise ``e``
(s = 1): ``x_s = (1 - s) x0 + s e``, and the model predicts the velocity ``v = e - x0`` (Esser et al. 2024,
"Scaling Rectified Flow Transformers", section 2; diffusers' ``train_dreambooth_lora_flux.py``, and
``train_dreambooth_lora_sd3.py`` without its default ``--precondition_outputs``, which weights this error by
s^2; Flow-DPO's released code uses it unweighted, as here). Where ``s`` falls is drawn as in those scripts:
``u`` from a weighting density (logit-normal, mode or uniform), then the training schedule's ``s`` at index
``floor(u * N)`` of the ``N`` training timesteps, shifted by the scheduler's ``shift`` unless it shifts by
resolution at inference (FLUX's dynamic shifting), where training uses the plain schedule.
"""

from __future__ import annotations

import math

import torch

from rlaif.config import FLOW_WEIGHTINGS as WEIGHTINGS


def draw_u(weighting: str, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
           mode_scale: float = 1.29) -> float:
    """One draw of ``u`` in [0, 1] from the SD3 paper's training densities (section 3.1): ``logit_normal``
    (sigmoid of a normal), ``mode`` (heavier in the middle by ``mode_scale``) or ``uniform``."""
    if weighting == "logit_normal":
        return float(torch.sigmoid(torch.normal(logit_mean, logit_std, (1,), generator=generator)))
    u = float(torch.rand((1,), generator=generator))
    if weighting == "mode":
        return 1 - u - mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)
    if weighting == "uniform":
        return u
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def training_shift(scheduler_config) -> float:
    """The shift training draws noise levels with: the scheduler's own, or none (1) when it shifts by
    resolution at inference only (FLUX's dynamic shifting)."""
    return 1.0 if scheduler_config.get("use_dynamic_shifting") else scheduler_config.get("shift", 1.0)


def shifted_sigma(u: torch.Tensor, num_train_timesteps: int, shift: float) -> torch.Tensor:
    """The noise level ``s`` trained at for each ``u``: the schedule's entry ``floor(u * N)`` of
    ``s_i = (N - i) / N``, shifted as ``shift * s / (1 + (shift - 1) * s)`` (the values of
    ``FlowMatchEulerDiscreteScheduler(shift=shift).sigmas``)."""
    n = num_train_timesteps
    index = (u * n).long().clamp(0, n - 1)
    plain = (n - index).to(torch.float64) / n
    return (shift * plain / (1 + (shift - 1) * plain)).float()


def flow_inputs(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised latents ``(1 - s) x0 + s e`` and the velocity target ``e - x0``, ``sigma`` one ``s`` per
    sample."""
    s = sigma.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents


def flux_tokens(tensors: list[torch.Tensor], text_length: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """FLUX.1's transformer reads 2x2 latent patches as tokens: each (B, C, H, W) tensor packed to (B, H W / 4,
    4 C), and the position ids it takes beside them (``img_ids`` of the patches, zero ``txt_ids`` for
    ``text_length`` text tokens), as diffusers' ``FluxPipeline`` builds them."""
    from diffusers import FluxPipeline

    reference = tensors[0]
    b, c, h, w = reference.shape
    packed = [FluxPipeline._pack_latents(x, b, c, h, w) for x in tensors]
    ids = {"img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, reference.device, reference.dtype),
           "txt_ids": torch.zeros(text_length, 3, device=reference.device, dtype=reference.dtype)}
    return packed, ids
