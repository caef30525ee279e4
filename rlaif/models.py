"""Load SD1.5 / SD2.x / SDXL (UNet, DDPM noise) and SD3 / SD3.5 / FLUX.1 (transformer, rectified flow) text-to-image
pipelines from a hub id, a local folder or a tiny alias."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import diffusers
import huggingface_hub
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from rlaif.errors import RlaifError, first_line, hub_unavailable
from rlaif.files import folder_identity, weights_fingerprint
from rlaif.tiny import BUILDERS, COMMITTED, tiny_model_dir

PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,  # SD1.x and SD2.x
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusion3Pipeline": StableDiffusion3Pipeline,  # SD3 and SD3.5
    "FluxPipeline": FluxPipeline,  # FLUX.1-dev and FLUX.1-schnell
}
FLOW_PIPELINES = (StableDiffusion3Pipeline, FluxPipeline)  # rectified-flow transformers; the others train a UNet
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_ALIASES = (*COMMITTED, *BUILDERS)
# diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns).
DTYPE_KWARG = "dtype" if tuple(int(p) for p in diffusers.__version__.split(".")[:2]) >= (0, 42) else "torch_dtype"


def resolve_model(model: str) -> str:
    """Map the tiny aliases (``TINY_ALIASES``) to their local folders; hub ids and paths pass through. A bare name
    (no ORG/) close to an alias is refused at once as its misspelling, before the hub is asked (and retried)."""
    if model in TINY_ALIASES:
        return str(tiny_model_dir(model))
    if "/" not in model and not Path(model).exists():
        close = difflib.get_close_matches(model, TINY_ALIASES, n=1, cutoff=0.7)
        if close:
            raise RlaifError(f"model {model!r} is neither a folder, a hub id (ORG/NAME) nor a tiny model alias; did "
                             f"you mean {close[0]!r}?")
    return model


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") > 1


def load_pipeline(
    model: str, dtype: str = "fp32", device: str | torch.device = "cpu", scheduler: str | None = None,
    tuned: str | Path | None = None, component_dtypes: dict[str, str] | None = None,
) -> DiffusionPipeline:
    """Load ``model`` (hub id, folder or a tiny alias) in ``dtype`` on ``device``; ``component_dtypes`` (component
    name -> a ``DTYPES`` name) loads the components it names in another dtype (names the model lacks are ignored).

    ``scheduler`` names a diffusers scheduler class compatible with the model's own (for example
    ``EulerDiscreteScheduler``); it is built from the model's scheduler config. ``tuned`` is an ``rlaif train``
    output folder whose weights go on top (``rlaif.train.outputs.apply_tuned``).
    """
    if dtype not in DTYPES:
        raise RlaifError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = resolve_model(model)
    pipeline_class, index = _pipeline_class(model, source)
    options = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    dtypes = {"default": DTYPES[dtype], **{name: DTYPES[d] for name, d in (component_dtypes or {}).items()}}
    try:
        pipe = pipeline_class.from_pretrained(source, **{DTYPE_KWARG: dtypes}, **options)
    except Exception as exc:
        raise RlaifError(f"cannot load model {model!r}: {first_line(exc)}") from exc
    if scheduler is not None:
        pipe.scheduler = scheduler_class(pipe.scheduler, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if tuned is not None:
        from rlaif.train.outputs import apply_tuned  # outputs reads models' constants: import it late

        apply_tuned(pipe, tuned)
    return pipe


def _pipeline_class(model: str, source: str) -> tuple[type[DiffusionPipeline], dict]:
    """The pipeline class that ``model`` (resolved to ``source``) names in its model_index.json, and the index."""
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise RlaifError(f"model folder {source} does not exist")
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception as exc:
        unavailable = None if _looks_like_path(source) else hub_unavailable(exc, f"fetch it with `hf download {model}`")
        if unavailable:
            raise RlaifError(f"model {model!r} is not in the local Hugging Face cache, and {unavailable}") from exc
        raise RlaifError(f"cannot read model {model!r}: {first_line(exc)}") from exc
    pipeline_class = PIPELINES.get(index.get("_class_name", ""))
    if pipeline_class is None:
        raise RlaifError(
            f"model {model!r} is a {index.get('_class_name')}; rlaif supports {', '.join(PIPELINES)} models"
        )
    return pipeline_class, index


def model_family(model: str) -> str:
    """``unet`` (SD1.5 / SD2 / SDXL) or ``transformer`` (SD3 / SD3.5 / FLUX.1) for ``model``, from its
    model_index.json alone (nothing is loaded)."""
    pipeline_class, _ = _pipeline_class(model, resolve_model(model))
    return _family(pipeline_class)


def guided(model: str) -> bool:
    """Whether ``model``'s pipeline samples with classifier-free guidance (an unconditional branch): all but
    FLUX.1, whose guidance is distilled into the transformer (from model_index.json alone)."""
    pipeline_class, _ = _pipeline_class(model, resolve_model(model))
    return not issubclass(pipeline_class, FluxPipeline)


def check_negative_prompt(model: str, option: str) -> None:
    """Refuse a negative prompt for FLUX.1 (from model_index.json alone): without classifier-free guidance, diffusers'
    FluxPipeline drops it (unless true CFG, which rlaif does not run), so the images would be made without it
    while the run records it."""
    if not guided(model):
        raise RlaifError(f"{option}: FLUX.1 samples without classifier-free guidance, and its pipeline ignores a "
                         "negative prompt (it needs true CFG, which rlaif does not run); leave it out")


def check_generation(model: str, scheduler: str | None, sizes: dict[str, int]) -> None:
    """Refuse a --scheduler that ``model`` does not take and image sides (``sizes``: option -> pixels) its network
    cannot, as sampling would once the model is loaded, from its config files alone (model_index.json, the
    scheduler's and the VAE's config): nothing is loaded."""
    source = resolve_model(model)
    pipeline_class, index = _pipeline_class(model, source)
    try:  # the scheduler as from_pretrained builds it, and the VAE config that the pipelines' scale factor is of
        own = getattr(diffusers, index["scheduler"][1]).from_pretrained(source, subfolder="scheduler") \
            if scheduler is not None else None
        vae = AutoencoderKL.load_config(source, subfolder="vae") if sizes else {}
    except Exception as exc:
        raise RlaifError(f"cannot read model {model!r}: {first_line(exc)}") from exc
    if scheduler is not None:
        scheduler_class(own, scheduler)
    for option, pixels in sizes.items():
        _check_multiple(option, pixels, 2 ** (len(vae["block_out_channels"]) - 1),
                        issubclass(pipeline_class, FLOW_PIPELINES))


def _family(pipeline_class: type[DiffusionPipeline]) -> str:
    return "transformer" if issubclass(pipeline_class, FLOW_PIPELINES) else "unet"


def model_identity(model: str) -> str:
    """What identifies the weights behind ``model``: for a hub id, the cached snapshot (its revision) that
    loading used; for a folder or a tiny alias, the content of the files its pipeline loads (``folder_identity``,
    ``loaded_only``). A new revision or a changed folder is another model, whose samples are not this one's."""
    source = resolve_model(model)
    if not _looks_like_path(source):
        index = huggingface_hub.try_to_load_from_cache(source, "model_index.json")
        return f"{model}@{Path(index).parent.name}" if isinstance(index, str) else model
    return folder_identity(Path(source).expanduser(), loaded_only=True)


