"""Images/s of `rlaif label` against a per-image loop like the reference packages', one run, ratio printed.

Both sides score the same images with the HPSv2 scorer recipe (OpenCLIP architecture, HPS checkpoint
loaded from a Hugging Face cache, HPS preprocessing) on the same architecture with random weights. The
baseline follows ``hpsv2.score(images, prompt)`` (tgxs002/HPSv2 ``hpsv2/img_score.py``): one call per prompt
with its images, each call loading the checkpoint and building the tokenizer once, then one forward per image
with the prompt encoded again (the model object itself is created once, as in its ``initialize_model``). Until
2026-11-28 this baseline reloaded for every image, 8 times as often as ``hpsv2.score``. A second baseline keeps
everything loaded and scores one image per forward, to show what batching and encoding each prompt once are
worth on their own. A first untimed pass over one prompt warms both loops up.

    python bench/label.py [--arch ViT-B-32] [--per-prompt 8] [--batch-size 32]
"""

from __future__ import annotations

import os
import tempfile

HF_HOME = tempfile.mkdtemp(prefix="rlaif-bench-hf-")
os.environ.update(HF_HOME=HF_HOME, HF_HUB_OFFLINE="1", RLAIF_CACHE=os.path.join(HF_HOME, "rlaif"))

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import open_clip  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import hf_hub_download  # noqa: E402
from PIL import Image  # noqa: E402

from rlaif.cli import quiet_libraries  # noqa: E402
from rlaif.config import LabelConfig, SampleConfig  # noqa: E402
from rlaif.label import run_label  # noqa: E402
from rlaif.sample import run_sample  # noqa: E402
from rlaif.scorers.hps import CHECKPOINTS, REPO, HumanPreferenceScore  # noqa: E402

PROMPTS = "shapes"  # the bundled 8-scene prompt set, data/shapes.txt (rlaif.prompts.PROMPT_SETS)


def install_checkpoint(arch: str) -> None:
    """A random-weight HPS checkpoint for ``arch``, laid out as the hub repo's cached snapshot."""
    snapshot = Path(HF_HOME) / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model(arch, pretrained=None).state_dict()},
               snapshot / CHECKPOINTS["hpsv2"])


def per_image_reference(arch: str, paths: list[Path], prompts: list[str], reload: bool) -> list[float]:
    """One image and its prompt per forward; with ``reload``, checkpoint and tokenizer are loaded again for each
    prompt's run of images (one ``hpsv2.score`` call: ``prompts`` come prompt by prompt, as samples.parquet
    holds them)."""
    scorer = HumanPreferenceScore("hpsv2", "cpu", arch=arch)
    model, preprocess = scorer.model, scorer.preprocess
    tokenizer = scorer.tokenizer
    values, previous = [], None
    for path, prompt in zip(paths, prompts, strict=True):
        if reload and prompt != previous:  # a new hpsv2.score call
            previous = prompt
            checkpoint = torch.load(hf_hub_download(REPO, CHECKPOINTS["hpsv2"]), map_location="cpu",
                                    weights_only=True)
            model.load_state_dict(checkpoint["state_dict"])
            tokenizer = open_clip.get_tokenizer(arch)
        with torch.no_grad():
            image = preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
            image_features = model.encode_image(image, normalize=True)
            text_features = model.encode_text(tokenizer([prompt]), normalize=True)
            values.append(float((image_features @ text_features.T)[0, 0]))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", help="OpenCLIP architecture of the random-weight scorer")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    quiet_libraries()
    install_checkpoint(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run_sample(SampleConfig(model="tiny", prompts=PROMPTS, out=run, per_prompt=args.per_prompt, steps=4,
                                batch_size=32))
        samples = pl.read_parquet(run / "samples.parquet")
        paths, prompts = [run / p for p in samples["image"]], samples["prompt"].to_list()
        first = prompts.count(prompts[0])
        per_image_reference(args.arch, paths[:first], prompts[:first], reload=True)  # warm-up, untimed
        timings, results = {}, {}
        for name in ("reference (hpsv2.score per prompt)", "per-image, kept loaded", "rlaif label"):
            start = time.perf_counter()
            if name == "rlaif label":
                run_label(LabelConfig(samples_dir=run, scorers=["hpsv2"], batch_size=args.batch_size,
                                      scorer_options=[f"hpsv2.arch={args.arch}"]))
                scores = pl.read_parquet(run / "scores.parquet")
                results[name] = dict(zip(scores["sample_id"], scores["score"], strict=True))
            else:
                values = per_image_reference(args.arch, paths, prompts, reload=name.startswith("reference"))
                results[name] = dict(zip(samples["sample_id"], values, strict=True))
            timings[name] = time.perf_counter() - start
    count = len(paths)
    ours = results["rlaif label"]
    gap = max(abs(ours[k] - v) for r in results.values() for k, v in r.items())
    print(f"arch={args.arch} (random weights) images={count} prompts={samples['prompt'].n_unique()} "
          f"batch_size={args.batch_size} threads={torch.get_num_threads()}")
    for name, seconds in timings.items():
        print(f"{name:34s}: {count / seconds:7.2f} images/s")
    base = timings["reference (hpsv2.score per prompt)"]
    print(f"ratio vs reference        : {base / timings['rlaif label']:.2f}x")
    print(f"ratio vs kept-loaded loop : {timings['per-image, kept loaded'] / timings['rlaif label']:.2f}x")
    print(f"largest score difference between the three: {gap:.2e}")


if __name__ == "__main__":
    main()
