"""Training speed and memory of `rlaif train` on the tiny model; every figure is a ratio measured in one run.

(a) pairs/s of `rlaif train` against the official per-step algorithm (re-implemented below from the official
    DiffusionDPO ``train.py``: images decoded and transformed, VAE and text encoder run every step, a separate
    reference UNet copy), same model, pairs, batch, fp32, full fine-tuning on both sides; also rlaif with
    --no-cache, which isolates the cache's share.
(b) DPO step time / SFT step time of `rlaif train` (LoRA) on the same pairs (arithmetic floor about 2.7:
    DPO runs forward+backward on winners and losers plus a reference forward, SFT forward+backward on winners).
(c) peak memory of LoRA-DPO / LoRA-SFT: each run in a fresh process; peak resident memory over the training
    steps (the high-water mark is reset after step 1, when model, optimizer and caches are resident).
(d) the first step's loss in fp32, fp16 and bf16, rlaif (LoRA and full) and the official bf16 recipe (reference
    weights cast to bf16, policy fp32 under autocast). The ln 2 property itself is a test:
    tests/test_train.py::test_first_step_loss_is_ln2.
(f) the step time of LoRA DPO with the unconditional anchor (``--keep-unconditional 1``, a default) against without
    (arithmetic about 1.5: a forward and backward of the policy and a reference forward, on the winners only).

With ``--official DIR`` (a checkout of SalesforceAIResearch/DiffusionDPO, e.g. fetched from GitHub), instead:
(e) s/step of the real official ``train.py`` (copied to a temporary folder, its hard xformers requirement
    switched off, nothing else changed) against `rlaif train`, side by side: the same tiny SD1.5 folder, the
    same 64-pair Pick-a-Pic v2 style table (256x256 JPEGs), full fine-tuning, fp32, batch 4, centre crop, no
    flip, no caption dropout, AdamW, every pair trained on (--val-fraction 0). Both run under
    bench/step_timer.py (a clock on every optimizer step, the same for both); the first 5 steps are untimed,
    and the runs alternate in a rotating order. rlaif runs as a rerun does, with its
    latent cache filled by an untimed first run (the official script encodes every image at every step), and
    with --no-cache (every step decodes and encodes like the official one) to separate the cache's share.

    With --lora, the same harness also times LoRA DPO, LoRA SFT and LoRA DPO with the anchor ((b) and (f)) and,
    on a GPU, reads each run's peak CUDA memory after step 1 ((c)). --size sd15 runs it all on Stable Diffusion
    1.5's architecture with random weights (bench/full_size.py) at 512 px, for a GPU machine.

    python bench/train.py [--steps 24] [--batch-size 4] [--repeats 2] [--official DIR [--size tiny|sd15]
                          [--mixed-precision no|fp16|bf16] [--workers N] [--lora]]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from torchvision import transforms

from rlaif.cli import quiet_libraries
from rlaif.config import OFFICIAL_LOSS, LabelConfig, SampleConfig, TrainConfig, official_loss
from rlaif.label import run_label
from rlaif.models import load_pipeline
from rlaif.sample import run_sample
from rlaif.train.pair_table import PairTable, PreferencePair
from rlaif.train.trainer import run_train

PROMPTS = "shapes"  # the bundled 8-scene prompt set, data/shapes.txt (rlaif.prompts.PROMPT_SETS)
# Every rlaif run below trains the official loss, as the official-style step computes it, unless a contender says
# (rlaif's UNet defaults differ: beta 1000, DPO-Positive, the unconditional anchor without caption dropout)
BETA = OFFICIAL_LOSS["beta"]


def flags(settings: dict) -> list[str]:
    """``settings`` as `rlaif train` command-line options."""
    return [item for name, value in settings.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def make_pairs(folder: Path) -> Path:
    """Tiny-model samples (8 prompts x 4) labelled by compressibility, all pairs: 48 pairs."""
    run_sample(SampleConfig(model="tiny", prompts=PROMPTS, out=folder, per_prompt=4, steps=4, batch_size=32))
    run_label(LabelConfig(samples_dir=folder, scorers=["compressibility"], strategy="all-pairs"))
    return folder / "pairs.parquet"


def rlaif_step_seconds(pairs: Path, out: Path, **settings) -> list[float]:
    """Per-step wall times of `rlaif train` (from its log), after a first untimed run that warms the cache."""
    config = dict(pairs=pairs, model="tiny", max_steps=settings.pop("max_steps"), learning_rate=1e-5,
                  **{**official_loss(settings.get("loss", "sigmoid")), **settings})
    log = out / "train_log.jsonl"
    run_train(TrainConfig(out=out / "warm", **{**config, "max_steps": 12}))
    run_train(TrainConfig(out=out, **config))
    batch = config.get("batch_size", 1)
    return [batch / json.loads(line)["pairs_per_s"] for line in log.read_text().splitlines()][2:]


class OfficialStyle:
    """The official script's training step, written from its algorithm: per step, decode and transform the
    pair images, VAE-encode and sample latents, encode captions (with dropout), run the policy and a separate
    reference copy. ``precision`` "bf16" reproduces its mixed-precision handling: VAE, text encoder and
    reference cast to bf16, the policy's fp32 weights under autocast."""

    def __init__(self, precision: str = "no", resolution: int = 64) -> None:
        pipe = load_pipeline("tiny")
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.reference = copy.deepcopy(self.unet).requires_grad_(False).to(self.dtype)
        self.vae.requires_grad_(False).to(self.dtype)
        self.text_encoder.requires_grad_(False).to(self.dtype)
        self.unet.train()
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-5)
        self.transform = transforms.Compose([
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5])])
        self.precision = precision
        self.timing = {"data + VAE + text": 0.0, "UNet policy + reference + update": 0.0}

    def step(self, batch: list[PreferencePair]) -> float:
        started = time.perf_counter()
        pixels = torch.stack([torch.cat([self.transform(Image.open(p.chosen).convert("RGB")),
                                         self.transform(Image.open(p.rejected).convert("RGB"))]) for p in batch])
        feed = torch.cat(pixels.chunk(2, dim=1)).to(self.dtype)  # [winners; losers]
        with torch.no_grad():
            latents = self.vae.encode(feed).latent_dist.sample() * self.vae.config.scaling_factor
            captions = ["" if torch.rand(()) < 0.2 else p.caption for p in batch]
            ids = self.tokenizer(captions, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids)[0].repeat(2, 1, 1)
        encoded = time.perf_counter()
        noise = torch.randn_like(latents.chunk(2)[0]).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(batch),)).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            model_pred = self.unet(noisy, timesteps, hidden).sample
        model_losses = (model_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        model_w, model_l = model_losses.chunk(2)
        with torch.no_grad():
            ref_pred = self.reference(noisy, timesteps, hidden).sample
            ref_w, ref_l = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3]).chunk(2)
        inside = -0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        done = time.perf_counter()
        self.timing["data + VAE + text"] += encoded - started
        self.timing["UNet policy + reference + update"] += done - encoded
        return float(loss.detach())