def denoiser_fingerprint(model: str) -> str | None:
    """What identifies the weights of ``model``'s UNet or transformer wherever they lie (``component_fingerprint``):
    the same for a folder, its copy and the hub snapshot it came from."""
    return component_fingerprint(model, ("unet", "transformer"))


FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")  # what training encodes with


def component_fingerprint(model: str, parts: tuple[str, ...]) -> str | None:
    """``weights_fingerprint`` of the weight files the loader takes from ``model``'s component folders ``parts``
    (``*.safetensors`` without a variant, else ``.bin``; a variant's such as fp16 only when there is nothing else).
    None when the files are not on this machine (a hub id not in the cache) or there are none."""
    source = resolve_model(model)
    if _looks_like_path(source):
        folder = Path(source).expanduser()
    else:
        index = huggingface_hub.try_to_load_from_cache(source, "model_index.json")
        if not isinstance(index, str):
            return None
        folder = Path(index).parent
    chosen = []
    for part in parts:
        weights = [p for p in (folder / part).glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()]
        plain = next((found for suffix in (".safetensors", ".bin")  # model(-00001-of-00002).safetensors, no variant
                      if (found := [p for p in weights if p.suffix == suffix and len(p.suffixes) == 1])), weights)
        chosen += [p for p in plain if not p.name.startswith(".")]
    return weights_fingerprint(chosen) if chosen else None


