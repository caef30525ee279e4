"""What ``rlaif train`` writes, and the one reader of it.

An output folder holds either ``unet/`` or ``transformer/`` (full fine-tuning of a UNet model, or of an SD3 /
FLUX transformer) or ``pytorch_lora_weights.safetensors`` (a LoRA in diffusers format), plus ``train.json``.
Every output is self-contained: it alone reproduces the whole chain of rounds it was trained on (``--init``), in
plain diffusers (``pipe.load_lora_weights(folder)`` or ``UNet2DConditionModel.from_pretrained(folder / "unet")``,
``SD3Transformer2DModel.from_pretrained(folder / "transformer")``):

- each LoRA's scale ``alpha / rank`` is folded into its up-projection, and the file's adapter metadata says
  ``lora_alpha = r`` (scale 1), so every loader reads the same model whatever alpha it assumes;
- a LoRA trained on top of a LoRA output is saved as one LoRA whose factors concatenate the rounds' factors
  (rank r1 + r2 + ...): ``B1 A1 + B2 A2 = [B1 B2] [A1; A2]``, exact, no SVD;
- a LoRA trained on top of a full UNet output is fused into that UNet and saved as ``unet/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import load_file

from rlaif.errors import RlaifError, first_line
from rlaif.files import check_in_dir, publish, read_json, write_json
from rlaif.models import DTYPE_KWARG, denoiser, denoiser_fingerprint, denoiser_name
from rlaif.out_lock import held_by

LORA_FILE = "pytorch_lora_weights.safetensors"
TRAIN_FILE = "train.json"
FORMAT = 2  # 2: self-contained (earlier rounds inside); 1 (absent): a LoRA that needed its `init` applied first
INTERFACE_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "sample_size",
                  "joint_attention_dim", "pooled_projection_dim", "patch_size")
DENOISERS = ("unet", "transformer")  # the folder a full fine-tuning output keeps its network in


def full_folder(folder: Path) -> Path | None:
    """The ``unet/`` or ``transformer/`` folder of a full fine-tuning output; None for a LoRA output."""
    return next((Path(folder) / name for name in DENOISERS if (Path(folder) / name).is_dir()), None)


def is_full(folder: Path) -> bool:
    """True for a full fine-tuning output (``unet/`` or ``transformer/``), False for a LoRA output."""
    return full_folder(folder) is not None


def check_output(folder: str | Path, option: str = "--tuned") -> Path:
    """``folder`` as a Path if it holds an ``rlaif train`` output in the current format, else a one-line error."""
    folder = Path(folder)
    check_in_dir(folder, option)
    if not (is_full(folder) or (folder / LORA_FILE).is_file()):
        unfinished = ("a training checkpoint" if (folder / "position.json").is_file() else
                      "an unfinished training run (checkpoints only)" if (folder / "checkpoints").is_dir() else None)
        if unfinished:
            writer = held_by(folder)
            if writer is not None:
                raise RlaifError(f"{option} {folder} belongs to a training run still going (`rlaif {writer}`), not "
                                 "finished weights: wait for it to finish")
            raise RlaifError(f"{option} {folder} is {unfinished}, not finished weights: finish the run with the same "
                             "`rlaif train` command and --resume latest")
        if (folder / "train_log.jsonl").is_file():
            raise RlaifError(f"{option} {folder} is a training run stopped before its first checkpoint (a log, no "
                             "weights): run the same `rlaif train` command again, which starts it over")
        if (folder / "samples.parquet").is_file():
            raise RlaifError(f"{option} {folder} holds the images of `rlaif sample`, not an `rlaif train` output: give "
                             "the folder `rlaif train` wrote (its --out)")
        raise RlaifError(f"{option} {folder} holds neither {LORA_FILE} nor unet/ or transformer/: not an `rlaif "
                         "train` output")
    if not (folder / TRAIN_FILE).is_file():
        raise RlaifError(f"{option} {folder} has no {TRAIN_FILE}: not a finished `rlaif train` output")
    info = train_info(folder)
    config = info.get("config", {})
    if info.get("format", 1) < FORMAT and (config.get("init") or (
            not config.get("full") and config.get("lora_alpha") != config.get("lora_rank"))):
        raise RlaifError(f"{option} {folder} was written by an older rlaif that saved it incompletely (without its "
                         "earlier rounds, or without its LoRA alpha); retrain it")
    return folder


def check_trained_from(folder: Path, model: str) -> None:
    """Refuse ``model`` as the base to compare the tuned ``folder`` with when it is not the model that folder was
    trained from (their UNet or transformer weights differ): the comparison would measure the two bases'
    difference as much as the training. Outputs that recorded no base weights, or a base not on this machine,
    pass."""
    recorded = train_info(folder).get("base_weights")
    current = recorded and denoiser_fingerprint(model)
    if current and current != recorded:
        trained_on = trained_config(folder).get("model", "another model")
        if trained_on == model:
            raise RlaifError(f"--tuned {folder} was trained from {model}, whose weights have changed since (a new "
                             "revision, or a rewritten folder): a comparison with other base weights measures their "
                             "difference too; evaluate against the weights it was trained from")
        raise RlaifError(f"--tuned {folder} was trained from {trained_on}, whose weights differ from --model "
                         f"{model}'s: a comparison with another base measures the bases' difference too; pass "
                         f"--model {trained_on}")


def trained_config(folder: Path) -> dict:
    """The settings an `rlaif train` output was trained with (train.json's ``config``); empty if unrecorded."""
    return train_info(folder).get("config", {})


def train_info(folder: Path) -> dict:
    """An `rlaif train` output's train.json: its settings and what it trained on; empty if unrecorded."""
    return read_json(folder / TRAIN_FILE, "train the folder again") or {}


def trained_tables(info: dict) -> list[dict]:
    """The local pairs tables a train output (its train.json ``info``) learnt from: its own, then those of its
    --init chain, each as ``{"pairs": path, "pairs_file": identity, "sampled_seeds": seeds or None,
    "label_column": the column trained on, "held_out": the share of captions it held out (0 when it held out no
    pair), each None where unrecorded}``."""
    config = info.get("config", {})
    own = {"pairs": config.get("pairs"), "pairs_file": info.get("pairs_file"),
           "sampled_seeds": info.get("sampled_seeds"), "label_column": info.get("label_column"),
           "held_out": (config.get("val_fraction") if info.get("pairs_held_out")
                        else 0.0 if "pairs_held_out" in info else None)}
    return [table for table in (own, *info.get("earlier_tables", [])) if table["pairs"]]


def weights_path(folder: str | Path) -> Path:
    """Where an output's weights are: its ``unet/`` or ``transformer/`` folder, or its LoRA file."""
    folder = Path(folder)
    return full_folder(folder) or folder / LORA_FILE


def weights_identity(folder: str | Path) -> str:
    """A content hash of an output's weights (and nothing else): equal iff the model it applies is equal."""
    folder = check_output(folder)
    network = full_folder(folder)
    files = sorted(p for p in network.rglob("*") if p.is_file()) if network else [folder / LORA_FILE]
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def apply_tuned(pipe: DiffusionPipeline, folder: str | Path, fuse: bool = True) -> None:
    """Put the weights of an ``rlaif train`` output into ``pipe``: its full UNet or transformer, or its LoRA fused
    in (``fuse=False``: loaded as an adapter that ``disable_adapters()`` switches off, as in training)."""
    folder = check_output(folder)
    name, current = denoiser_name(pipe), denoiser(pipe)
    trained_on = trained_config(folder).get("model")
    other = f"it was trained on {trained_on!r}" if trained_on else "was it trained on another model?"
    try:
        if is_full(folder):
            saved = full_folder(folder)
            if saved.name != name:
                raise RlaifError(f"{saved} is a {saved.name} but this model's network is a {name}: {other}")
            network = type(current).from_pretrained(saved, **{DTYPE_KWARG: current.dtype})
            differ = [k for k in INTERFACE_KEYS if network.config.get(k) != current.config.get(k)]
            if differ:
                raise RlaifError(f"{saved} does not fit this model ({', '.join(differ)} differ): {other}")
            setattr(pipe, name, network.to(pipe.device))
            return
        with safe_open(folder / LORA_FILE, "pt") as weights:
            keys = list(weights.keys())
        expected = sum(1 for key in keys if key.startswith(f"{name}."))
        pipe.load_lora_weights(folder, adapter_name="rlaif")
        loaded = sum(1 for param, _ in denoiser(pipe).named_parameters() if ".rlaif." in param)
        if loaded != expected or not expected:
            network = "UNet" if name == "unet" else "transformer"
            raise RlaifError(f"{folder / LORA_FILE}: {loaded} of its {len(keys)} LoRA tensors fit this model's "
                             f"{network}; {other}")
        if fuse:
            pipe.fuse_lora()
            pipe.unload_lora_weights()
    except RlaifError:
        raise
    except Exception as exc:  # mismatched shapes or keys: trained on another model
        raise RlaifError(f"cannot apply {folder} to this model ({other.rstrip('?')}): {first_line(exc)}") from exc


def scaled_lora_factors(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's trained LoRA in PEFT key format (``MODULE.lora_A.weight``, ``MODULE.lora_B.weight``) with each
    module's scale ``alpha / r`` folded into ``lora_B``, so that ``W + B A`` is the trained layer."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if "default" not in module.lora_A:  # an embedding LoRA keeps its factors elsewhere: never trained here
            raise RlaifError(f"LoRA layer {name} is not a linear or convolution LoRA; use other --lora-targets")
        factors[f"{name}.lora_A.weight"] = module.lora_A["default"].weight.detach().float().cpu().clone()
        factors[f"{name}.lora_B.weight"] = (module.lora_B["default"].weight.detach().float().cpu()
                                            * module.scaling["default"])
    return factors


def concatenate_loras(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One LoRA equal to applying ``first`` and then ``second`` (both scale 1, PEFT key format): per module,
    ``A = [A1; A2]`` and ``B = [B1 B2]``; a module only one of them adapts gets zero factors for the other."""
    def ranks(factors: dict[str, torch.Tensor]) -> int:
        return next(t.shape[0] for k, t in factors.items() if k.endswith("lora_A.weight"))

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in (*first, *second)})
    r1, r2 = ranks(first), ranks(second)
    joined = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        shape_a = (first.get(a_key) if a_key in first else second[a_key]).shape[1:]
        shape_b = (first.get(b_key) if b_key in first else second[b_key]).shape
        a1 = first.get(a_key, torch.zeros(r1, *shape_a))
        a2 = second.get(a_key, torch.zeros(r2, *shape_a))
        b1 = first.get(b_key, torch.zeros(shape_b[0], r1, *shape_b[2:]))
        b2 = second.get(b_key, torch.zeros(shape_b[0], r2, *shape_b[2:]))
        joined[a_key], joined[b_key] = torch.cat([a1, a2], dim=0), torch.cat([b1, b2], dim=1)
    return joined


def read_lora(folder: Path, name: str = "unet") -> dict[str, torch.Tensor]:
    """An output's LoRA of the ``name`` network (scale 1, as written by ``save_outputs``) in PEFT key format."""
    keys = {k.removeprefix(f"{name}."): v for k, v in load_file(folder / LORA_FILE).items() if k.startswith(f"{name}.")}
    peft_keys = convert_unet_state_dict_to_peft(keys) if name == "unet" else keys  # transformers save PEFT keys
    return {k: v.float() for k, v in peft_keys.items()}


def remove_outputs(out: Path) -> None:
    """Remove a finished run's weights and train.json from ``out`` (for --overwrite), nothing else."""
    for name in DENOISERS:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / LORA_FILE).unlink(missing_ok=True)
    (out / TRAIN_FILE).unlink(missing_ok=True)


def save_outputs(unet: torch.nn.Module, pipe: DiffusionPipeline, out: Path, full: bool, init: Path | None,
                 info: dict) -> None:
    """Write the trained model self-contained into ``out`` (staged, then moved in) and ``train.json`` with
    ``info``. ``unet`` (the UNet or transformer) holds the trained weights (with PEFT adapters unless ``full``);
    ``init`` is the output it started from, whose rounds the result must include."""
    name = denoiser_name(pipe)
    staging = out / ".weights.partial"
    shutil.rmtree(staging, ignore_errors=True)
    if full or (init is not None and is_full(init)):
        if not full:  # a LoRA on top of a full output: fuse it in (its base weights are that network)
            unet.fuse_lora(lora_scale=1.0)
            unet.unload_lora()
        # not where it was loaded from (a round 2's --init folder): the output is identified by its content
        # (weights_identity), and two copies of equal weights trained in two folders must not differ
        unet.register_to_config(_name_or_path="")
        unet.save_pretrained(staging / name, safe_serialization=True)
    else:
        factors = scaled_lora_factors(unet)
        if init is not None:
            factors = concatenate_loras(read_lora(init, name), factors)
        rank = next(t.shape[0] for k, t in factors.items() if k.endswith("lora_A.weight"))
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in factors})
        # diffusers' own scripts save a UNet LoRA in its older key names and a transformer LoRA in PEFT's
        layers = convert_state_dict_to_diffusers(factors) if name == "unet" else factors
        metadata = {"r": rank, "lora_alpha": rank, "target_modules": modules}
        type(pipe).save_lora_weights(str(staging), **{f"{name}_lora_layers": layers,
                                                      f"{name}_lora_adapter_metadata": metadata},
                                     safe_serialization=True)
    publish(staging)
    remove_outputs(out)  # a LoRA must not sit beside an older full UNet, nor the other way round
    for entry in staging.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    write_json({**info, "format": FORMAT}, out / TRAIN_FILE)