def official_step_seconds(pairs: list[PreferencePair], steps: int, batch: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    official = OfficialStyle()
    seconds = []
    for step in range(steps + 2):
        chosen = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        started = time.perf_counter()
        official.step(chosen)
        seconds.append(time.perf_counter() - started)
    return seconds[2:], official.timing


def probe_memory(pairs: Path, loss: str, steps: int, batch: int) -> None:
    """(child process) Peak resident memory over LoRA training steps 2..N, printed as JSON."""
    baseline = {}

    def progress(step: int, total: int, logs: dict) -> None:
        if step == 1:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            baseline["rss_kb"] = _status_kb("VmRSS")

    with tempfile.TemporaryDirectory() as tmp:
        run_train(TrainConfig(pairs=pairs, model="tiny", out=Path(tmp), loss=loss, batch_size=batch, max_steps=steps,
                              **official_loss(loss)), progress)
    print(json.dumps({"baseline_kb": baseline["rss_kb"], "peak_kb": _status_kb("VmHWM")}))


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def memory(pairs: Path, loss: str, steps: int, batch: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--probe-memory", loss, "--pairs", str(pairs),
                             "--steps", str(steps), "--batch-size", str(batch)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def first_losses(pairs_path: Path, pairs: list[PreferencePair], batch: int, folder: Path) -> dict[str, float]:
    losses = {}
    for precision in ("no", "fp16", "bf16"):
        for full in (False, True):
            out = folder / f"first-{precision}-{full}"
            # a process per precision: accelerate fixes the mixed precision once per process
            subprocess.run([sys.executable, "-m", "rlaif", "train", str(pairs_path), "--model", "tiny", "--out",
                            str(out), "--batch-size", str(batch), "--max-steps", "1", "--mixed-precision", precision,
                            *flags(OFFICIAL_LOSS), *(["--full"] if full else [])], capture_output=True, check=True)
            first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]
            losses[f"rlaif {'full' if full else 'LoRA'} {precision}"] = first
    torch.manual_seed(0)
    losses["official-style full bf16 (bf16 reference)"] = OfficialStyle("bf16").step(pairs[:batch])
    return losses


def official_script(official: Path, folder: Path) -> Path:
    """A copy of the official train.py in ``folder`` whose only change is that a missing xformers is allowed
    (it raises otherwise, and xformers needs CUDA)."""
    source = (official / "train.py").read_text()
    required = '        raise ValueError("xformers is not available. Make sure it is installed correctly")'
    if source.count(required) != 1:
        raise SystemExit(f"{official / 'train.py'} is not the expected official script (xformers check not found)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(source.replace(required, "        pass  # bench: xformers is optional on CPU"))
    return folder / "train.py"


def step_intervals(times: Path, untimed: int = 5) -> list[float]:
    """Seconds between consecutive optimizer steps after the first ``untimed`` steps."""
    stamps = [float(line) for line in times.read_text().split()]
    return [b - a for a, b in zip(stamps[untimed:], stamps[untimed + 1:], strict=False)]


def contenders(lora: bool) -> dict[str, list[str]]:
    """(e)'s `rlaif train` runs by name: their options beyond the shared ones (LoRA runs only with ``lora``)."""
    beta = ["--beta", str(BETA)]  # the official loss's; SFT has none
    full = [*beta, "--full", "--learning-rate", "1e-5"]  # as the official script is run here
    runs = {"rlaif train": full, "rlaif --no-cache": [*full, "--no-cache"]}
    if lora:
        runs |= {"rlaif LoRA DPO": beta, "rlaif LoRA SFT": ["--loss", "sft"],
                 "rlaif LoRA DPO, anchored": [*beta, "--keep-unconditional", "1"]}
    return runs


def against_official(official: Path, steps: int, batch: int, repeats: int, size: str, precision: str,
                     workers: int, lora: bool, profiles: Path | None = None) -> None:
    """(e): the real official script and `rlaif train` on the same model and table, alternating; with ``lora``
    also (b), (c) and (f) from the same harness (memory on a GPU only). With ``profiles``, instead, each
    contender runs once under bench/step_profile.py (steps 5 to 10) and its report goes to that folder."""
    sys.path.insert(0, str(Path(__file__).parent))
    from full_size import SD15_RESOLUTION, write_sd15_architecture
    from synthetic import pick_a_pic_table

    from rlaif.tiny import RESOLUTION, write_tiny

    resolution = SD15_RESOLUTION if size == "sd15" else RESOLUTION
    timer = str(Path(__file__).parent / ("step_profile.py" if profiles else "step_timer.py"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = contenders(lora)
    seconds: dict[str, list[float]] = {"official train.py": [], **{name: [] for name in runs}}
    memory: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = write_sd15_architecture(folder / "sd15") if size == "sd15" else write_tiny(folder / "tiny-sd")
        # 'pickapic' in the name: the official script drops ties
        table = pick_a_pic_table(folder / "pickapic-64", 64, size=max(256, resolution), shard_rows=64)
        script = official_script(official, folder / "official")
        rlaif = [sys.executable, timer, None, "-m", "rlaif", "train", str(table), "--model", str(model),
                 *flags({**official_loss("sft"), "caption_dropout": 0.0}),  # the official loss (each DPO contender
                 # adds its beta), as the script runs here
                 "--batch-size", str(batch), "--mixed-precision", precision, "--workers", str(workers),
                 "--checkpoint-every", "0", "--val-fraction", "0", "--overwrite", "--out", str(folder / "rlaif")]
        env["RLAIF_CACHE"] = str(folder / "cache")

        def run(name: str, times: Path) -> None:
            if name == "official train.py":
                command = [sys.executable, timer, str(times), str(script), "--pretrained_model_name_or_path",
                           str(model), "--dataset_name", str(table), "--train_batch_size", str(batch),
                           "--max_train_steps", str(steps + 6), "--mixed_precision", precision, "--resolution",
                           str(resolution), "--dataloader_num_workers", str(workers), "--no_hflip",
                           "--learning_rate", "1e-5", "--checkpointing_steps", "1000000",
                           "--output_dir", str(folder / "official-out"), "--cache_dir", str(folder / "hf-cache")]
            else:
                command = [*rlaif[:2], str(times), *rlaif[3:], "--max-steps", str(steps + 6), *runs[name]]
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=script.parent)
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")

        # fills the latent cache, as a rerun would (every pair, when (steps + 6) x batch covers the 64)
        run("rlaif train", folder / "warm-times")
        if profiles:
            profiles.mkdir(parents=True, exist_ok=True)
            for name in seconds:
                report = profiles / f"{name.replace(' ', '_').replace(',', '')}.txt"
                run(name, report)
                if not report.exists():
                    raise SystemExit("--profile times steps 5 to 10: give --steps 4 or more")
                print(f"profiled {name}:", report.read_text().splitlines()[0], flush=True)
            return
        for repeat in range(repeats):  # the order rotates, so that a drifting machine favours no contender
            order = list(seconds)
            for name in order[repeat % len(order):] + order[:repeat % len(order)]:
                times = folder / f"{name.replace(' ', '').replace(',', '')}-{repeat}"
                run(name, times)
                seconds[name] += step_intervals(times)
                if (peak := Path(f"{times}.memory.json")).exists():
                    memory[name] = json.loads(peak.read_text())
                print(f"  ran {name} (repeat {repeat}): median {statistics.median(seconds[name]) * 1000:.1f} ms/step",
                      flush=True)
    step = {name: statistics.median(values) for name, values in seconds.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs"
    print(f"{size} ({resolution} px), 64-pair Pick-a-Pic table ({max(256, resolution)} px JPEGs), mixed precision "
          f"{precision}, batch {batch}, {workers} data workers, {steps} timed steps x {repeats} repeats "
          f"(median step), {device}")
    for name, value in step.items():
        peak = f", peak {memory[name]['peak_after_step_1'] / 2**30:.2f} GiB" if name in memory else ""
        print(f"  {name:26s}: {value * 1000:7.1f} ms/step  ({batch / value:6.2f} pairs/s{peak})")
    for name in ("rlaif train", "rlaif --no-cache"):
        print(f"(e) official s/step / {name} s/step (speed-up): {step['official train.py'] / step[name]:.3f}x")
    if lora:
        print(f"(b) DPO / SFT step time (LoRA): {step['rlaif LoRA DPO'] / step['rlaif LoRA SFT']:.2f}")
        print(f"(f) step time with / without --keep-unconditional 1 (LoRA DPO): "
              f"{step['rlaif LoRA DPO, anchored'] / step['rlaif LoRA DPO']:.2f}")
        if {"rlaif LoRA DPO", "rlaif LoRA SFT"} <= memory.keys():
            dpo, sft = memory["rlaif LoRA DPO"], memory["rlaif LoRA SFT"]
            print(f"(c) peak CUDA memory LoRA-DPO / LoRA-SFT: {dpo['peak_after_step_1'] / sft['peak_after_step_1']:.3f}"
                  f" (after step 1: {dpo['after_step_1'] / 2**30:.2f} vs {sft['after_step_1'] / 2**30:.2f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--probe-memory", choices=["sigmoid", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--official", type=Path, help="checkout of SalesforceAIResearch/DiffusionDPO: run (e)")
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny",
                        help="(e) on the tiny model at 64 px or SD1.5's architecture (random weights) at 512 px")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="(e) both sides")
    parser.add_argument("--workers", type=int, default=0, help="(e) data-loading processes, both sides")
    parser.add_argument("--lora", action="store_true", help="(e) also LoRA DPO, SFT and anchored: (b), (c), (f)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="(e) profile each contender's steps 5-10 (bench/step_profile.py) into DIR instead")
    args = parser.parse_args()
    quiet_libraries()
    if args.official:
        against_official(args.official, args.steps, args.batch_size, args.repeats, args.size, args.mixed_precision,
                         args.workers, args.lora, args.profile)
        return
    if args.probe_memory:
        probe_memory(args.pairs, args.probe_memory, args.steps, args.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pairs_path = make_pairs(folder / "run")
        pairs = list(PairTable(pairs_path))
        times: dict[str, list[float]] = {}
        timing: dict[str, float] = {}
        for repeat in range(args.repeats):  # alternate the contenders so that drift hits all of them
            official, breakdown = official_step_seconds(pairs, args.steps, args.batch_size)
            times.setdefault("official-style (full)", []).extend(official)
            for name, value in breakdown.items():
                timing[name] = timing.get(name, 0.0) + value
            for name, settings in {"rlaif (full, cache)": {"full": True},
                                   "rlaif (full, --no-cache)": {"full": True, "no_cache": True},
                                   "rlaif LoRA DPO": {}, "rlaif LoRA SFT": {"loss": "sft", "caption_dropout": 0.0},
                                   "rlaif LoRA DPO, anchored": {"keep_unconditional": 1.0, "caption_dropout": 0.0}
                                   }.items():
                out = folder / f"{name.replace(' ', '_')}-{repeat}"
                times.setdefault(name, []).extend(rlaif_step_seconds(
                    pairs_path, out, max_steps=args.steps, batch_size=args.batch_size, **settings))
        dpo, sft = memory(pairs_path, "sigmoid", args.steps, args.batch_size), \
            memory(pairs_path, "sft", args.steps, args.batch_size)
        losses = first_losses(pairs_path, pairs, args.batch_size, folder)
    step = {name: statistics.median(values) for name, values in times.items()}
    print(f"tiny (64 px), {len(pairs)} pairs, batch {args.batch_size} pairs, fp32, {args.steps} timed steps x "
          f"{args.repeats} repeats (median step), threads={torch.get_num_threads()}")
    for name, seconds in step.items():
        print(f"  {name:28s}: {args.batch_size / seconds:7.2f} pairs/s  ({seconds * 1000:.1f} ms/step)")
    total = sum(timing.values())
    print("  official-style breakdown: " + ", ".join(f"{k} {v / total:.1%}" for k, v in timing.items()))
    official = step["official-style (full)"]
    print(f"(a) rlaif full / official-style pairs/s   : {official / step['rlaif (full, cache)']:.3f}x"
          f"  (--no-cache: {official / step['rlaif (full, --no-cache)']:.3f}x)")
    print(f"(b) DPO / SFT step time (LoRA)            : {step['rlaif LoRA DPO'] / step['rlaif LoRA SFT']:.2f}")
    print(f"(f) step time with / without --keep-unconditional 1 (LoRA DPO): "
          f"{step['rlaif LoRA DPO, anchored'] / step['rlaif LoRA DPO']:.2f}")
    above = [(run["peak_kb"] - run["baseline_kb"]) / 1024 for run in (dpo, sft)]
    print(f"(c) peak memory LoRA-DPO / LoRA-SFT       : {dpo['peak_kb'] / sft['peak_kb']:.3f}  (peak RSS "
          f"{dpo['peak_kb'] / 1024:.0f} vs {sft['peak_kb'] / 1024:.0f} MiB; above the resident model after step 1: "
          f"{above[0]:.1f} vs {above[1]:.1f} MiB)")
    print("(d) first-step loss (ln 2 = 0.6931):")
    for name, value in losses.items():
        print(f"  {name:44s}: {value:.4f}{'' if abs(value - math.log(2)) < 1e-3 else '  (not ln 2)'}")


if __name__ == "__main__":
    main()
