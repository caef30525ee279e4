"""The CLI as a user meets it: instant help, conventional options, progress as log lines or bars."""

import io
import subprocess
import sys

import pytest
from conftest import PROMPTS, cli_env, run_cli

from rlaif.cli_progress import LineReporter, bar_columns

HEAVY = ("torch", "diffusers", "transformers", "polars", "accelerate", "open_clip", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["label", "--help"], ["train", "--help"],
                                  ["eval", "--help"], ["loop", "--help"], ["scorers", "list"], ["--version"]])
def test_help_and_scorers_list_import_no_heavy_library(argv):
    """What makes `rlaif --help` answer at once (bench/cli.py times it): nothing heavy is imported."""
    code = ("import sys; sys.argv = ['rlaif', *sys.argv[1:]]\nfrom rlaif.cli import main\ntry:\n    main()\n"
            f"except SystemExit:\n    pass\nprint('LOADED', *sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "LOADED"


@pytest.mark.parametrize("argv", [
    ["sample", "-m", "tiny", "-p", "missing.txt", "-o", "s"], ["label", "missing", "-s", "compressibility"],
    ["train", "missing.parquet", "-m", "tiny", "-o", "t"],
    ["eval", "-m", "tiny", "--tuned", "missing", "-p", "missing.txt", "-o", "e", "-s", "compressibility"]])
def test_a_mistyped_path_is_told_before_the_slow_libraries_load(argv, tmp_path):
    """Each command checks its paths before torch and diffusers load (seconds): a typo is told at once."""
    slow = ("torch", "diffusers", "transformers", "accelerate", "open_clip")
    code = ("import sys; sys.argv = ['rlaif', *sys.argv[1:]]\nfrom rlaif.cli import main\ntry:\n    main()\n"
            f"except SystemExit as exit_:\n    print('EXIT', exit_.code, *sorted(m for m in {slow!r} if m in "
            "sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1] == "EXIT 2", result.stderr
    assert "does not exist" in result.stderr


def test_version():
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout == f"rlaif {version('rlaif')}\n"


def test_options_read_as_flags_and_repeatable_values():
    help_text = run_cli("label", "--help", env=None).stdout
    assert "--keep-ties " in help_text and "--keep-ties <bool>" not in help_text and "<bool>" not in help_text
    assert "-s, --scorer NAME[:WEIGHT]" in help_text and "list[str]" not in help_text
    loop_help = " ".join(run_cli("loop", "--help").stdout.split())
    assert "[loop] table" in loop_help and "[sample] [label] [train] [eval]" in loop_help
    eval_help = run_cli("eval", "--help").stdout
    for flag in ("-m, --model, --base", "--device", "--width", "--height", "--negative-prompt"):
        assert flag in eval_help, flag


def test_log_lines_are_throttled_and_carry_rate_eta_and_info():
    now = [0.0]
    stream = io.StringIO()
    report = LineReporter("steps", stream, every=10.0, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] = step * 0.5  # 2 steps/s: 50 s in all
        report("training", step, 100, f"loss {1 / step:.4f}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 4 + 1  # the first (t = 0.5 s), one per 10 s (10.5 ... 40.5 s), and the last (50 s)
    assert lines[0].startswith("training: 1/100 steps (1%), - steps/s, ETA -:--:--, loss 1.0000")
    assert lines[1] == "training: 21/100 steps (21%), 2.00 steps/s, ETA 0:00:40, loss 0.0476"
    assert lines[-1] == "training: 100/100 steps (100%), 2.00 steps/s, ETA 0:00:00, loss 0.0100"
    report("round 1 sampling", 4, 4, unit="images")  # a piece of work that counts something else says so
    assert stream.getvalue().splitlines()[-1].startswith("round 1 sampling: 4/4 images (100%)")


def test_bars_fit_80_columns_with_loss_and_eta():
    from rich.console import Console
    from rich.progress import Progress

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    progress = Progress(*bar_columns("steps"), console=console, auto_refresh=False)
    task = progress.add_task("training", total=150, info="loss 0.6931 acc 0.50")
    progress.update(task, completed=40)
    console.print(progress.make_tasks_table(progress.tasks))
    (line,) = [row for row in out.getvalue().splitlines() if row.strip()]
    assert len(line.rstrip()) <= 80 and "40/150" in line and "loss 0.6931 acc 0.50" in line
    assert "-:--:--" in line or "0:0" in line  # the ETA column survived


def test_a_command_in_a_log_prints_progress_lines_and_a_summary(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    sampled = run_cli("sample", "-m", "tiny", "-p", tmp_path / "p.txt", "-n", 2, "--steps", 2, "-o", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    assert "sampling: 4/4 images (100%)" in sampled.stderr  # stderr is a pipe here: lines, not bars
    labelled = run_cli("label", tmp_path / "s", "-s", "compressibility")
    assert labelled.returncode == 0, labelled.stderr
    assert "scoring compressibility: 4/4 images (100%)" in labelled.stderr
    assert f"wrote {tmp_path / 's' / 'pairs.parquet'}: 2 pairs from 2 prompts (0 tied pairs dropped, 0 under " \
           "--min-margin)" in labelled.stderr
    trained = run_cli("train", tmp_path / "s" / "pairs.parquet", "-m", "tiny", "-o", tmp_path / "t", "--max-steps", 2)
    assert trained.returncode == 0, trained.stderr
    assert "training: 2/2 steps (100%)" in trained.stderr and ", loss 0.6" in trained.stderr
    last = trained.stderr.strip().splitlines()[-1]
    assert last.startswith("trained 2 steps of 4 pairs each on 2 pairs (0 ties dropped, 0 held out; labels: "
                           "label_0): final loss 0.")
    assert last.endswith(f"weights in {tmp_path / 't' / 'pytorch_lora_weights.safetensors'}")


def test_ctrl_c_says_how_to_go_on(tmp_path):
    import signal
    import time

    from conftest import cli_env

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    process = subprocess.Popen([sys.executable, "-m", "rlaif", "sample", "-m", "tiny", "-p", str(tmp_path / "p.txt"),
                                "-n", "4", "--steps", "50", "--batch-size", "1", "-o", str(tmp_path / "s")],
                               env=cli_env(), stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not list((tmp_path / "s").rglob("*.png")):
        time.sleep(0.05)  # at work: its first image is written
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == ("interrupted: the images written so far are kept; rerun the same "
                                               "command to make the rest")


def test_ctrl_c_in_training_says_to_resume(tiny_pairs, tmp_path):
    import signal
    import time

    def interrupted(out, every, ready):
        process = subprocess.Popen([sys.executable, "-m", "rlaif", "train", str(tiny_pairs), "-m", "tiny", "-o",
                                    str(out), "--max-steps", "1000", "--checkpoint-every", str(every)],
                                   env=cli_env(), stderr=subprocess.PIPE, text=True)
        while process.poll() is None and not ready(out):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 130
        return stderr.strip().splitlines()[-1]

    # a checkpoint is complete: go on from it
    assert interrupted(tmp_path / "t", 1, lambda out: any(out.glob("checkpoints/step_*/position.json"))) == (
        "interrupted: rerun the same command with --resume latest to go on from the last checkpoint "
        "(--checkpoint-every); the steps after it are done again")
    # none yet (it pointed to a checkpoint that did not exist): start again
    assert interrupted(tmp_path / "u", 1000, lambda out: (out / "train_log.jsonl").exists()) == (
        "interrupted before the first checkpoint (--checkpoint-every): rerun the same command to start again")


def test_cache_info_and_clear(tmp_path):
    cache = tmp_path / "cache"
    (cache / "train" / "latents" / "vae-fp32").mkdir(parents=True)
    (cache / "train" / "latents" / "vae-fp32" / "shard-00.sqlite").write_bytes(b"x" * 3 * 2**20)
    (cache / "relabel" / "k").mkdir(parents=True)
    (cache / "relabel" / "k" / "chunk-00000-0000000.parquet").write_bytes(b"y" * 2**20)
    env = cli_env(RLAIF_CACHE=str(cache))
    info = run_cli("cache", "info", env=env)
    assert info.returncode == 0 and f"cache: {cache}" in info.stdout
    assert "latents           3.0 MiB        1 files" in info.stdout and "relabel           1.0 MiB" in info.stdout
    assert "total             4.0 MiB" in info.stdout
    cleared = run_cli("cache", "clear", "latents", env=env)
    assert cleared.returncode == 0 and "freed 3.0 MiB" in cleared.stderr
    assert not (cache / "train" / "latents").exists() and (cache / "relabel" / "k").exists()
    wrong = run_cli("cache", "clear", "everything", env=env)
    assert wrong.returncode == 2 and "no cache part 'everything'; parts: latents, text" in wrong.stderr
    assert run_cli("cache", "clear", env=env).returncode == 0 and not cache.exists()


def test_a_plugin_in_the_current_folder_gets_a_hint(tmp_path):
    """The `rlaif` console script does not import from the working directory (python -m rlaif does)."""
    import shutil

    (tmp_path / "myscorer.py").write_text("def brightness(device='cpu'):\n    raise NotImplementedError\n")
    (tmp_path / "empty").mkdir()
    result = subprocess.run([shutil.which("rlaif"), "label", "empty", "-s", "myscorer:brightness"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: scorer 'myscorer:brightness' cannot be imported: No module named "
                                     "'myscorer'; myscorer is in the current folder, which the `rlaif` command does "
                                     "not import from: run it with PYTHONPATH=. (or as python -m rlaif)")