def scheduler_class(scheduler: SchedulerMixin, name: str) -> type[SchedulerMixin]:
    """The scheduler class called ``name`` among those compatible with a model's ``scheduler``."""
    choices = {cls.__name__: cls for cls in [type(scheduler), *scheduler.compatibles]}
    if name not in choices:
        raise RlaifError(f"unknown --scheduler {name!r}; this model accepts: {', '.join(sorted(choices))}")
    return choices[name]


def default_guidance(pipe: DiffusionPipeline) -> float:
    """The guidance scale ``pipe`` samples with when called without one (its ``__call__`` default: SD 7.5, SDXL 5.0,
    SD3 7.0, FLUX.1 3.5), so that an unset --guidance means for every family what it means in diffusers; 0 for
    FLUX.1-schnell, whose transformer has no guidance input (the pipeline ignores the scale)."""
    if isinstance(pipe, FluxPipeline) and not pipe.transformer.config.guidance_embeds:
        return 0.0
    return pipeline_guidance(type(pipe))


def pipeline_guidance(pipeline: type[DiffusionPipeline]) -> float:
    """The ``guidance_scale`` default of a pipeline class's ``__call__``."""
    return float(inspect.signature(pipeline.__call__).parameters["guidance_scale"].default)


def default_size(pipe: DiffusionPipeline) -> int:
    """The model's native resolution in pixels: the UNet's sample size times the VAE scale factor, or for a
    transformer model (whose config may not say) the VAE's own image size (1024 for SD3 and FLUX.1)."""
    if is_flow(pipe):
        return pipe.vae.config.sample_size
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_size(pipe: DiffusionPipeline, option: str, pixels: int) -> None:
    """Refuse an image side the network cannot take: a multiple of the VAE's scale factor, twice that for SD3 and
    FLUX, whose transformers read 2x2 latent patches (8 and 16 px on the real models)."""
    _check_multiple(option, pixels, pipe.vae_scale_factor, is_flow(pipe))


def _check_multiple(option: str, pixels: int, vae_scale_factor: int, flow: bool) -> None:
    """Refuse ``pixels`` (of ``option``) that are not a multiple of the network's latent patch in pixels."""
    multiple = vae_scale_factor * 2 if flow else vae_scale_factor
    if pixels % multiple:
        raise RlaifError(f"{option} {pixels}: this model needs a multiple of {multiple} pixels")


def is_flow(pipe: DiffusionPipeline) -> bool:
    """True for the rectified-flow transformer families (SD3 / SD3.5, FLUX.1), False for UNet models."""
    return isinstance(pipe, FLOW_PIPELINES)


def prompt_length(pipe: DiffusionPipeline, requested: int | None = None) -> dict[str, int]:
    """The T5 prompt length of an SD3 / FLUX pipeline as keyword arguments (sampling and training should agree):
    ``requested`` (--max-sequence-length), else the pipeline's default (256 for SD3, 512 for FLUX.1-dev; 256 for
    the timestep-distilled FLUX.1-schnell, as its model card samples) capped by the T5 tokenizer's
    ``model_max_length`` (the tiny models': 32). Empty for UNet pipelines, whose CLIP prompts are always 77
    tokens; asking those for a length is an error."""
    if not is_flow(pipe):
        if requested is not None:
            raise RlaifError(f"--max-sequence-length {requested}: only SD3 / FLUX.1 models have a T5 prompt length "
                             "(SD1.5 / SDXL prompts are always 77 CLIP tokens)")
        return {}
    flux = isinstance(pipe, FluxPipeline)
    limit = (pipe.tokenizer_2 if flux else pipe.tokenizer_3).model_max_length
    if requested is not None:
        if requested > limit:  # padded past what its T5 tokenizer takes: other images, no longer prompts
            raise RlaifError(f"--max-sequence-length {requested}: this model's T5 tokenizer takes at most {limit} "
                             "tokens")
        return {"max_sequence_length": requested}
    default = 512 if flux and pipe.transformer.config.guidance_embeds else 256
    return {"max_sequence_length": min(default, limit)}


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The network that training changes: the UNet, or the transformer of a flow model."""
    return getattr(pipe, denoiser_name(pipe))


def denoiser_name(pipe: DiffusionPipeline) -> str:
    """Its component (and folder) name in the pipeline: ``unet`` or ``transformer`` (``model_family``'s name)."""
    return _family(type(pipe))
