"""The scorer plugin contract: discovery through the ``rlaif.scorers`` entry points or ``module:attr``.

A scorer factory is called as ``factory(device=..., **options)`` and returns an object with
``score(images, prompts) -> torch.Tensor | Sequence[float]``: one value per image, higher is better.
It may expose ``name`` (for its error messages) and ``identity``: a string that changes whenever its weights do
(``rlaif.files.content_identity`` of the checkpoint it loaded, say); ``rlaif scorers list`` describes it by the first
line of the factory's docstring. Built-ins register through the same entry-point group
as third-party plugins.

Cached scores are keyed by ``LoadedScorer.key``: the scorer's name, its options, the plugin's version (its
distribution's and a hash of its source files: ``plugin_version``), its identity, the versions of the libraries
scores depend on and of rlaif's image decoding (``rlaif.images.DECODE_VERSION``).
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions, version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from rlaif.errors import RlaifError, exception_text, hub_unavailable

if TYPE_CHECKING:  # importing this module stays cheap (`rlaif scorers list`, option checks): torch comes later
    import torch
    from PIL import Image

GROUP = "rlaif.scorers"
WEIGHTED = re.compile(r"(?P<name>.*):(?P<weight>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


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
    """The first paragraph of the factory's docstring, read from its source without importing it (importing a
    model-based scorer costs seconds: torch, transformers); the import is the fallback for compiled code."""
    module, _, attr = point.value.partition(":")
    try:
        spec = importlib.util.find_spec(module)
        tree = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin else None
    except (ImportError, OSError, SyntaxError, ValueError):
        tree = None
    if tree is not None:
        name = attr.split(".")[0]
        node = next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name), None)
        return summary(ast.get_docstring(node) if node is not None else None)
    try:
        factory = point.load()
    except Exception as exc:  # a broken plugin must not hide the others
        return f"(cannot be imported: {exc})"
    return summary(getattr(factory, "description", None) or factory.__doc__)


def summary(doc: str | None) -> str:
    """A docstring's first paragraph as one line (a summary may run over a line break)."""
    return " ".join(re.split(r"\n\s*\n", (doc or "").strip())[0].split())


def resolve_factory(spec: str) -> tuple[str, Callable[..., Scorer]]:
    """The (name, factory) for a registered name or an explicit ``module:attr``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            target = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            top = module_name.split(".")[0]
            absent = isinstance(exc, ModuleNotFoundError) and exc.name in (module_name, top)
            if absent and module_name in available_scorers():  # "pickscore:two": a weight meant, not a plugin
                raise RlaifError(f"--scorer {spec!r}: the weight {attr!r} is not a positive number") from exc
            if not absent and ":" in attr:  # "mod:factory:two": the same, after a plugin's name
                raise RlaifError(f"--scorer {spec!r}: the weight {attr.rpartition(':')[2]!r} is not a positive "
                                 "number") from exc
            here = absent and (Path(f"{top}.py").is_file() or Path(top, "__init__.py").is_file())
            hint = (f"; {top} is in the current folder, which the `rlaif` command does not import from: run it with "
                    "PYTHONPATH=. (or as python -m rlaif)") if here else ""
            raise RlaifError(f"scorer {spec!r} cannot be imported: {exc}{hint}") from exc
        return spec, target
    entries = available_scorers()
    if spec not in entries:
        raise RlaifError(f"unknown scorer {spec!r}; available: {', '.join(entries) or 'none'}")
    try:
        return spec, entries[spec].load()
    except Exception as exc:
        raise RlaifError(f"scorer {spec!r} ({entries[spec].source}) cannot be imported: {exc}") from exc


def check_options(spec: str, options: dict[str, str]) -> None:
    """Refuse options that scorer ``spec``'s factory does not take, before anything is loaded."""
    _, factory = resolve_factory(spec)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a factory without a signature (a C callable): let it decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # it forwards what it gets: only loading it can tell
    accepted = [name for name in parameters if name != "device"]
    for key in options:
        if key not in accepted:
            raise RlaifError(f"--scorer-option {spec}.{key}: scorer {spec!r} takes "
                             f"{', '.join(accepted) or 'no options'}")


# distributions whose upgrade can change a score without any change to the scorer (open_clip >= 2.29 built
# OpenAI's ViT-L-14 with another activation; an image processor or JPEG encoder may change): part of the cache key
SCORE_LIBRARIES = ("torch", "torchvision", "open-clip-torch", "transformers", "pillow")


