"""`rlaif loop` and `rlaif demo`: rounds chained through the previous model, resumable by stage, the demo's
effect on held-out prompts and seeds, and the control with winners and losers swapped."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import PROMPTS, cli_env, run_cli

from rlaif.errors import RlaifError
from rlaif.label import LABELLING_METADATA
from rlaif.loop import read_loop

SMALL_LOOP = """
[loop]
model = "{model}"
prompts = "train.txt"
eval_prompts = "held_out.txt"
out = "{out}"
rounds = 2

[sample]
per_prompt = 3
steps = 4
batch_size = 12

[label]
scorers = ["compressibility"]

[train]
max_steps = 3
batch_size = 2
learning_rate = 0.001

[eval]
per_prompt = 2
steps = 4
batch_size = 8
"""


def small_loop(folder: Path, model: str) -> tuple[Path, Path]:
    (folder / "train.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    (folder / "held_out.txt").write_text("\n".join(PROMPTS[4:6]) + "\n")
    (folder / "loop.toml").write_text(SMALL_LOOP.format(out=folder / "run", model=model))
    return folder / "loop.toml", folder / "run"


def test_a_loop_continued_by_an_rlaif_with_other_defaults_stops_before_the_next_round(tmp_path):
    """Round 1 trained before --keep-unconditional existed (its train.json as that rlaif wrote it): continuing the
    loop would train round 2 under another loss, so it stops, naming the change, before sampling round 2."""
    config, out = small_loop(tmp_path, "tiny")
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1"))
    assert run_cli("loop", "--config", config).returncode == 0
    info = json.loads((out / "round_1" / "train" / "train.json").read_text())
    del info["config"]["keep_unconditional"]
    info["config"]["caption_dropout"] = 0.2
    (out / "round_1" / "train" / "train.json").write_text(json.dumps(info))
    state = json.loads((out / "loop.json").read_text())
    state["settings"]["loop"]["rounds"] = 2  # as if the loop had been started for two rounds
    (out / "loop.json").write_text(json.dumps(state))
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    result = run_cli("loop", "--config", config)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "keep_unconditional 0.0 -> 1.0; caption_dropout 0.2 -> 0.0" in result.stderr
    assert not (out / "round_2").exists()
    # as the refusal says: the config gives them as they were, which is no change of the loop's settings
    assert "set them in the config's [train] table as they were (keep_unconditional = 0.0; caption_dropout = 0.2)" \
        in result.stderr
    config.write_text(config.read_text().replace("[train]\n", "[train]\nkeep_unconditional = 0.0\n"
                                                 "caption_dropout = 0.2\n"))
    goes_on = run_cli("loop", "--config", config)
    assert goes_on.returncode == 0, goes_on.stderr
    round_2 = json.loads((out / "round_2" / "train" / "train.json").read_text())["config"]
    assert (round_2["keep_unconditional"], round_2["caption_dropout"]) == (0.0, 0.2)


def test_a_loop_stopped_after_a_training_finished_keeps_it(tmp_path):
    """Killed after round 1's training wrote its train.json but before loop.json recorded it, the loop trained the
    round again (from its last checkpoint, or from step 0 without one); now it keeps the finished training."""
    config, out = small_loop(tmp_path, "tiny")
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1"))
    assert run_cli("loop", "--config", config).returncode == 0
    state = json.loads((out / "loop.json").read_text())
    state["done"] = ["1/sample", "1/label"]  # as the kill left it
    (out / "loop.json").write_text(json.dumps(state))
    trained = {path: path.stat().st_mtime_ns for path in (out / "round_1" / "train").rglob("*") if path.is_file()}
    result = run_cli("loop", "--config", config)
    assert result.returncode == 0, result.stderr
    assert f"note: {out / 'round_1' / 'train'}: round 1's training had finished; kept as it is" in result.stderr
    assert {path: path.stat().st_mtime_ns for path in trained} == trained
    assert json.loads((out / "loop.json").read_text())["done"] == ["1/sample", "1/label", "1/train", "1/eval"]
    info = json.loads((out / "round_1" / "train" / "train.json").read_text())
    info["config"]["beta"] /= 2  # a train.json of another run in the round's folder: trained again
    (out / "round_1" / "train" / "train.json").write_text(json.dumps(info))
    (out / "loop.json").write_text(json.dumps(state))
    again = run_cli("loop", "--config", config)
    assert again.returncode == 0 and "training had finished" not in again.stderr, again.stderr
    assert json.loads((out / "round_1" / "train" / "train.json").read_text())["config"]["beta"] == 2 * info["config"][
        "beta"]


def test_a_finished_loop_goes_on_for_more_rounds_and_keeps_the_ones_it_ran(tmp_path):
    config, out = small_loop(tmp_path, "tiny")
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1"))
    assert run_cli("loop", "--config", config).returncode == 0
    stamp = (out / "round_1" / "eval" / "eval.parquet").stat().st_mtime_ns
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    more = run_cli("loop", "--config", config)
    assert more.returncode == 0, more.stderr
    assert (out / "round_1" / "eval" / "eval.parquet").stat().st_mtime_ns == stamp  # round 1 stands
    assert pl.read_parquet(out / "rounds.parquet")["round"].to_list() == [1, 2]
    assert json.loads((out / "loop.json").read_text())["settings"]["loop"]["rounds"] == 2
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1"))
    fewer = run_cli("loop", "--config", config)
    assert fewer.returncode == 2 and "([loop] rounds 2 -> 1)" in fewer.stderr


def test_a_loop_refuses_edited_prompt_files_and_goes_on_moved_or_with_other_batch_sizes(tmp_path):
    """loop.json holds what the prompt files held: an eval prompt file edited between rounds would measure the
    rounds on other prompts without a word (a new user's trial: round 1 on the old prompts, round 2 on new ones,
    eval_base resampled). A loop folder moved elsewhere, or a sampling batch size lowered after running out of
    memory, changes no number and goes on. A loop.json from before the prompt files were recorded goes on."""
    from rlaif.loop import _state

    config, out = small_loop(tmp_path, "tiny")
    out.mkdir()
    (out / "loop.json").write_text(json.dumps({"settings": read_loop(config).source, "done": ["1/sample"],
                                               "rounds": {}}))
    shutil.copytree(out, tmp_path / "moved")
    assert _state(read_loop(config, out=tmp_path / "moved"))["done"] == ["1/sample"]
    config.write_text(config.read_text().replace("batch_size = 12", "batch_size = 4"))
    assert _state(read_loop(config))["settings"]["sample"]["batch_size"] == 4
    old = json.loads((out / "loop.json").read_text())
    del old["settings"]["prompt files (sha256)"]
    (tmp_path / "older").mkdir()
    (tmp_path / "older" / "loop.json").write_text(json.dumps(old))
    assert _state(read_loop(config, out=tmp_path / "older"))["done"] == ["1/sample"]
    (tmp_path / "train.txt").write_text(PROMPTS[0] + "\n")  # round 1 sampled others: refused at once
    with pytest.raises(RlaifError, match=r"other settings \(\[prompt files \(sha256\)\] prompts '[0-9a-f]{16}' "
                                         r"-> '[0-9a-f]{16}'\)"):
        _state(read_loop(config))
    (tmp_path / "train.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    state = json.loads((out / "loop.json").read_text())  # round 1 measured: its eval prompts may change no more
    (out / "loop.json").write_text(json.dumps({**state, "done": ["1/sample", "1/label", "1/train", "1/eval"]}))
    (tmp_path / "held_out.txt").write_text("a large green square on a white background\n" + PROMPTS[5] + "\n")
    with pytest.raises(RlaifError, match=r"other settings \(\[prompt files \(sha256\)\] eval_prompts '[0-9a-f]{16}' "
                                         r"-> '[0-9a-f]{16}'\)"):
        _state(read_loop(config))
    config.write_text(config.read_text().replace("steps = 4", "steps = 5", 1))
    with pytest.raises(RlaifError, match=r"\[sample\] steps 4 -> 5"):  # a setting that changes numbers
        _state(read_loop(config))


def test_a_loop_goes_on_with_its_prompt_files_named_by_other_paths_and_refuses_other_content(tmp_path, monkeypatch):
    """A prompt file is known by what it holds: the config called from another folder (its relative paths then read
    otherwise), an absolute path, or the config moved with its prompts name the same prompts and go on, even once a
    round is evaluated; a file of other content under the same name is refused."""
    from rlaif.loop import _state

    config, out = small_loop(tmp_path, "tiny")
    monkeypatch.chdir(tmp_path)
    out.mkdir()
    begun = read_loop(Path("loop.toml"))
    assert (begun.loop.prompts, begun.loop.eval_prompts) == ("train.txt", "held_out.txt")  # as called
    done = ["1/sample", "1/label", "1/train", "1/eval"]
    (out / "loop.json").write_text(json.dumps({"settings": begun.source, "done": done, "rounds": {}}))
    assert _state(read_loop(config))["done"] == done  # called as /.../loop.toml
    text = config.read_text()
    config.write_text(text.replace('"train.txt"', f'"{tmp_path / "train.txt"}"').replace('"held_out.txt"',
                                                                                        '"./held_out.txt"'))
    assert _state(read_loop(Path("loop.toml")))["done"] == done
    moved = tmp_path / "configs"
    moved.mkdir()
    for name in ("train.txt", "held_out.txt"):
        (tmp_path / name).rename(moved / name)
    (moved / "loop.toml").write_text(text)
    assert _state(read_loop(moved / "loop.toml"))["settings"]["loop"]["prompts"] == str(moved / "train.txt")
    (moved / "train.txt").write_text(PROMPTS[0] + "\n")
    with pytest.raises(RlaifError, match=r"other settings \(\[prompt files \(sha256\)\] prompts '[0-9a-f]{16}' "
                                         r"-> '[0-9a-f]{16}'\)"):
        _state(read_loop(moved / "loop.toml"))


def test_a_prompt_file_of_the_same_bytes_in_another_format_is_another_file(tmp_path):
    """A .tsv and a .csv of the same bytes may hold other prompts (a .csv's quotes are a .tsv's text): known by their
    content, they are still told apart by their extension (a review)."""
    from rlaif.loop import _state

    config, out = small_loop(tmp_path, "tiny")
    table = "prompt\n" + "\n".join(PROMPTS[:4]) + "\n"
    for name in ("train.tsv", "train.csv"):
        (tmp_path / name).write_text(table)
    text = config.read_text()
    config.write_text(text.replace('"train.txt"', '"train.tsv"'))
    out.mkdir()
    (out / "loop.json").write_text(json.dumps({"settings": read_loop(config).source, "done": ["1/sample"],
                                               "rounds": {}}))
    config.write_text(text.replace('"train.txt"', '"train.csv"'))
    with pytest.raises(RlaifError, match=r"\[loop\] prompts '.*train.tsv' -> '.*train.csv'"):
        _state(read_loop(config))


def test_a_loop_checks_its_prompt_files_first_and_its_eval_may_be_mended_until_a_round_is_evaluated(tmp_path):
    """A missing eval_prompts file (or one without the [eval] prompt_column) is refused before round 1 samples, not
    after it trains (a review); until a round is evaluated, [eval] and its prompts may still change, and a device
    or the report's grid may change at any time."""
    from rlaif.loop import _state

    config, out = small_loop(tmp_path, "tiny")
    (tmp_path / "held_out.txt").rename(tmp_path / "held.txt")
    refused = run_cli("loop", "--config", config)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and not out.exists()
    assert refused.stderr.startswith(f"error: {config} [loop] eval_prompts: prompts file {tmp_path / 'held_out.txt'} "
                                     "does not exist")
    (tmp_path / "held.txt").rename(tmp_path / "held_out.txt")
    out.mkdir()
    (out / "loop.json").write_text(json.dumps({"settings": read_loop(config).source, "done": ["1/sample", "1/label"],
                                               "rounds": {}}))
    config.write_text(config.read_text().replace("per_prompt = 2", "per_prompt = 3").replace(
        "[sample]", "[sample]\ndevice = 'cpu'"))
    (tmp_path / "held_out.txt").write_text(PROMPTS[6] + "\n")
    assert _state(read_loop(config))["settings"]["eval"]["per_prompt"] == 3  # nothing evaluated yet: mended
    state = json.loads((out / "loop.json").read_text())
    (out / "loop.json").write_text(json.dumps({**state, "done": [*state["done"], "1/train", "1/eval"]}))
    with pytest.raises(RlaifError, match=r"\[eval\] per_prompt 2 -> 3"):  # round 1 was measured otherwise
        _state(read_loop(config))


