"""The ``rlaif`` command line: parse, validate, call the library, print. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

from rlaif.errors import RlaifError

app = typer.Typer(
    help="Align text-to-image diffusion models to AI feedback: sample -> label -> train -> eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, named after the unit being counted."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str) -> Progress:
    """A rich progress bar on stderr with count, rate and ETA."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeRemainingColumn(), console=err, transient=False)


from rlaif.sample import SampleConfig  # noqa: E402  (after the Typer app, so `--help` stays quick to read)

H = SampleConfig.help


@app.command()
def sample(
    model: str = typer.Option(..., "--model", "-m", help=H("model")),
    prompts: str = typer.Option(..., "--prompts", "-p", help=H("prompts")),
    out: Path = typer.Option(..., "--out", "-o", help=H("out")),
    per_prompt: int = typer.Option(4, "--per-prompt", "-n", help=H("per_prompt")),
    steps: int = typer.Option(30, help=H("steps")),
    guidance: float = typer.Option(7.5, help=H("guidance")),
    width: int = typer.Option(None, help=H("width")),
    height: int = typer.Option(None, help=H("height")),
    negative_prompt: str = typer.Option("", help=H("negative_prompt")),
    seed: int = typer.Option(0, help=H("seed")),
    batch_size: int = typer.Option(8, help=H("batch_size")),
    dtype: str = typer.Option("fp32", help=H("dtype")),
    device: str = typer.Option(None, help=H("device")),
    scheduler: str = typer.Option(None, help=H("scheduler")),
    prompt_column: str = typer.Option(None, help=H("prompt_column")),
) -> None:
    """Generate PER_PROMPT candidate images for every prompt (resumable; shards under accelerate/torchrun)."""
    from accelerate import PartialState

    from rlaif.sample import run_sample

    config = SampleConfig(model=model, prompts=prompts, out=out, per_prompt=per_prompt, steps=steps,
                          guidance=guidance, width=width, height=height, negative_prompt=negative_prompt,
                          seed=seed, batch_size=batch_size, dtype=dtype, device=device, scheduler=scheduler,
                          prompt_column=prompt_column)
    config.validate()
    show = PartialState().is_main_process
    with progress_bar("images") as bar:
        task = bar.add_task("sampling", total=None, visible=show)
        table = run_sample(config, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if show:
        err.print(f"wrote {table}")


@app.command()
def tiny(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the diffusers pipeline into."),
    xl: bool = typer.Option(False, "--xl", help="Write the SDXL-style tiny model instead of the SD1.5-style one."),
) -> None:
    """Write the tiny offline model (also reachable as --model tiny / tiny-xl) as a diffusers folder."""
    from rlaif.tiny import write_tiny

    err.print(f"wrote {write_tiny(out, xl=xl)}")


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading bars and info logs off the terminal; rlaif draws its own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    quiet_libraries()
    try:
        app()
    except RlaifError as exc:
        if os.environ.get("RLAIF_DEBUG") == "1":
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