def library_versions(names: Sequence[str]) -> dict[str, str]:
    """Each distribution's installed version, "not installed" for one that is not."""
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def plugin_version(spec: str, factory: Callable[..., Scorer]) -> str:
    """The version of the code behind scorer ``spec``: of the module it names (or registers) and of the module
    that defines ``factory``, each one's distribution version and a hash of its Python files (``_code_hash``)."""
    if ":" in spec:
        named = importlib.import_module(spec.partition(":")[0])
    else:
        point = {p.name: p for p in entry_points(group=GROUP)}.get(spec)  # the last one wins, as in available_scorers
        named = sys.modules.get(point.module) if point is not None else None
    defining = sys.modules.get(getattr(factory, "__module__", "") or "")
    parts = dict.fromkeys(_module_version(m) for m in (named, defining) if m is not None)
    return "+".join(parts) or "unknown"


def _module_version(module: ModuleType) -> str:
    """``dist==version`` of the installs that provide ``module``'s top-level name (the files a new version ships
    beside the code, such as weights) and its code's hash: code edited and reinstalled under the same version,
    as a plugin's author does while working on it, is another version."""
    dists = sorted(set(packages_distributions().get(module.__name__.split(".")[0], [])))
    return "+".join([*(f"{dist}=={version(dist)}" for dist in dists), _code_hash(module)])