def test_a_loop_whose_base_model_changed_between_rounds_is_refused(tmp_path):
    """Every round samples, trains on and is evaluated against one base: its weights are recorded, and a model
    folder rewritten between rounds (or another hub revision) is refused before round 2 mixes two bases in one
    run (a review). A loop.json from before the weights were recorded goes on, and records them."""
    from rlaif.loop import MODEL_WEIGHTS, _state
    from rlaif.tiny import TINY_SD_DIR

    shutil.copytree(TINY_SD_DIR, tmp_path / "model")
    config, out = small_loop(tmp_path, str(tmp_path / "model"))
    out.mkdir()
    source = read_loop(config).source
    assert set(source[MODEL_WEIGHTS]) == {"model"}
    (out / "loop.json").write_text(json.dumps({"settings": {k: v for k, v in source.items() if k != MODEL_WEIGHTS},
                                               "done": ["1/sample"], "rounds": {}}))
    assert _state(read_loop(config))["settings"][MODEL_WEIGHTS] == source[MODEL_WEIGHTS]  # an older loop.json
    (out / "loop.json").write_text(json.dumps({"settings": source, "done": ["1/sample"], "rounds": {}}))
    assert _state(read_loop(config))["done"] == ["1/sample"]
    scheduler = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("}", ', "note": "edited"}'))
    with pytest.raises(RlaifError, match=f"{out} holds a loop run whose base model {tmp_path / 'model'} had other "
                                         "weights"):
        _state(read_loop(config))
    # a hub id is known by the revision each round's sampling loaded (none before round 1 downloads it): the first
    # round's is recorded, and a later round drawn from another revision is refused before it trains
    from rlaif.loop import _same_base

    plan = read_loop(config)
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "run.json").write_text(json.dumps({"generation": {"model_weights": "org/model@aaaa"}}))
    state = {"settings": {}, "done": []}
    _same_base(state, samples, plan.loop)
    recorded = state["settings"][MODEL_WEIGHTS]
    _same_base(state, samples, plan.loop)
    assert state["settings"][MODEL_WEIGHTS] == recorded
    (samples / "run.json").write_text(json.dumps({"generation": {"model_weights": "org/model@bbbb"}}))
    with pytest.raises(RlaifError, match="had other weights"):
        _same_base(state, samples, plan.loop)
    del state["settings"][MODEL_WEIGHTS]  # kept by _state when a resume cannot know the weights (an emptied cache)
    (out / "loop.json").write_text(json.dumps({"settings": {**source, MODEL_WEIGHTS: recorded}, "done": [],
                                               "rounds": {}}))
    unknown_now = read_loop(config)
    del unknown_now.source[MODEL_WEIGHTS]
    assert _state(unknown_now)["settings"][MODEL_WEIGHTS] == recorded


