"""Bad input, every command: one line naming the fault, exit code 2, and the file tree exactly as it was.

The CLI runs in this process (``rlaif.cli.main`` with its argv), as every case must fail before any model is
loaded; a case that got as far as sampling or training would show here as a slow test or a changed tree.
"""

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from rlaif.cli import main
from rlaif.tables import SAMPLES_SCHEMA

LOOP = """[loop]
model = "tiny"
prompts = "p.txt"
eval_prompts = "p.txt"
out = "loop-out"
{loop}
[label]
{label}
[train]
{train}
[eval]
{eval}
[sample]
{sample}
"""


def loop_config(tree: Path, name: str, **tables: str) -> Path:
    path = tree / f"{name}.toml"
    tables = {"label": "scorers = ['compressibility']", **tables}
    path.write_text(LOOP.format(**{k: tables.get(k, "") for k in ("loop", "label", "train", "eval", "sample")}))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A working folder holding what users point rlaif at: prompts, a pairs table, a train output, a file."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")  # the files of a train output
    (tmp_path / "lora" / "train.json").write_text('{"format": 2, "config": {}}')
    (tmp_path / "stopped" / "checkpoints" / "step_00000002").mkdir(parents=True)  # a run killed after step 2
    (tmp_path / "stopped" / "checkpoints" / "step_00000002" / "position.json").write_text('{"step": 2}')
    (tmp_path / "log-only").mkdir()  # `rlaif train` interrupted before its first checkpoint
    (tmp_path / "log-only" / "train_log.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "broken-lora").mkdir()  # records that rlaif did not write (an edit gone wrong, another tool)
    (tmp_path / "broken-lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "broken-lora" / "train.json").write_text('{"format": 2, "config": ')
    (tmp_path / "broken-samples").mkdir()
    pl.DataFrame(schema=SAMPLES_SCHEMA).write_parquet(tmp_path / "broken-samples" / "samples.parquet")
    (tmp_path / "broken-samples" / "run.json").write_text("[1, 2]")
    (tmp_path / "no-samples").mkdir()
    pl.DataFrame(schema=SAMPLES_SCHEMA).write_parquet(tmp_path / "no-samples" / "samples.parquet")
    (tmp_path / "one-each").mkdir()  # `rlaif sample --per-prompt 1`: two prompts, one candidate each
    row = {"candidate": 0, "seed": 0, "model": "tiny", "scheduler": "DDIMScheduler", "steps": 2, "guidance": 7.5,
           "width": 64, "height": 64, "negative_prompt": ""}
    pl.DataFrame([{**row, "sample_id": sid, "prompt_id": sid, "prompt": text, "image": f"images/{sid}/0000.png"}
                  for sid, text in (("p1", "a red circle"), ("p2", "a blue square"))],
                 schema=SAMPLES_SCHEMA).write_parquet(tmp_path / "one-each" / "samples.parquet")
    (tmp_path / "broken-loop").mkdir()
    (tmp_path / "broken-loop" / "loop.json").write_text("not json")
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    pl.DataFrame({"caption": ["a"], "jpg_0": [image.getvalue()], "jpg_1": [image.getvalue()],
                  "label_0": [1.0]}).write_parquet(tmp_path / "pap.parquet")
    pl.DataFrame({"caption": ["a", "b"], "jpg_0": [image.getvalue()] * 2, "jpg_1": [image.getvalue()] * 2,
                  "label_0": [1.0, 1.5]}).write_parquet(tmp_path / "bad-label.parquet")
    (tmp_path / "hfds").mkdir()  # the marker of a datasets.save_to_disk folder
    (tmp_path / "hfds" / "state.json").write_text("{}")
    for name, tables in {
        "unknown-scorer": {"label": "scorers = ['pickscroe']"},
        "bad-lr": {"train": "learning_rate = -1.0"},
        "same-seeds": {"sample": "seed = 1", "eval": "seed = 1"},
        "unknown-key": {"train": "learnin_rate = 1e-5"},
        "bad-option": {"label": "scorers = ['compressibility']\nscorer_options = ['compressibility.quality=3']"},
        "grid": {"eval": "grid = -1"},
        "lengths": {"sample": "max_sequence_length = 128"},
        "inverted": {"label": "scorers = ['compressibility']\ninvert = true"},
        "flow-weighting": {"train": "flow_weighting = 'mode'"},
        "own-train-log": {"eval": "train_log = 'lora/train_log.jsonl'"},
    }.items():
        loop_config(tmp_path, name, **tables)
    loop_config(tmp_path, "broken-loop")
    edit = (tmp_path / "broken-loop.toml").read_text().replace('out = "loop-out"', 'out = "broken-loop"')
    (tmp_path / "broken-loop.toml").write_text(edit)
    loop_config(tmp_path, "into-train")
    edit = (tmp_path / "into-train.toml").read_text().replace('out = "loop-out"', 'out = "lora"')
    (tmp_path / "into-train.toml").write_text(edit)
    (tmp_path / "unfinished").mkdir()  # `rlaif sample` killed before its table
    (tmp_path / "unfinished" / "run.json").write_text('{"generation": {}}')
    (tmp_path / "table.toml").write_text("[train]\nmax_steps = 3\n")  # a loop's layout, given to `rlaif train`
    (tmp_path / "utf16.toml").write_text("max_steps = 3\n", encoding="utf-16")  # saved by Windows Notepad
    (tmp_path / "empty_out.toml").write_text('pairs = "pairs.parquet"\nmodel = "tiny"\nout = ""\n')
    (tmp_path / "stage-value.toml").write_text('sample = 3\n[loop]\nmodel = "tiny"\nprompts = "p.txt"\n'
                                               'eval_prompts = "p.txt"\nout = "loop-out"\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "unknown-table.toml").write_text((tmp_path / "grid.toml").read_text() + "[trian]\nmax_steps = 3\n")
    (tmp_path / "semi.csv").write_text("caption;notes\na red circle;round\n")  # saved by a spreadsheet set to ';'
    (tmp_path / "p.csv").write_text("caption,notes\na red circle,round\n")
    loop_config(tmp_path, "model-typo")
    edit = (tmp_path / "model-typo.toml").read_text().replace('model = "tiny"', 'model = "tiny-xll"')
    (tmp_path / "model-typo.toml").write_text(edit)
    loop_config(tmp_path, "column", sample="prompt_column = 'captoin'")
    edit = (tmp_path / "column.toml").read_text().replace('prompts = "p.txt"', 'prompts = "p.csv"', 1)
    (tmp_path / "column.toml").write_text(edit)
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


CASES = [
    # sample
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--per-prompt", "0"], "--per-prompt must be at least 1"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--width", "100"], "--width must be a positive multiple of 8"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--guidance", "-1"], "--guidance must not be negative"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", ""], "Invalid value for '--out' / '-o': is empty (an unset shell "
     "variable?)"),  # typer reads "" as ".": it sampled into the working folder
    (["label", "", "-s", "compressibility"], "Invalid value for 'samples_dir': is empty"),
    (["eval", "-m", "tiny", "--tuned", "lora", "--pairs", "", "-s", "compressibility"],
     "Invalid value for '--pairs': is empty"),
    (["train", "", "--model", "tiny", "--out", "o"], "Invalid value for 'pairs': is empty"),  # "" read the
    (["sample", "-m", "", "-p", "p.txt", "-o", "s"], "Invalid value for '--model' / '-m': is empty"),  # working folder
    (["train", "--config", "empty_out.toml"], "empty_out.toml out: is empty (an unset shell variable?)"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--guidance", "nan"], "--guidance must be a finite number, got "
     "nan"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--max-prompts", "0"], "--max-prompts must be at least 1"),
    (["sample", "-m", "tiny", "-p", "missing.txt", "-o", "s"], "prompts file missing.txt does not exist"),
    (["sample", "-m", "tiny", "-p", "empty", "-o", "s"],
     "prompts file empty is a folder; give a file of prompts (.txt, .csv, .tsv, .jsonl, .parquet)"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "a-file"], "--out a-file is a file, not a folder"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "a-file/s"], "--out a-file/s: a-file is a file, not a folder"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--tuned", "empty"], "--tuned empty holds neither"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--tuned", "nowhere"], "--tuned nowhere does not exist"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--tuned", "stopped"], "--tuned stopped is an unfinished "
     "training run (checkpoints only), not finished weights: finish the run with the same `rlaif train` command "
     "and --resume latest"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--tuned", "stopped/checkpoints/step_00000002"],
     "--tuned stopped/checkpoints/step_00000002 is a training checkpoint, not finished weights"),
    (["sample", "-m", "./no-model", "-p", "p.txt", "-o", "s"], "model folder ./no-model does not exist"),
    (["sample", "-m", "tny", "-p", "p.txt", "-o", "s"], "model 'tny' is neither a folder, a hub id (ORG/NAME) nor a "
     "tiny model alias; did you mean 'tiny'?"),  # at once: the hub is not asked (and retried) for a misspelt alias
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--dtype", "fp64"], "--dtype 'fp64' is not one of"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--max-sequence-length", "600"],
     "--max-sequence-length must be between 1 and 512 tokens, got 600"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--max-sequence-length", "64"],
     "--max-sequence-length 64: only SD3 / FLUX.1 models have a T5 prompt length"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--device", "bogus"],
     "--device 'bogus' is not a device (e.g. cpu, cuda, cuda:1, mps)"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["tiny", "-o", "lora"], "--out lora is not empty; give a new or empty folder"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--flow-weighting", "mode"],
     "--flow-weighting mode: only SD3 / FLUX.1 models train on a noise path it weighs; for this model leave it out"),
    (["label", "empty", "-s", "compressibility", "--top-k", "3"],
     "--top-k applies to --strategy top-vs-bottom, not best-worst"),
    (["train", "one-each/samples.parquet", "-m", "tiny", "-o", "t"], "columns: sample_id, prompt_id, prompt, "
     "candidate, seed, image, model, scheduler, steps, guidance, width, height, negative_prompt; it is the samples "
     "table of `rlaif sample`: train on the pairs.parquet that `rlaif label` writes beside it"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--lora-targets", "to_q,to_vv"],
     "--lora-targets to_q,to_vv: 'to_vv' names no module of the model"),  # peft trained to_q alone
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--val-fraction", "0", "--val-every", "2"],
     "--val-every applies when pairs are held out; --val-fraction 0 holds out none"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--full", "--lora-rank", "8"],
     "--lora-rank applies to LoRA training; --full trains every weight of the UNet / transformer"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--min-noise", "0.8", "--max-noise", "0.5"],
     "--min-noise 0.8 and --max-noise 0.5: give 0 <= min < max <= 1 (fractions of the noise schedule)"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--negative-prompt", "blurry", "--guidance", "1"],
     "--negative-prompt needs classifier-free guidance, and at --guidance 1.0 (at most 1) the pipeline samples "
     "without it, ignoring the negative prompt"),
    (["sample", "-m", "tiny-flux", "-p", "p.txt", "-o", "s", "--negative-prompt", "blurry"], "--negative-prompt: "
     "FLUX.1 samples without classifier-free guidance, and its pipeline ignores a negative prompt (it needs true "
     "CFG, which rlaif does not run); leave it out"),  # it made the same images and recorded the prompt as used
    # one command's outputs per folder
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "lora"], "--out lora holds the output of `rlaif train` "
     "(train.json); give `rlaif sample` a folder of its own, e.g. lora/samples"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "model"], "--out model holds a diffusers model (model_index.json)"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "broken-samples"], "--out broken-samples holds the output of "
     "`rlaif sample` (run.json); give `rlaif train` a folder of its own, e.g. broken-samples/train"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "stopped"], "--out stopped holds the output of `rlaif train` "
     "(checkpoints)"),
    (["eval", "-m", "tiny", "--tuned", "lora", "-p", "p.txt", "-s", "compressibility", "-o", "broken-loop"],
     "--out broken-loop holds the output of `rlaif loop` (loop.json); give `rlaif eval` a folder of its own"),
    (["loop", "--config", "into-train.toml"], "into-train.toml [loop] out lora holds the output of `rlaif train` "
     "(train.json); give `rlaif loop` a folder of its own, e.g. lora/loop"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--steps", "abc"], "Invalid value for '--steps'"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--stpes", "4"], "No such option: --stpes"),
    # other tools' names for an option (a new user's trial: --lr got "Possible options: --full, --help, --loss")
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--num_images_per_prompt", "4"],
     "No such option: --num_images_per_prompt; rlaif sample calls it --per-prompt (see rlaif sample --help)"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--lr", "1e-4"],
     "No such option: --lr; rlaif train calls it --learning-rate (see rlaif train --help)"),
    (["label", "empty", "--lr", "2"], "No such option: --lr (Possible options: --help)"),  # label has none
    (["sample", "-m", "tiny", "-p", "p.txt"], "Missing option '--out' / '-o'. (see rlaif sample --help)"),
    (["sample", "-m", "tiny", "-p", "p.txt", "-o", "s", "--tuned", "broken-lora"],
     "broken-lora/train.json is not a record rlaif wrote (Expecting value: line 1 column 25 (char 24)); train the "
     "folder again"),
    # label
    (["label", "empty", "-s", "pickscroe"], "unknown scorer 'pickscroe'"),
    (["label", "empty", "-s", "compressibility", "--scorer-option", "compressibility.quality=3"],
     "--scorer-option compressibility.quality: scorer 'compressibility' takes no options"),
    (["label", "empty", "-s", "compressibility", "--scorer-option", "clip.arch=ViT-B-32"],
     "--scorer-option clip.arch: 'clip' is not one of the scorers (compressibility)"),
    (["label", "empty", "-s", "compressibility", "--scorer-option", "noequals"], "expected NAME.KEY=VALUE"),
    (["label", "empty", "-s", "compressibility", "--strategy", "best"], "--strategy 'best' is not one of"),
    (["label", "empty", "-s", "compressibility", "--min-margin", "-1"], "--min-margin must not be negative"),
    (["label", "empty", "-s", "compressibility", "--top-k", "0"], "--top-k must be at least 1"),
    (["label", "empty", "-s", "compressibility:-1"], "--scorer 'compressibility:-1': expected NAME or NAME:WEIGHT "
     "with a positive, finite weight"),
    (["label", "empty", "-s", "compressibility:1e400"], "--scorer 'compressibility:1e400': expected NAME or "
     "NAME:WEIGHT with a positive, finite weight"),  # inf: every label would be NaN > x, image 1 winning
    (["label", "empty", "-s", "compressibility", "-o", "a-file"], "--out a-file exists and is not a pairs table"),
    (["label", "empty", "-s", "compressibility", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    (["label", "empty", "-s", "compressibility"],
     "SAMPLES_DIR empty holds no samples.parquet; give the folder `rlaif sample` wrote"),
    (["label", "nowhere", "-s", "compressibility"], "SAMPLES_DIR nowhere does not exist"),
    (["label", "unfinished", "-s", "compressibility"], "SAMPLES_DIR unfinished holds an `rlaif sample` run that has "
     "not finished (no samples.parquet yet); rerun its `rlaif sample` command to finish it"),
    (["label", "lora", "-s", "compressibility"], "SAMPLES_DIR lora holds no samples.parquet but the output of "
     "`rlaif train` (train.json); give the folder `rlaif sample` wrote"),
    (["label", "one-each", "-s", "compressibility", "-o", "a-file/p.parquet"],
     "--out a-file/p.parquet: a-file is a file, not a folder"),  # the --out given, not its folder alone
    (["label", "pap.parquet", "-s", "compressibility"], "SAMPLES_DIR pap.parquet is a file; give the folder "
     "`rlaif sample` wrote (it holds samples.parquet), or --relabel TABLE for a Pick-a-Pic style pairs table"),
    (["label", "no-samples", "-s", "compressibility"], "no-samples/samples.parquet holds no samples"),
    (["label", "one-each", "-s", "compressibility"],
     "one-each: every prompt has one candidate, and a pair needs two; sample with --per-prompt 2 or more"),
    (["label", "broken-samples", "-s", "compressibility"],
     "broken-samples/run.json is not a record rlaif wrote (a JSON list); sample the folder again"),
    (["label", "-s", "compressibility", "--relabel", "pap.parquet", "-o", "a-file/x.parquet"],
     "a-file is a file, not a folder"),
    (["label", "-s", "compressibility", "--relabel", "bad-label.parquet"],  # as train refuses it, before scoring
     "pairs table bad-label.parquet, row 1: label_0 is 1.5, expected 1, 0 or 0.5"),
    (["label", "-s", "compressibility", "--relabel", "hfds"], "table hfds is a datasets.save_to_disk folder, and "
     "--relabel reads parquet: write it as parquet first"),
    # train
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--learning-rate", "-1"], "--learning-rate must be positive"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--keep-checkpoints", "-1"],
     "--keep-checkpoints must not be negative, got -1"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--config", "table.toml"], "table.toml: settings go at the "
     "top level of a --config file, not in a [train] table (the tables are `rlaif loop`'s layout)"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--beta", "0"], "--beta must be positive, got 0.0"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--loss", "ipo", "--dpo-positive", "1"],
     "--dpo-positive applies to --loss sigmoid and hinge, not ipo"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--dpo-positive", "-1"], "--dpo-positive must not be negative"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--keep-unconditional", "-1"],
     "--keep-unconditional must not be negative"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--loss", "sft", "--keep-unconditional", "1"],
     "--keep-unconditional needs a reference model, which --loss sft has not"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--loss", "ipo", "--keep-unconditional", "0.5"],
     "--keep-unconditional applies to --loss sigmoid and hinge, whose loss beta scales as it scales the anchor; "
     "--loss ipo's is not"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--loss", "sft", "--beta", "5000"],
     "--beta applies to the DPO losses; --loss sft fine-tunes on the winners alone"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--loss", "sft", "--val-every", "5"],
     "--val-every measures the held-out DPO implicit accuracy, which --loss sft (no reference) has not"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--max-grad-norm", "nan"],
     "--max-grad-norm must be a finite number, got nan"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--lora-rank", "16", "--full"], "--lora-rank "
     "applies to LoRA training; --full trains every weight of the UNet / transformer"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--config", "utf16.toml"], "config file utf16.toml cannot be "
     "read: 'utf-8' codec can't decode"),
    (["label", "one-each", "-s", "compressibility", "--min-margin", "inf"], "--min-margin must be a finite number"),
    (["label", "one-each", "-s", "compressibility", "--combine", "rank"], "--combine rank combines several scorers; "
     "with one, pairs come from its own scores"),
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--train-log",
      "lora/train_log.json"], "--train-log lora/train_log.json is not a file"),
    (["eval", "--base", "tiny", "--tuned", "lora/train.json", "-p", "p.txt", "-o", "e", "-s", "compressibility"],
     "--tuned lora/train.json is a file; give the folder that holds it, lora"),
    (["loop", "--config", "own-train-log.toml"], "own-train-log.toml [eval]: 'train_log' is set by the loop"),
    (["loop", "--config", "stage-value.toml"], "stage-value.toml: sample must be a [sample] table of settings, got 3"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--max-steps", "0"], "--max-steps must be at least 1"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--optimizer", "lion"], "--optimizer 'lion' is not one of"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--optimizer", "sgd", "--weight-decay", "0.1"],
     "--weight-decay applies to adamw and adafactor; --optimizer sgd is plain SGD"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--caption-dropout", "2"], "--caption-dropout must be"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--warmup-steps", "-5"], "--warmup-steps must not be negative"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--resolution", "100"], "--resolution must be a positive"),
    (["train", "missing.parquet", "-m", "tiny", "-o", "t"], "pairs table missing.parquet does not exist"),
    (["train", "one-each", "-m", "tiny", "-o", "t"], "pairs table one-each is a folder of `rlaif sample`; train on "
     "the pairs table `rlaif label` writes into it: one-each/pairs.parquet (run `rlaif label one-each --scorer NAME` "
     "first)"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--cache-dtype", "fp8"], "--cache-dtype 'fp8' is not one of"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--workers", "-1"], "--workers must not be negative"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--max-sequence-length", "0"],
     "--max-sequence-length must be between 1 and 512 tokens, got 0"),
    (["label", "-s", "compressibility", "--relabel", "pap.parquet", "--invert"], "--invert does not apply with "
     "--relabel, which labels the table's own pairs (a tie labelled 0.5); it applies to pairs made from a samples "
     "folder"),
    (["label", "-s", "compressibility", "--relabel", "pap.parquet", "--min-margin", "5"],
     "--min-margin does not apply with --relabel"),
    (["label", "-s", "compressibility", "--relabel", "pap.parquet", "--chunk-size", "0"],
     "--chunk-size must be at least 1"),
    (["label", "-s", "compressibility", "--relabel", "pap.parquet", "-o", "pap.parquet"],
     "--out pap.parquet is the table being relabelled"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "a-file"], "--out a-file is a file, not a folder"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--init", "empty"], "--init empty holds neither"),
    (["train", "pap.parquet", "-m", "tiny", "-o", "t", "--label-column", "ai_label_0"],
     "pairs table pap.parquet has no column 'ai_label_0' (--label-column)"),
    (["train", "pap.parquet", "-o", "t"], "missing --model"),
    # eval
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "pickscroe"],
     "unknown scorer 'pickscroe'"),
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--grid", "-1"],
     "--grid must not be negative, got -1"),
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility:2"],
     "--scorer 'compressibility:2': eval reports each scorer apart, so a weight means nothing there"),
    (["eval", "-m", "tiny", "--tuned", "lora", "--pairs", "pap.parquet", "-s", "compressibility:2"],
     "--scorer 'compressibility:2': eval reports each scorer apart"),
    (["eval", "--base", "tiny", "--tuned", "empty", "-p", "p.txt", "-o", "e", "-s", "compressibility"],
     "--tuned empty holds neither"),
    (["eval", "--base", "tiny", "--tuned", "log-only", "-p", "p.txt", "-o", "e", "-s", "compressibility"],
     "--tuned log-only is a training run stopped before its first checkpoint (a log, no weights): run the same "
     "`rlaif train` command again, which starts it over"),
    (["eval", "--base", "tiny", "--tuned", "one-each", "-p", "p.txt", "-o", "e", "-s", "compressibility"],
     "--tuned one-each holds the images of `rlaif sample`, not an `rlaif train` output: give the folder `rlaif "
     "train` wrote (its --out)"),
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "a-file", "-s", "compressibility"],
     "--out a-file is a file, not a folder"),
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility",
      "--scorer-option", "compressibility.x=1"], "scorer 'compressibility' takes no options"),
    (["eval", "--base", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility",
      "--per-prompt", "0"], "--per-prompt must be at least 1"),
    (["eval", "-m", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--held-out",
      "compressibility"], "scorer 'compressibility' is given twice (--scorer and --held-out must differ"),
    (["eval", "-m", "tiny", "--tuned", "lora", "--pairs", "pap.parquet", "-s", "compressibility", "--held-out",
      "incompressibility"], "--held-out does not apply with --pairs"),
    (["eval", "-m", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--label-column",
      "label_0"], "--label-column applies with --pairs only"),
    (["eval", "-m", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--max-pairs",
      "3"], "--max-pairs applies with --pairs only"),
    (["eval", "-m", "tiny", "--tuned", "lora", "--pairs", "pap.parquet", "-o", "e"],
     "--out does not apply with --pairs"),
    (["eval", "-m", "tiny", "--tuned", "lora", "--pairs", "pap.parquet", "--seed", "1"],
     "--seed does not apply with --pairs"),  # given, though at its default value
    (["eval", "-m", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--device",
      "bogus"], "--device 'bogus' is not a device"),
    (["eval", "-m", "tiny", "--tuned", "lora", "-p", "p.txt", "-o", "e", "-s", "compressibility", "--held-out",
      "pickscroe"], "unknown scorer 'pickscroe'"),
    # loop
    (["loop", "--config", "unknown-scorer.toml"], "unknown-scorer.toml [label]: unknown scorer 'pickscroe'"),
    (["loop", "--config", "bad-lr.toml"], "bad-lr.toml [train]: --learning-rate must be positive, got -1.0"),
    (["loop", "--config", "same-seeds.toml"], "round 1 would sample with seed 1, the [eval] seed"),
    (["loop", "--config", "unknown-key.toml"], "unknown-key.toml [train]: unknown setting 'learnin_rate'; did you mean "
     "'learning_rate'?"),
    (["loop", "--config", "bad-option.toml"], "scorer 'compressibility' takes no options"),
    (["loop", "--config", "grid.toml"], "grid.toml [eval]: --grid must not be negative"),
    (["loop", "--config", "inverted.toml", "--control"], "inverted.toml [label]: invert = true already swaps winners "
     "and losers, so --control would run the same experiment; drop one of them"),
    (["loop", "--config", "flow-weighting.toml"], "--flow-weighting mode: only SD3 / FLUX.1 models train on a noise "
     "path it weighs"),
    (["loop", "--config", "lengths.toml"], "max_sequence_length differs between stages ([sample] 128, [train] "
     "unset); give [sample] and [train] the same T5 prompt length (set both, even to the model's default)"),
    (["loop", "--config", "broken-loop.toml"], "broken-loop/loop.json is not a record rlaif wrote (Expecting "
     "value: line 1 column 1 (char 0)); restore it, or choose another --out"),
    (["loop", "--config", "missing.toml"], "config file missing.toml cannot be read"),
    (["loop", "--config", "unknown-table.toml"], "unknown-table.toml: unknown table 'trian'; settings go in [loop], "
     "[sample], [label], [train], [eval]"),
    (["loop", "--config", "model-typo.toml"], "model-typo.toml [loop] model: model 'tiny-xll' is neither a folder, a "
     "hub id (ORG/NAME) nor a tiny model alias; did you mean 'tiny-xl'?"),
    (["loop", "--config", "column.toml"], "column.toml [loop] prompts: prompts file "),
    (["loop", "--config", "column.toml"], "has no column 'captoin' (columns: caption, notes); choose one with [sample] "
     "prompt_column"),
    # mistakes of a new user's trial
    (["label", "one-each", "-s", "compressibility", "--scorer-option", "compressibility.x=1", "--scorer-option",
      "compressibility.x=2"], "--scorer-option compressibility.x is given twice ('1' and '2')"),
    (["label", "one-each", "-s", "rlaif.scorers.jpeg:compressibility:abc"],
     "--scorer 'rlaif.scorers.jpeg:compressibility:abc': the weight 'abc' is not a positive number"),
    (["train", "lora/pairs.parqet", "-m", "tiny", "-o", "t"], "pairs table lora/pairs.parqet does not exist"),
    (["train", "lora/pairs", "-m", "tiny", "-o", "t"], "pairs table lora/pairs does not exist (expected a parquet "
     "file, a folder of parquet shards, a datasets.save_to_disk folder, a hub dataset id or an fsspec URL); a folder "
     "lora is here, so it is read as a local path (for the hub dataset, give hf://datasets/lora/pairs)"),
    (["sample", "-m", "tiny", "-p", "semi.csv", "-o", "s"], "prompts file semi.csv reads as one column "
     "'caption;notes': its fields seem separated by ';', and rlaif reads a .csv's by commas"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(argv)[:60] for argv, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tree, argv, message, monkeypatch, capsys):
    monkeypatch.chdir(tree)
    monkeypatch.setattr(sys, "argv", ["rlaif", *argv])
    before = snapshot(tree)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and message in lines[0], stderr
    assert snapshot(tree) == before


