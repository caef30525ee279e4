"""Shared test helpers: run the real CLI (in this process, or in a subprocess where the process itself is under
test), the test fixture folder, prompt files."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

# Tests never reach a hub: hub ids resolve from a private offline Hugging Face cache that tests fill with
# tiny files in the original layouts (set before huggingface_hub is imported, which reads it once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="rlaif-test-hf-")
os.environ["RLAIF_CACHE"] = tempfile.mkdtemp(prefix="rlaif-test-cache-")  # session fixtures; tests get their own
REVISION = "0123456789abcdef0123456789abcdef01234567"

TEST_DATA = Path(__file__).resolve().parent / "data"  # test fixtures from public sources (tests/data/README.md)
PROMPTS = [
    "a small red circle on a blue background",
    "a large green square on a white background",
    "a small yellow triangle on a black background",
    "a large purple circle on a orange background",
    "a small white square on a red background",
    "a large black triangle on a yellow background",
    "a small orange circle on a green background",
    "a large blue square on a purple background",
]


def install_in_hf_cache(repo_id: str, files: Path) -> None:
    """Lay out ``files`` (a folder) as the cached snapshot of hub model ``repo_id``, so that
    ``from_pretrained(repo_id)`` / ``hf_hub_download(repo_id, name)`` resolve to it offline."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(files, repo / "snapshots" / REVISION, dirs_exist_ok=True)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses: offline, quiet, one thread per process unless told."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


# Environment variables that rlaif reads on every call, so a CLI call that changes only these can run in this
# process. Anything else (PYTHONPATH, OMP_NUM_THREADS, ...) is read once at start-up and needs a new process.
PER_CALL_ENV = {"RLAIF_CACHE", "RLAIF_DEBUG", "RLAIF_TEST_COUNT", "RLAIF_TEST_WEIGHTS", "HF_HUB_OFFLINE",
                "PYTHONUNBUFFERED"}


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``rlaif ARGS`` as a user would, returning the completed process (stdout/stderr as text).

    The call goes through the console entry point ``rlaif.cli.main`` with the same argv, in this process (a new
    process would spend ~10 s importing torch, diffusers and peft again), unless ``env`` changes a variable that
    only a new process reads; then it runs ``python -m rlaif`` in a subprocess."""
    argv = [str(arg) for arg in args]
    env = env or cli_env()
    changed = {key for key in set(env) | set(os.environ) if env.get(key) != os.environ.get(key)}
    if changed - PER_CALL_ENV - {"PYTHONPATH"} or not _importable_here(env.get("PYTHONPATH")):
        return subprocess.run([sys.executable, "-m", "rlaif", *argv], capture_output=True, text=True, env=env,
                              timeout=600)
    return _run_in_process(argv, {key: env.get(key) for key in changed})


def _importable_here(pythonpath: str | None) -> bool:
    """Whether a call with ``pythonpath`` can run in this process, its folders put first on sys.path for the call
    (plugins a test imports by module:attr or entry point); not when it leaves out a folder this process has."""
    before = os.environ.get("PYTHONPATH", "")
    if pythonpath is None:  # a folder this process imports from would stay importable
        return not before
    return pythonpath.endswith(before) and all(
        Path(entry).is_dir() for entry in pythonpath[: len(pythonpath) - len(before)].split(os.pathsep) if entry)


def _run_in_process(argv: list[str], env_changes: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    """``rlaif.cli.main`` with ``argv``, the environment changed for the call (a longer PYTHONPATH's new folders
    first on sys.path), and stdout/stderr captured; an uncaught exception becomes exit code 1 with its traceback on
    stderr, as in a process of its own."""
    from accelerate.state import AcceleratorState, GradientState

    from rlaif.cli import main

    saved_env, saved_argv, saved_path = dict(os.environ), sys.argv, list(sys.path)
    added = (env_changes.get("PYTHONPATH") or "")[: -len(os.environ.get("PYTHONPATH", "")) or None]
    sys.path[:0] = [entry for entry in added.split(os.pathsep) if entry]
    for key, value in env_changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    sys.argv = ["rlaif", *argv]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if exit.code is not None and not isinstance(exit.code, int):
                    print(exit.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        sys.path[:] = saved_path
        AcceleratorState._reset_state(reset_partial_state=True)  # each call is a fresh run, as in a new process
        GradientState._reset_state()
    return subprocess.CompletedProcess(["rlaif", *argv], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test shares one temporary rlaif cache, never the user's."""
    monkeypatch.setenv("RLAIF_CACHE", str(tmp_path_factory.getbasetemp() / "rlaif-cache"))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pairs table on ``tiny`` (4 prompts x 4 candidates, compressibility, all pairs), shared by the
    training and evaluation tests."""
    folder = tmp_path_factory.mktemp("pairs")
    (folder / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    sampled = run_cli("sample", "--model", "tiny", "--prompts", folder / "p.txt", "--per-prompt", 4, "--steps", 4,
                      "--batch-size", 16, "--out", folder / "run")
    assert sampled.returncode == 0, sampled.stderr
    labelled = run_cli("label", folder / "run", "--scorer", "compressibility", "--strategy", "all-pairs")
    assert labelled.returncode == 0, labelled.stderr
    return folder / "run" / "pairs.parquet"


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "8prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path