def test_a_loop_goes_on_when_its_model_folder_changes_but_for_the_files_that_make_the_model(tmp_path):
    """The base model is known by the files its pipeline loads (model_index.json and its components' folders): a
    README or a licence beside them may change between rounds (they refused the loop as other weights). A loop.json
    and samples of an older rlaif, which counted every file, go on; a changed component is still refused."""
    import hashlib

    from rlaif.files import folder_identity
    from rlaif.loop import MODEL_WEIGHTS, _same_base, _state
    from rlaif.tiny import TINY_SD_DIR

    model = tmp_path / "model"
    shutil.copytree(TINY_SD_DIR, model)
    (model / "README.md").write_text("# tiny\n")
    config, out = small_loop(tmp_path, str(model))
    out.mkdir()
    source = read_loop(config).source
    samples = out / "round_1" / "samples"
    samples.mkdir(parents=True)
    (samples / "run.json").write_text(json.dumps({"generation": {"model_weights": folder_identity(model)}}))
    older = {k: v for k, v in source.items() if k != MODEL_WEIGHTS}  # as an older rlaif recorded the base
    older["model weights (identity)"] = {"model": hashlib.sha256(folder_identity(model).encode()).hexdigest()[:16]}
    (model / "README.md").write_text("# tiny, edited\n")
    (model / "LICENSE").write_text("MIT\n")
    for settings in (source, older):
        (out / "loop.json").write_text(json.dumps({"settings": settings, "done": ["1/sample"], "rounds": {}}))
        state = _state(read_loop(config))
        _same_base(state, samples, read_loop(config).loop)  # round 1's samples, as the loop checks them
        assert state["done"] == ["1/sample"] and state["settings"][MODEL_WEIGHTS] == source[MODEL_WEIGHTS]
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("}", ', "note": "edited"}'))
    with pytest.raises(RlaifError, match="had other weights"):  # round 1 was drawn from the model before
        _same_base({"settings": read_loop(config).source}, samples, read_loop(config).loop)
    (out / "loop.json").write_text(json.dumps({"settings": source, "done": ["1/sample"], "rounds": {}}))
    with pytest.raises(RlaifError, match="had other weights"):
        _state(read_loop(config))


