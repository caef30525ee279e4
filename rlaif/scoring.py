"""The scorer plugin contract: discovery through the ``rlaif.scorers`` entry points or ``module:attr``.

A scorer factory is called as ``factory(device=..., **options)`` and returns an object with
``score(images, prompts) -> torch.Tensor | Sequence[float]``: one value per image, higher is better.
It may expose ``name`` and ``description``. Built-ins register through the same entry-point group as
third-party plugins.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from rlaif.errors import RlaifError

GROUP = "rlaif.scorers"


@runtime_checkable
class Scorer(Protocol):
    """What a scorer factory returns."""

    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor | Sequence[float]: ...


@dataclass(frozen=True)
class ScorerEntry:
    """One available scorer: its name, where it comes from, what it measures, how to build it."""

    name: str
    source: str
    description: str
    load: Callable[[], Callable[..., Scorer]]


def available_scorers() -> dict[str, ScorerEntry]:
    """Every scorer registered in the ``rlaif.scorers`` entry-point group, by name."""
    found = {}
    for point in entry_points(group=GROUP):
        dist = point.dist.name if point.dist is not None else "unknown"
        source = "built-in" if dist == "rlaif" else dist
        found[point.name] = ScorerEntry(point.name, source, _describe(point), point.load)
    return dict(sorted(found.items()))


def _describe(point) -> str:
    try:
        factory = point.load()
    except Exception as exc:  # a broken plugin must not hide the others
        return f"(cannot be imported: {exc})"
    doc = getattr(factory, "description", None) or (factory.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def resolve_factory(spec: str) -> tuple[str, Callable[..., Scorer]]:
    """The (name, factory) for a registered name or an explicit ``module:attr``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise RlaifError(f"scorer {spec!r} cannot be imported: {exc}") from exc
        return spec, target
    entries = available_scorers()
    if spec not in entries:
        raise RlaifError(f"unknown scorer {spec!r}; available: {', '.join(entries) or 'none'}")
    try:
        return spec, entries[spec].load()
    except Exception as exc:
        raise RlaifError(f"scorer {spec!r} ({entries[spec].source}) cannot be imported: {exc}") from exc


class LoadedScorer:
    """A scorer instance plus the checks every call gets: right length, finite numbers, errors named."""

    def __init__(self, spec: str, device: str | torch.device = "cpu", **options: object) -> None:
        self.spec, factory = resolve_factory(spec)
        try:
            self.scorer = factory(device=device, **options)
        except RlaifError:
            raise
        except Exception as exc:
            raise RlaifError(f"scorer {self.spec!r} failed to load: {exc}") from exc
        self.name = getattr(self.scorer, "name", None) or self.spec

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Score a batch, returning plain floats; any plugin fault becomes one clear error naming it."""
        try:
            raw = self.scorer.score(images, prompts)
        except Exception as exc:
            raise RlaifError(f"scorer {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        values = raw.detach().float().cpu().flatten().tolist() if isinstance(raw, torch.Tensor) else list(raw)
        if len(values) != len(images):
            raise RlaifError(f"scorer {self.name!r} returned {len(values)} scores for {len(images)} images")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise RlaifError(f"scorer {self.name!r} returned a NaN, infinite or non-numeric score")
        return [float(v) for v in values]


def unique_prompts(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Each distinct prompt once, and for every input prompt its index into that list.

    Scorers encode the distinct prompts once per batch and gather: ``text_features[index]``.
    """
    distinct = list(dict.fromkeys(prompts))
    position = {prompt: i for i, prompt in enumerate(distinct)}
    return distinct, torch.tensor([position[p] for p in prompts], dtype=torch.long)
