"""What a training step asks of the denoiser, per model family: how clean latents are scaled, noised and
targeted, how the network is called, and which DPO loss compares policy and reference.

- ``NoisePrediction``: SD1.5 / SD2 / SDXL. DDPM noising at an integer timestep; the UNet predicts the noise,
  the velocity or the sample (its scheduler's ``prediction_type``); Diffusion-DPO (Wallace et al. 2023).
- ``FlowMatching``: SD3 / SD3.5 / FLUX.1. Rectified flow at a noise level ``s`` (``rlaif.train.flow``); the
  transformer predicts the velocity; Flow-DPO (Liu et al. 2025). FLUX's transformer takes 2x2-packed latent
  tokens with their position ids and, for FLUX.1-dev, the distilled guidance scale.

A micro-batch's ``timesteps`` are the family's draws: integer timesteps, or ``u`` in [0, 1] that place ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, FluxPipeline, StableDiffusionXLPipeline

from rlaif.errors import RlaifError
from rlaif.models import is_flow
from rlaif.train.flow import flow_inputs, flux_tokens, shifted_sigma, training_shift
from rlaif.train.loss import diffusion_dpo_loss, flow_dpo_loss

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The distilled guidance FLUX.1-dev is trained at (diffusers' train_dreambooth_lora_flux.py default).
FLUX_TRAIN_GUIDANCE = 3.5


@dataclass
class Inputs:
    """One micro-batch on its way into the denoiser: ``[winners; losers]`` along the batch."""

    latents: torch.Tensor  # x0, in the layout the denoiser reads (FLUX: packed tokens)
    noise: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    timestep: torch.Tensor  # what the denoiser is given as its time input
    conditions: dict[str, torch.Tensor]  # per-row keyword arguments of the denoiser
    shared: dict[str, torch.Tensor]  # keyword arguments shared by every row (FLUX's position ids)


def append_rows(inputs: Inputs, extra: Inputs, rows: slice) -> Inputs:
    """``inputs`` followed by ``extra``'s ``rows``, as one batch: a single denoiser call then runs both (the
    anchor's unconditional winners beside the DPO rows), which on a GPU costs far less than a second call's
    kernel launches. Shared keyword arguments are ``inputs``'."""
    def join(first: torch.Tensor, more: torch.Tensor) -> torch.Tensor:
        return torch.cat([first, more[rows]])

    return Inputs(join(inputs.latents, extra.latents), join(inputs.noise, extra.noise),
                  join(inputs.noisy, extra.noisy), join(inputs.target, extra.target),
                  join(inputs.timestep, extra.timestep),
                  {name: join(value, extra.conditions[name]) for name, value in inputs.conditions.items()},
                  inputs.shared)


def check_prediction_type(prediction_type: str) -> None:
    """Refuse a UNet model whose scheduler predicts something rlaif does not train (before any work)."""
    if prediction_type not in PREDICTION_TYPES:
        raise RlaifError(f"the model's scheduler predicts {prediction_type!r}; rlaif trains epsilon, v_prediction "
                         "and sample models")


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    noise_scheduler: DDPMScheduler) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (``epsilon``), the velocity (``v_prediction``) or the
    clean latents (``sample``); any other type is refused."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents


class NoisePrediction:
    """DDPM training of a UNet (SD1.5 / SD2 / SDXL)."""

    weighting = None  # timesteps are drawn uniformly as integers
    distilled_guidance = None  # FLUX.1-dev's alone

    def __init__(self, pipe) -> None:
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
        check_prediction_type(self.scheduler.config.prediction_type)
        self.scaling = pipe.vae.config.scaling_factor
        self.xl = isinstance(pipe, StableDiffusionXLPipeline)
        self.timesteps = self.scheduler.config.num_train_timesteps

    def inputs(self, sample: torch.Tensor, noise: torch.Tensor, draws: torch.Tensor, embeds: torch.Tensor,
               pooled: torch.Tensor | None, micro_conditions: torch.Tensor) -> Inputs:
        """``sample`` is a VAE posterior draw of every image, ``noise`` and ``draws`` (timesteps) one per pair;
        ``micro_conditions`` SDXL's (original size, crop, target size) per image, ``[winners; losers]``."""
        latents = sample * self.scaling
        noise, timesteps = noise.repeat(2, 1, 1, 1), draws.repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.scheduler.config.prediction_type, latents, noise, timesteps, self.scheduler)
        conditions = {"encoder_hidden_states": embeds.repeat(2, 1, 1)}
        if self.xl:
            conditions |= {"text_embeds": pooled.repeat(2, 1), "time_ids": micro_conditions}
        return Inputs(latents, noise, noisy, target, timesteps, conditions, {})

    def predict(self, model, inputs: Inputs, rows: slice) -> torch.Tensor:
        c = {k: v[rows] for k, v in inputs.conditions.items()}
        added = {"added_cond_kwargs": {"text_embeds": c.pop("text_embeds"), "time_ids": c.pop("time_ids")}} \
            if self.xl else {}
        return model(inputs.noisy[rows], inputs.timestep[rows], c["encoder_hidden_states"], **added).sample

    def loss(self, model_pred, ref_pred, inputs: Inputs, beta: float, loss_type: str, positive: float = 0.0):
        return diffusion_dpo_loss(model_pred, ref_pred, inputs.target, beta=beta, loss_type=loss_type,
                                  positive=positive)