def test_a_loop_begun_with_settings_now_refused_that_changed_nothing_goes_on(tmp_path):
    """A loop begun before a combine rule for one scorer, a beta with --loss sft and an [eval] train_log were
    refused: kept in the config they are refused now, and dropped from it they differed from loop.json, so the
    loop could go on neither way (found by a review). loop.json's record of them is read without them."""
    from rlaif.loop import _state

    config, out = small_loop(tmp_path, "tiny")
    config.write_text(config.read_text().replace("max_steps = 3", "max_steps = 3\nloss = 'sft'"))
    out.mkdir()
    old = read_loop(config).source
    old["label"]["combine"], old["train"]["beta"], old["eval"]["train_log"] = "zscore", 5000.0, "log.jsonl"
    (out / "loop.json").write_text(json.dumps({"settings": old, "done": ["1/sample"], "rounds": {}}))
    assert _state(read_loop(config))["done"] == ["1/sample"]
    config.write_text(config.read_text().replace("loss = 'sft'", "loss = 'sigmoid'"))
    with pytest.raises(RlaifError, match=r"other settings \(\[train\] loss 'sft' -> 'sigmoid'\)"):
        _state(read_loop(config))  # what counted is still compared


def test_rounds_sample_and_evaluate_at_the_guidance_of_the_first_round(tmp_path):
    """A loop begun when an unset guidance meant another value (7.5 for every model before 2026-11-28; here
    recorded as 6.0) goes on at that value: its rounds stay comparable, and the base model's samples are kept."""
    config, out = small_loop(tmp_path, "tiny")
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1"))
    assert run_cli("loop", "--config", config).returncode == 0
    for folder in (out / "round_1" / "samples", out / "eval_base"):
        record = json.loads((folder / "run.json").read_text())
        record["generation"]["guidance"] = 6.0
        (folder / "run.json").write_text(json.dumps(record))
    stamps = {png: png.stat().st_mtime_ns for png in (out / "eval_base").rglob("*.png")}
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    more = run_cli("loop", "--config", config)
    assert more.returncode == 0, more.stderr
    for folder in (out / "round_2" / "samples", out / "round_2" / "eval" / "tuned", out / "eval_base"):
        assert json.loads((folder / "run.json").read_text())["generation"]["guidance"] == 6.0, folder
    assert stamps and {png: png.stat().st_mtime_ns for png in (out / "eval_base").rglob("*.png")} == stamps