def _code_hash(module: ModuleType) -> str:
    """A hash of the Python files ``module``'s code may come from, named by their path inside the folder they
    were found in (the same code elsewhere hashes alike): those of every package on its dotted path (a package
    mapped to another folder included), or for a lone module the ones beside it, which it may import."""
    names = module.__name__.split(".")
    roots = dict.fromkeys(Path(entry) for i in range(1, len(names) + 1)
                          for entry in getattr(sys.modules.get(".".join(names[:i])), "__path__", None) or [])
    source = getattr(module, "__file__", None)
    if roots:
        found = [(root, path) for root in roots for path in root.rglob("*.py")]
    else:
        found = [(Path(source).parent, path) for path in Path(source).parent.glob("*.py")] if source else []
    digest = hashlib.sha256()
    for relative, path in sorted((path.relative_to(root).as_posix(), path) for root, path in found):
        with contextlib.suppress(OSError):  # an editor's lock file, a broken link, a file removed meanwhile
            digest.update(relative.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class LoadedScorer:
    """A scorer instance plus the checks every call gets: right length, finite numbers, errors named."""

    def __init__(self, spec: str, device: str | torch.device = "cpu", **options: str) -> None:
        check_options(spec, options)
        self.spec, factory = resolve_factory(spec)
        try:
            self.scorer = factory(device=device, **options)
        except RlaifError:
            raise
        except Exception as exc:
            from huggingface_hub.constants import is_offline_mode

            unavailable = hub_unavailable(exc, "load it once")
            if unavailable is None and isinstance(exc, OSError) and is_offline_mode():  # transformers drops the cause
                unavailable = ("HF_HUB_OFFLINE is set: if these files are not in the local Hugging Face cache, load it "
                               "once while online (or unset HF_HUB_OFFLINE)")
            hint = f"; {unavailable}" if unavailable else ""
            # all of it (the CLI joins the lines), but for a file not in the cache: its first sentence names it, the
            # rest is transformers' advice for a mistyped name
            text = exception_text(exc).split(". ")[0] if unavailable else exception_text(exc).rstrip(". ")
            raise RlaifError(f"scorer {self.spec!r} failed to load: {text}{hint}") from exc
        from rlaif.images import DECODE_VERSION  # here: the CLI's --help imports this module, not numpy or PIL

        own = getattr(self.scorer, "name", None)  # one class may serve several registered names
        self.name = self.spec if own in (None, "", self.spec) else f"{self.spec} ({own})"
        described = {"spec": spec, "options": dict(sorted(options.items())), "version": plugin_version(spec, factory),
                     "identity": getattr(self.scorer, "identity", None),
                     "libraries": library_versions(SCORE_LIBRARIES), "decoding": DECODE_VERSION}
        self.key = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
        """Changes whenever the scores could: scores cached under another key are recomputed."""

    def __call__(self, images: list[Image.Image], prompts: list[str], names: list[str] | None = None) -> list[float]:
        """Score a batch, returning plain floats; any plugin fault becomes one clear error naming the scorer as
        given to --scorer and, for a bad score, the image (``names``: where each image came from)."""
        try:
            raw = self.scorer.score(images, prompts)
        except Exception as exc:
            raise RlaifError(f"scorer {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        import torch

        values = raw.detach().float().cpu().flatten().tolist() if isinstance(raw, torch.Tensor) else list(raw)
        if len(values) != len(images):
            raise RlaifError(f"scorer {self.name!r} returned {len(values)} scores for {len(images)} images")
        bad = next((i for i, v in enumerate(values) if not (isinstance(v, (int, float)) and math.isfinite(v))), None)
        if bad is not None:
            image = f" for image {names[bad]}" if names else ""
            raise RlaifError(f"scorer {self.name!r} returned a NaN, infinite or non-numeric score ({values[bad]!r})"
                             f"{image}")
        return [float(v) for v in values]


def unique_prompts(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Each distinct prompt once, and for every input prompt its index into that list.

    Scorers encode the distinct prompts once per batch and gather: ``text_features[index]``.
    """
    import torch

    distinct = list(dict.fromkeys(prompts))
    position = {prompt: i for i, prompt in enumerate(distinct)}
    return distinct, torch.tensor([position[p] for p in prompts], dtype=torch.long)


def check_scorers(scorers: list[str], scorer_options: list[str], weighted: bool = True) -> None:
    """Every scorer exists and takes the options given to it: checked before any work. ``weighted``: a weight
    (``NAME:WEIGHT``, what `rlaif label` combines an ensemble by) is allowed; eval scores each scorer apart."""
    weights = parse_weights(scorers)
    if not weighted and (spec := next((s for s in scorers if s not in weights), None)):
        raise RlaifError(f"--scorer {spec!r}: eval reports each scorer apart, so a weight means nothing there (it "
                         f"weighs `rlaif label`'s ensemble); give {WEIGHTED.fullmatch(spec)['name']!r}")
    for spec in weights:
        resolve_factory(spec)
    for spec, options in parse_options(scorer_options).items():
        if spec not in weights:
            raise RlaifError(f"--scorer-option {spec}.{next(iter(options))}: {spec!r} is not one of the scorers "
                             f"({', '.join(weights)})")
        check_options(spec, options)


def parse_options(specs: list[str], repeats: bool = False) -> dict[str, dict[str, str]]:
    """``["clip.arch=ViT-H-14"]`` -> ``{"clip": {"arch": "ViT-H-14"}}`` (the scorer name may contain dots).
    ``repeats``: a key given twice takes the last value, as an rlaif before 2026-11-29 scored with (in its records)."""
    options: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, equals, value = spec.partition("=")
        name, dot, key = target.rpartition(".")
        if not (equals and dot and name and key.isidentifier()):
            raise RlaifError(f"--scorer-option {spec!r}: expected NAME.KEY=VALUE")
        if key in options.get(name, {}) and not repeats:  # the last would win, and the records would list both
            raise RlaifError(f"--scorer-option {name}.{key} is given twice ({options[name][key]!r} and {value!r})")
        options.setdefault(name, {})[key] = value
    return options


def weighted_names(weights: dict[str, float]) -> list[str]:
    """``{"pickscore": 2.0}`` -> ``["pickscore:2"]``, as tables and settings record them: short where that is
    exact, every digit otherwise (so weights that differ are recorded apart)."""
    return [f"{name}:{weight:g}" if float(f"{weight:g}") == weight else f"{name}:{weight!r}"
            for name, weight in weights.items()]


def parse_weights(specs: list[str]) -> dict[str, float]:
    """``["pickscore:2", "pkg.mod:factory"]`` -> ``{"pickscore": 2.0, "pkg.mod:factory": 1.0}``.

    A trailing ``:NUMBER`` is a weight; anything else after a colon belongs to a ``module:attr`` name.
    """
    weights: dict[str, float] = {}
    for spec in specs:
        name, weight = spec, 1.0
        match = WEIGHTED.fullmatch(spec)
        if match:
            name, weight = match["name"], float(match["weight"])
        if not name or not 0 < weight < math.inf:
            raise RlaifError(f"--scorer {spec!r}: expected NAME or NAME:WEIGHT with a positive, finite weight")
        if name in weights:
            raise RlaifError(f"--scorer {name!r} is given twice")
        weights[name] = weight
    return weights
