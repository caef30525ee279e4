"""``python -m rlaif`` (and ``torchrun -m rlaif``) runs the CLI."""

from rlaif.cli import main

main()
