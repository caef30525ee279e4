"""A separately installed package registers a scorer by entry point; rlaif finds it and labels with it."""

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import PROMPTS, cli_env, run_cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_scorer"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Install the example package into its own folder (not this environment) and put it on PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(EXAMPLE)], check=True)
    return cli_env(PYTHONPATH=str(target))


def test_entry_point_plugin_is_listed_and_labels(installed, tmp_path):
    listed = run_cli("scorers", "list", env=installed)
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.strip().startswith("redness"))
    assert "rlaif-redness" in row and "How red" in row
    assert "redness" not in run_cli("scorers", "list").stdout  # only where the package is installed

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    sampled = run_cli("sample", "--model", "tiny", "--prompts", tmp_path / "p.txt", "--per-prompt", 3,
                      "--steps", 3, "--out", tmp_path / "run")
    assert sampled.returncode == 0, sampled.stderr
    labelled = run_cli("label", tmp_path / "run", "--scorer", "redness", env=installed)
    assert labelled.returncode == 0, labelled.stderr
    scores = pl.read_parquet(tmp_path / "run" / "scores.parquet")
    assert set(scores["scorer"]) == {"redness"} and scores.height == 6
    assert pl.read_parquet(tmp_path / "run" / "pairs.parquet").height == 2