def test_a_fault_in_the_cache_names_rlaif_cache(tmp_path, monkeypatch):
    """An unwritable cache gave only "Operation not permitted: /some/folder" (a new user's trial); a file fault under
    the cache now says that the folder is rlaif's cache, and how to move it."""
    from rlaif.cli import error_line

    monkeypatch.setenv("RLAIF_CACHE", str(tmp_path / "cache"))
    inside = PermissionError(1, "Operation not permitted", str(tmp_path / "cache" / "train" / "latents"))
    assert error_line(inside) == (f"Operation not permitted: {tmp_path / 'cache' / 'train' / 'latents'} (rlaif's "
                                  f"cache, {tmp_path / 'cache'}: set RLAIF_CACHE to a folder you can write)")
    outside = PermissionError(1, "Operation not permitted", str(tmp_path / "cached"))
    assert error_line(outside) == f"Operation not permitted: {tmp_path / 'cached'}"


def test_a_filesystem_fault_is_one_line(tree, monkeypatch, capsys):
    """An OSError from deep inside (a folder that turned read-only, a full disk) is one line, not a traceback.
    (Tests run as root, for whom no folder is read-only, so the fault is raised where the table is written.)"""
    from rlaif import label

    def fail(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(tree / "run" / "scores.parquet"))

    monkeypatch.setattr(label, "run_label", fail)
    monkeypatch.chdir(tree)
    monkeypatch.setattr(sys, "argv", ["rlaif", "label", "no-samples", "-s", "compressibility"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: Permission denied: {tree / 'run' / 'scores.parquet'}"


def test_training_that_stops_at_a_bad_image_leaves_no_output(tmp_path):
    """The table is read lazily, so an undecodable image stops training only when its pair comes up: the run
    stops with one line naming the row, before its first step, and leaves no output folder behind."""
    from conftest import run_cli

    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    pl.DataFrame({"caption": ["a", "b"], "jpg_0": [image.getvalue(), b"not an image"],
                  "jpg_1": [image.getvalue()] * 2, "label_0": [1.0, 1.0]}).write_parquet(tmp_path / "bad.parquet")
    result = run_cli("train", tmp_path / "bad.parquet", "-m", "tiny", "-o", tmp_path / "t", "--batch-size", 2,
                     "--max-steps", 2)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: image {tmp_path / 'bad.parquet'} row 1 jpg_0 cannot be read: "
                                          "corrupt, or not an image format that PIL reads"]
    assert not (tmp_path / "t").exists()
    # met after the first steps (a trial's run left a train_log.jsonl of one step behind): nothing is left either
    rows = [image.getvalue()] * 5 + [b"not an image"]
    pl.DataFrame({"caption": list("abcdef"), "jpg_0": rows, "jpg_1": [image.getvalue()] * 6,
                  "label_0": [1.0] * 6}).write_parquet(tmp_path / "late.parquet")
    late = run_cli("train", tmp_path / "late.parquet", "-m", "tiny", "-o", tmp_path / "u", "--batch-size", 1,
                   "--max-steps", 6, "--val-fraction", 0)
    assert late.returncode == 2 and "row 5 jpg_0 cannot be read" in late.stderr, late.stderr
    assert "training: 1/6 steps" in late.stderr  # at least one step was taken before it
    assert not (tmp_path / "u").exists()
    # met in a held-out pair, measured at step 2 (step 1 logged): the same
    from rlaif.train.pair_table import caption_hashes

    captions = [f"caption {i}" for i in range(20)]
    held = [c for c, h in zip(captions, caption_hashes(pa.array(captions)), strict=True) if h < 2**63]  # of 0.5
    pl.DataFrame({"caption": captions, "jpg_0": [b"not an image" if c == held[0] else image.getvalue()
                                                 for c in captions],
                  "jpg_1": [image.getvalue()] * 20, "label_0": [1.0] * 20}).write_parquet(tmp_path / "held.parquet")
    measured = run_cli("train", tmp_path / "held.parquet", "-m", "tiny", "-o", tmp_path / "v", "--batch-size", 1,
                       "--max-steps", 4, "--val-fraction", 0.5, "--val-every", 2)
    assert measured.returncode == 2 and "jpg_0 cannot be read" in measured.stderr, measured.stderr
    assert not (tmp_path / "v").exists()


def test_a_bad_image_met_only_by_the_second_process_leaves_no_output(tmp_path):
    """With two processes, a bad image met by one of them stops both together, the main one rolling the run back
    (the launcher kills every process as soon as one exits): here process 1 meets it at step 2, after step 1 was
    logged."""
    from conftest import cli_env

    from rlaif.train.pair_table import PairTable, pair_index

    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")

    def table(bad_row: int | None) -> Path:
        path = tmp_path / ("good.parquet" if bad_row is None else "bad.parquet")
        pl.DataFrame({"caption": [f"caption {i}" for i in range(8)],
                      "jpg_0": [b"not an image" if i == bad_row else image.getvalue() for i in range(8)],
                      "jpg_1": [image.getvalue()] * 8, "label_0": [1.0] * 8}).write_parquet(path)
        return path

    # one pair per process: step 1 trains positions 0 (process 0) and 1 (process 1), step 2 positions 2 and 3
    bad_row = pair_index(3, PairTable(table(None)), seed=0)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(32500 + os.getpid() % 1000), "-m", "rlaif", "train", str(table(bad_row)), "-m", "tiny", "-o",
         str(tmp_path / "t"), "--batch-size", "1", "--max-steps", "4", "--val-fraction", "0", "--workers", "0"],
        env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert f"row {bad_row} jpg_0 cannot be read" in run.stderr, run.stderr[-3000:]
    # every process stops together (none is left waiting in the step), the main one after rolling back
    assert "error: stopped: another process met bad input (its error names the row)" in run.stderr
    assert "training: 1/4 steps" in run.stderr  # step 1 was taken (and logged) before it
    assert not (tmp_path / "t").exists()