def test_later_rounds_keep_the_stage_defaults_the_loop_began_with(tmp_path):
    """A loop begun when rlaif's default [sample] per_prompt was 2 and [label] min_margin 1.0 (here written into its
    loop.json) goes on with them after an upgrade: round 2 samples 2 images a prompt, pairs them as round 1 did,
    and says so; settings the config gives stay as given."""
    config, out = small_loop(tmp_path, "tiny")
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 1").replace("per_prompt = 3\n", ""))
    assert run_cli("loop", "--config", config).returncode == 0
    assert json.loads((out / "round_1" / "samples" / "run.json").read_text())["settings"]["per_prompt"] == 4
    state = json.loads((out / "loop.json").read_text())
    defaults = state["settings"]["defaults (as the loop began)"]
    assert defaults["sample"]["per_prompt"] == 4 and defaults["eval"]["per_prompt"] == 4
    defaults["sample"]["per_prompt"], defaults["label"]["min_margin"] = 2, 1e-9
    defaults["eval"]["per_prompt"] = 3  # given by the config (2): the config's value stands
    (out / "loop.json").write_text(json.dumps(state))
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    more = run_cli("loop", "--config", config)
    assert more.returncode == 0, more.stderr
    assert "[sample] per_prompt 2 (now 4); [label] min_margin 1e-09 (now 0.0)" in more.stdout + more.stderr
    record = json.loads((out / "round_2" / "samples" / "run.json").read_text())["settings"]
    assert record["per_prompt"] == 2
    labelling = pq.read_schema(out / "round_2" / "samples" / "pairs.parquet").metadata[LABELLING_METADATA.encode()]
    assert json.loads(labelling)["min_margin"] == 1e-9
    assert json.loads((out / "round_2" / "eval" / "tuned" / "run.json").read_text())["settings"]["per_prompt"] == 2
    assert json.loads((out / "loop.json").read_text())["settings"]["defaults (as the loop began)"] == defaults


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])  # a UNet model, and a flow transformer (Flow-DPO)
def test_rounds_chain_and_a_killed_loop_resumes(tmp_path, model):
    config, out = small_loop(tmp_path, model)
    process = subprocess.Popen([sys.executable, "-m", "rlaif", "loop", "--config", str(config)], env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (out / "round_1" / "train" / "train_log.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    done_before = json.loads((out / "loop.json").read_text())["done"]
    assert done_before == ["1/sample", "1/label"]
    result = run_cli("loop", "--config", config)
    assert result.returncode == 0, result.stderr
    assert f"note: {out}: resuming the loop; 1/sample, 1/label done before (kept as they are); going on from " \
        "1/train" in result.stderr
    assert re.search(r"^round 2 training: 3/3 steps .*, loss \d\.\d{4}", result.stderr, re.MULTILINE)  # as train
    assert re.search(r"^round 2 sampling: \d+/\d+ images ", result.stderr, re.MULTILINE)  # shows them
    state = json.loads((out / "loop.json").read_text())
    assert state["done"] == [f"{r}/{s}" for r in (1, 2) for s in ("sample", "label", "train", "eval")]
    # round 2 samples from, starts from and is referenced to round 1's model
    round_1 = str((out / "round_1" / "train").resolve())
    from rlaif.train.outputs import weights_identity

    sampled = json.loads((out / "round_2" / "samples" / "run.json").read_text())
    assert sampled["settings"]["tuned"] == round_1 and sampled["generation"]["tuned"] == weights_identity(round_1)
    assert json.loads((out / "round_2" / "train" / "train.json").read_text())["config"]["init"] == round_1
    assert json.loads((out / "round_1" / "samples" / "run.json").read_text())["generation"]["tuned"] is None
    table = pl.read_parquet(out / "round_2" / "eval" / "eval.parquet")
    assert table["n"].to_list() == [4] and state["rounds"]["2"][0]["win_rate"] == table["win_rate"][0]
    rounds = pl.read_parquet(out / "rounds.parquet")
    assert rounds["round"].to_list() == [1, 2] and rounds.drop("round")[1].to_dicts() == table.to_dicts()
    printed = [line.split()[:4] for line in result.stdout.splitlines()[1:3]]
    assert printed == [[str(r["round"]), "compressibility", "optimised", str(r["prompts"])]
                       for r in rounds.to_dicts()]
    assert (out / "report.html").read_text() == (out / "round_2" / "eval" / "report.html").read_text()
    stamp = (out / "round_2" / "eval" / "eval.parquet").stat().st_mtime_ns
    again = run_cli("loop", "--config", config)  # everything done: nothing is redone
    assert again.returncode == 0 and (out / "round_2" / "eval" / "eval.parquet").stat().st_mtime_ns == stamp
    assert "every stage of the loop is done; writing rounds.parquet and report.html again" in again.stderr
    config.write_text(config.read_text().replace("max_steps = 3", "max_steps = 4"))
    changed = run_cli("loop", "--config", config)
    assert changed.returncode == 2 and "holds a loop run with other settings ([train] max_steps 3 -> 4); " \
        "rerun with the same config" in changed.stderr


LOOP_TABLE = "[loop]\nmodel='tiny'\nprompts='a'\neval_prompts='b'\nout='o'\n"


@pytest.mark.parametrize(("text", "message"), [
    (LOOP_TABLE + "[train]\nmodel = 'x'\n", "[train]: 'model' is set by the loop, not per stage"),
    ("[sample]\nper_prompt = 2\n", "[loop]: missing model, prompts, eval_prompts, out"),
    (LOOP_TABLE + "[label]\nstrategy='all-pairs'\n", "[label]: missing scorers"),
    (LOOP_TABLE + "[train]\nmax_step = 3\n", "[train]: unknown setting 'max_step'; did you mean 'max_steps'?"),
    (LOOP_TABLE + "[train]\nfrobnicate = 3\n",
     "[train]: unknown setting 'frobnicate'; known: streaming, label_column, full,"),
    (LOOP_TABLE + "[label]\nscorers=['compressibility']\n[eval]\nper_prompt='4'\n",
     "[eval] per_prompt: expected int, got '4'"),
    (LOOP_TABLE.replace("'tiny'", "'tiny-flux'")
     + "[label]\nscorers=['compressibility']\n[train]\nkeep_unconditional=1\n",
     "[train]: FLUX.1 samples without classifier-free guidance"),
    (LOOP_TABLE + "[label]\nscorers=['compressibility']\n[sample]\nnegative_prompt='blurry'\n",
     "[sample] negative_prompt replaces the empty caption in guidance, but the unconditional anchor (on by default)"),
    (LOOP_TABLE + "[label]\nscorers=['compressibility']\n[eval]\nnegative_prompt='blurry'\n",
     "[eval] negative_prompt replaces the empty caption"),
    (LOOP_TABLE.replace("'tiny'", "'tiny-flux'")
     + "[label]\nscorers=['compressibility']\n[eval]\nnegative_prompt='x'\n",
     "[eval] negative_prompt: FLUX.1 samples without classifier-free guidance, and its pipeline ignores a negative "
     "prompt"),  # before the rounds' sampling and training, not after them
    (LOOP_TABLE + "[label]\nscorers=['compressibility']\n[eval]\nscheduler='NoSuchScheduler'\n",
     "[eval]: unknown --scheduler 'NoSuchScheduler'; this model accepts: "),  # before the rounds, not after them
    (LOOP_TABLE.replace("'tiny'", "'tiny-sd3'") + "[label]\nscorers=['compressibility']\n[eval]\n"
     "scheduler='DDIMScheduler'\n",
     "[eval]: unknown --scheduler 'DDIMScheduler'; this model accepts: FlowMatchEulerDiscreteScheduler"),
    (LOOP_TABLE + "[label]\nscorers=['compressibility']\n[eval]\nscorers=['incompressibility']\n"
     "held_out=['compressibility']\n",
     "[eval]: held_out 'compressibility' is a [label] scorer, which the loop trains on"),  # reported as held out
    (LOOP_TABLE + "[label]\nscorers=['compressibility']\n[eval]\nscorers=['incompressibility']\n",
     "[eval]: scorers 'incompressibility' is not a [label] scorer, so the loop does not train on it"),
])
def test_bad_loop_configs(tmp_path, text, message):
    (tmp_path / "loop.toml").write_text(text)
    result = run_cli("loop", "--config", tmp_path / "loop.toml")
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
    if "known:" in message:  # what the loop sets is not offered
        assert not {"pairs", "model", "out", "resume"} & set(result.stderr.split("known: ")[1].strip().split(", "))


def test_a_loop_refuses_image_sides_its_model_cannot_take_before_round_1(tmp_path):
    """[eval] (and [sample]) width and height are checked against the model's VAE config before round 1 samples
    (nothing is loaded): an [eval] width that SD3's transformer cannot take was refused only after round 1 trained."""
    from rlaif.tiny import TINY_SD3_DIR

    model = tmp_path / "model"
    shutil.copytree(TINY_SD3_DIR, model)
    vae = json.loads((model / "vae" / "config.json").read_text())
    vae["block_out_channels"] = [16, 32, 32, 32]  # a scale factor of 8, as SD3.5's: sides in multiples of 16
    (model / "vae" / "config.json").write_text(json.dumps(vae))
    config, out = small_loop(tmp_path, str(model))
    text = config.read_text()  # [eval] is its last table
    config.write_text(text + "width = 24\n")
    with pytest.raises(RlaifError, match=rf"^{re.escape(str(config))} \[eval\]: --width 24: this model needs a "
                                         "multiple of 16 pixels$"):
        read_loop(config)
    config.write_text(text.replace("[sample]", "[sample]\nheight = 40") + "width = 32\n")
    with pytest.raises(RlaifError, match=r"\[sample\]: --height 40: this model needs a multiple of 16 pixels"):
        read_loop(config)
    config.write_text(text + "width = 32\nheight = 48\n")
    assert read_loop(config).stages["eval"]["width"] == 32 and not out.exists()


def test_a_negative_prompt_passes_once_the_anchor_is_chosen(tmp_path):
    """With keep_unconditional set in [train], the negative prompt is the user's informed choice: the loop gets
    past its checks (and stops at the next problem, the missing prompts file 'a')."""
    chosen = (LOOP_TABLE.replace("out='o'", f"out='{tmp_path / 'o'}'")
              + "[label]\nscorers=['compressibility']\n[sample]\nnegative_prompt='blurry'\n")
    for keep in (0, 1):
        (tmp_path / "loop.toml").write_text(chosen + f"[train]\nkeep_unconditional={keep}\n")
        result = run_cli("loop", "--config", tmp_path / "loop.toml")
        assert result.returncode == 2 and "replaces the empty caption" not in result.stderr
        assert result.stderr.endswith("/a does not exist\n") and not (tmp_path / "o").exists()


def test_a_loop_begun_before_the_anchor_with_a_negative_prompt_is_finished_by_its_own_rlaif(tmp_path):
    """Its settings cannot change (loop.json), so the advice is not to set keep_unconditional but a new out."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "loop.json").write_text("{}")
    (tmp_path / "loop.toml").write_text(LOOP_TABLE.replace("out='o'", f"out='{out}'")
                                        + "[label]\nscorers=['compressibility']\n[sample]\nnegative_prompt='x'\n")
    result = run_cli("loop", "--config", tmp_path / "loop.toml")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "finish the loop with the rlaif that started it, or start it again in a new out" in result.stderr


def demo(out, model, *args):
    result = run_cli("demo", "--out", out, "--model", model, *args)
    assert result.returncode == 0, result.stderr
    (row,) = pl.read_parquet(out / "round_1" / "eval" / "eval.parquet").iter_rows(named=True)
    assert row["scorer"] == "compressibility" and row["n"] == 48 * 4  # held-out prompts x held-out seeds
    assert (out / "report.html").exists()
    return row


@pytest.fixture(scope="module", params=["tiny", "tiny-sd3"])  # Diffusion-DPO on a UNet; Flow-DPO on an MMDiT
def demo_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"demo-{request.param}") / "demo"
    return demo(out, request.param), out, request.param


def test_demo_raises_the_reward_on_held_out_prompts(demo_run):
    row, _, _ = demo_run
    assert row["win_rate"] >= 0.65 and row["ci_low"] > 0.5, row
    assert row["delta_low"] > 0 and row["p_value"] < 0.05, row


def test_control_with_swapped_labels_lowers_the_reward(demo_run, tmp_path):
    # The control samples the demo's images (same model, prompts and seeds) before it labels them the other way
    # round: it starts from copies of them, so only its labels, training and tuned samples are new.
    _, demo_out, model = demo_run
    out = tmp_path / "control"
    shutil.copytree(demo_out / "round_1" / "samples", out / "round_1" / "samples",
                    ignore=shutil.ignore_patterns("pairs.parquet"))
    shutil.copytree(demo_out / "eval_base", out / "eval_base")
    row = demo(out, model, "--control")
    assert row["win_rate"] <= 0.35 and row["delta_high"] < 0, row
    pairs = pl.read_parquet(out / "round_1" / "samples" / "pairs.parquet")
    assert (pairs["score_0"] > pairs["score_1"]).eq(pairs["label_0"] == 0.0).all()  # the lower score "wins"


def test_the_sdxl_loop_example_reads():
    example = Path(__file__).resolve().parents[1] / "examples" / "loop_sdxl_pickscore.toml"
    plan = read_loop(example, out=Path("elsewhere"))
    assert (plan.loop.rounds, plan.loop.eval_prompts, plan.loop.out) == (2, "parti", Path("elsewhere"))
    assert plan.loop.prompts == str(example.parent / "prompts.txt")
    assert plan.stages["eval"]["scorers"] == ["pickscore", "hpsv2.1"]  # eval defaults to the label scorers
    assert plan.stages["train"]["gradient_checkpointing"] and plan.stages["sample"]["dtype"] == "fp16"


def test_eval_scores_the_label_scorers_with_the_options_they_trained_with(tmp_path):
    """[label]'s scorer options go to [eval] with its scorers, so the optimised score is the one trained on (a
    loop evaluated clip.arch=ViT-H-14's training at clip's default arch); [eval] naming another value is refused."""
    config, _ = small_loop(tmp_path, "tiny")
    scorer = "label_plugins:channel_mean"
    text = config.read_text().replace('scorers = ["compressibility"]',
                                      f'scorers = ["{scorer}"]\nscorer_options = ["{scorer}.channel=2"]')
    config.write_text(text)
    assert read_loop(config).stages["eval"]["scorer_options"] == [f"{scorer}.channel=2"]
    config.write_text(text + 'held_out = ["compressibility"]\n')  # options of other scorers stay [eval]'s own
    assert read_loop(config).stages["eval"]["scorer_options"] == [f"{scorer}.channel=2"]
    config.write_text(text + f'scorer_options = ["{scorer}.channel=1"]\n')
    with pytest.raises(RlaifError, match=rf"\[eval\]: scorer_options {scorer}.channel=1, but \[label\] trains on "
                                         rf"{scorer}.channel=2; the optimised score must be the one trained on"):
        read_loop(config)


def test_a_control_run_goes_to_its_own_folder_unless_told():
    example = Path(__file__).resolve().parents[1] / "examples" / "loop_sdxl_pickscore.toml"
    out = read_loop(example).loop.out
    control = read_loop(example, control=True)
    assert control.loop.out == Path(f"{out}-control") and control.stages["label"]["invert"]
    assert read_loop(example, out=Path("elsewhere"), control=True).loop.out == Path("elsewhere")


def test_a_control_run_begun_in_the_loops_own_folder_goes_on_there(tmp_path, monkeypatch):
    """Before the -control default, `rlaif loop --control` ran in [loop] out: rerun, it continues there."""
    example = Path(__file__).resolve().parents[1] / "examples" / "loop_sdxl_pickscore.toml"
    monkeypatch.chdir(tmp_path)
    out = read_loop(example).loop.out
    out.mkdir(parents=True)
    (out / "loop.json").write_text(json.dumps({"settings": {"label": {"invert": True}}, "done": [], "rounds": {}}))
    assert read_loop(example, control=True).loop.out == out
    (out / "loop.json").write_text(json.dumps({"settings": {"label": {}}, "done": [], "rounds": {}}))
    assert read_loop(example, control=True).loop.out == Path(f"{out}-control")  # the run it controls


def test_later_rounds_sample_new_seeds_never_the_eval_seed():
    from rlaif.loop import round_seed

    for sample_seed in (0, 1, 7):
        seeds = [round_seed(sample_seed, n) for n in range(1, 9)]
        assert seeds[0] == sample_seed and len(set(seeds)) == 8
        assert all(seed >= 2**31 for seed in seeds[1:])  # far from any small eval seed (default 1)

