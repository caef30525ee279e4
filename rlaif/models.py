"""Load SD1.5 / SD2.x / SDXL-family text-to-image pipelines from a hub id, a local folder or a tiny alias."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors import safe_open

from rlaif.errors import RlaifError
from rlaif.tiny import tiny_model_dir

PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,  # SD1.x and SD2.x
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_ALIASES = ("tiny", "tiny-xl")
# diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns).
_DTYPE_KWARG = "dtype" if tuple(int(p) for p in diffusers.__version__.split(".")[:2]) >= (0, 42) else "torch_dtype"


def resolve_model(model: str) -> str:
    """Map the aliases ``tiny`` / ``tiny-xl`` to their local folders; hub ids and paths pass through."""
    return str(tiny_model_dir(model)) if model in TINY_ALIASES else model


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") > 1


def load_pipeline(
    model: str, dtype: str = "fp32", device: str | torch.device = "cpu", scheduler: str | None = None,
    tuned: str | Path | None = None,
) -> DiffusionPipeline:
    """Load ``model`` (hub id, folder, ``tiny`` or ``tiny-xl``) in ``dtype`` on ``device``.

    ``scheduler`` names a diffusers scheduler class compatible with the model's own (for example
    ``EulerDiscreteScheduler``); it is built from the model's scheduler config. ``tuned`` is an ``rlaif train``
    output folder whose weights go on top (``apply_tuned``).
    """
    if dtype not in DTYPES:
        raise RlaifError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = resolve_model(model)
    if _looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise RlaifError(f"model folder {source} does not exist")
    try:
        index = DiffusionPipeline.load_config(source)
    except Exception as exc:
        raise RlaifError(f"cannot read model {model!r}: {_first_line(exc)}") from exc
    pipeline_class = PIPELINES.get(index.get("_class_name", ""))
    if pipeline_class is None:
        raise RlaifError(
            f"model {model!r} is a {index.get('_class_name')}; rlaif supports {', '.join(PIPELINES)} models"
        )
    options = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    try:
        pipe = pipeline_class.from_pretrained(source, **{_DTYPE_KWARG: DTYPES[dtype]}, **options)
    except Exception as exc:
        raise RlaifError(f"cannot load model {model!r}: {_first_line(exc)}") from exc
    if scheduler is not None:
        pipe.scheduler = scheduler_class(pipe, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if tuned is not None:
        apply_tuned(pipe, tuned)
    return pipe


LORA_FILE = "pytorch_lora_weights.safetensors"
INTERFACE_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "sample_size")


def apply_tuned(pipe: DiffusionPipeline, folder: str | Path) -> None:
    """Put the weights of an ``rlaif train`` output into ``pipe``: its full UNet (``unet/``), or its LoRA fused
    into the UNet. A LoRA trained on top of another output (``init`` in its train.json) gets that one first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RlaifError(f"tuned model folder {folder} does not exist")
    if not ((folder / "unet").is_dir() or (folder / LORA_FILE).is_file()):
        raise RlaifError(f"tuned model {folder} holds neither {LORA_FILE} nor unet/: not an `rlaif train` output")
    try:
        if (folder / "unet").is_dir():
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", **{_DTYPE_KWARG: pipe.unet.dtype})
            differ = [k for k in INTERFACE_KEYS if unet.config.get(k) != pipe.unet.config.get(k)]
            if differ:
                raise RlaifError(f"{folder / 'unet'} does not fit this model ({', '.join(differ)} differ): was it "
                                 "trained on another one?")
            pipe.unet = unet.to(pipe.device)
            return
        init = _train_settings(folder).get("init")
        if init:
            apply_tuned(pipe, init)
        with safe_open(folder / LORA_FILE, "pt") as weights:
            expected = sum(1 for key in weights.keys() if key.startswith("unet."))
        pipe.load_lora_weights(folder, adapter_name="rlaif")
        loaded = sum(1 for name, _ in pipe.unet.named_parameters() if ".rlaif." in name)
        if loaded != expected:
            raise RlaifError(f"{folder / LORA_FILE}: {loaded} of its {expected} LoRA tensors fit this model's UNet; "
                             "was it trained on another model?")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    except RlaifError:
        raise
    except Exception as exc:  # mismatched shapes or keys: trained on another model
        raise RlaifError(f"cannot apply {folder} to this model (was it trained on another one?): "
                         f"{_first_line(exc)}") from exc


def _train_settings(folder: Path) -> dict:
    path = folder / "train.json"
    return json.loads(path.read_text())["config"] if path.is_file() else {}


def scheduler_class(pipe: DiffusionPipeline, name: str) -> type[SchedulerMixin]:
    """The scheduler class called ``name`` among those compatible with ``pipe``'s scheduler."""
    choices = {cls.__name__: cls for cls in [type(pipe.scheduler), *pipe.scheduler.compatibles]}
    if name not in choices:
        raise RlaifError(f"unknown --scheduler {name!r}; this model accepts: {', '.join(sorted(choices))}")
    return choices[name]


def default_size(pipe: DiffusionPipeline) -> int:
    """The model's native resolution in pixels (UNet sample size times the VAE scale factor)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