class FlowMatching:
    """Rectified-flow training of an SD3 or FLUX.1 transformer."""

    def __init__(self, pipe, weighting: str, guidance: float | None = FLUX_TRAIN_GUIDANCE) -> None:
        config = pipe.scheduler.config
        self.weighting = weighting
        self.timesteps = config.num_train_timesteps
        self.shift = training_shift(config)
        self.scaling, self.offset = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0
        self.flux = isinstance(pipe, FluxPipeline)
        # FLUX.1-dev's distilled guidance, an input of the transformer (schnell and SD3 have none)
        self.distilled_guidance = guidance if pipe.transformer.config.get("guidance_embeds", False) else None

    def inputs(self, sample: torch.Tensor, noise: torch.Tensor, draws: torch.Tensor, embeds: torch.Tensor,
               pooled: torch.Tensor | None, micro_conditions: torch.Tensor) -> Inputs:
        latents = (sample - self.offset) * self.scaling
        sigma = shifted_sigma(draws, self.timesteps, self.shift).to(latents.device).repeat(2)
        noise = noise.repeat(2, 1, 1, 1)
        shared = {}
        if self.flux:  # the transformer reads 2x2 patches as tokens; MSEs are the same over any layout
            (latents, noise), shared = flux_tokens([latents, noise], embeds.shape[1])
        noisy, target = flow_inputs(latents, noise, sigma)
        conditions = {"encoder_hidden_states": embeds.repeat(2, 1, 1), "pooled_projections": pooled.repeat(2, 1)}
        if self.flux and self.distilled_guidance is not None:
            conditions["guidance"] = torch.full((len(sigma),), self.distilled_guidance, device=latents.device)
        # SD3's transformer takes the timestep s * 1000, FLUX's s itself (its pipeline divides by 1000)
        timestep = sigma if self.flux else sigma * self.timesteps
        return Inputs(latents, noise, noisy, target, timestep, conditions, shared)

    def predict(self, model, inputs: Inputs, rows: slice) -> torch.Tensor:
        conditions = {k: v[rows] for k, v in inputs.conditions.items()}
        return model(hidden_states=inputs.noisy[rows], timestep=inputs.timestep[rows], **conditions,
                     **inputs.shared, return_dict=False)[0]

    def loss(self, model_pred, ref_pred, inputs: Inputs, beta: float, loss_type: str, positive: float = 0.0):
        return flow_dpo_loss(model_pred, ref_pred, inputs.latents, inputs.noise, beta=beta, loss_type=loss_type,
                             positive=positive)


def objective_for(pipe, weighting: str = "logit_normal", guidance: float | None = FLUX_TRAIN_GUIDANCE
                  ) -> NoisePrediction | FlowMatching:
    """The training objective of ``pipe``'s family (``guidance``: FLUX.1-dev's distilled guidance)."""
    return FlowMatching(pipe, weighting, guidance) if is_flow(pipe) else NoisePrediction(pipe)


def distilled_guidance(own_samplings: list[dict]) -> float:
    """The distilled guidance a FLUX.1-dev run trains at: the one its pairs were sampled at, when the records of
    this model's samples (``pair_table.sampled_by``) agree on one, so the preference is learnt under the
    conditioning the pictures were drawn with; else diffusers' FLUX_TRAIN_GUIDANCE."""
    recorded = {s["guidance"] for s in own_samplings if s.get("guidance") is not None}
    return float(recorded.pop()) if len(recorded) == 1 else FLUX_TRAIN_GUIDANCE
