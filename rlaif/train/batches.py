"""The micro-batches a process trains on, built ahead of the step by DataLoader workers: pairs read from the
table, images decoded and augmented (or their latents taken from the cache), caption dropout, VAE-sample noise,
diffusion noise and timesteps (or flow noise levels).

Everything in a micro-batch is a pure function of (seed, global pair position), so 1 or N processes and 0 or N
workers train on exactly the same numbers. Micro-batch ``k`` of a run (k = step x accumulation + micro step)
holds positions ``k*B*P + rank*B ... + B`` for B pairs per process and P processes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from rlaif.errors import RlaifError
from rlaif.images import ImageSource, image_size
from rlaif.seeding import generator, keyed_seed
from rlaif.train.data import Augmentation, fit_augmentation, plan_augmentation
from rlaif.train.encoding import PreparedImage, prepare_image
from rlaif.train.flow import draw_u
from rlaif.train.pair_table import PairTable, pair_index
from rlaif.train.store import TensorStore

# The version of how a micro-batch is built from (seed, position), recorded in checkpoints: raise it whenever a
# release draws other numbers or inputs for the same pair, or other pairs for a position (2: VAE draws keyed by
# image content, a loser of another aspect ratio resized on its own, SDXL micro-conditioning per image; 3:
# captions held out compared case-folded, whitespace collapsed; 4: Pick-a-Pic pairs of one picture twice,
# are_different false, left out; 5: text embeddings rounded to a half-precision --cache-dtype, as latents are), so a
# resumed run says so.
BATCH_RULES = 5


@dataclass(frozen=True)
class BatchSettings:
    """What a micro-batch depends on besides the table."""

    seed: int
    batch_size: int  # pairs per process per micro-batch
    processes: int
    rank: int
    resolution: int
    random_crop: bool
    hflip: bool
    caption_dropout: float
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one image's latents
    timesteps: int  # of the training noise schedule
    shuffle: bool = True  # False: position p is the table's pair p (held-out measurement, read in table order)
    weighting: str | None = None  # flow models: the density of u (rlaif.train.flow); None: integer timesteps
    noise_range: tuple[float, float] = (0.0, 1.0)  # the share of the noise schedule trained on (--min/max-noise)


@dataclass
class MicroBatch:
    """One micro-batch, ready for the UNet once the missing latents are encoded; ``images`` holds the chosen
    image of every pair, then the rejected ones, and ``augmentations`` their transforms in the same order."""

    positions: list[int]
    captions: list[str]
    augmentations: list[Augmentation]
    images: list[PreparedImage]
    vae_draws: torch.Tensor  # (2B, C, h, w): one standard normal draw per image, for sampling its posterior
    noise: torch.Tensor  # (B, C, h, w): shared by a pair's two images
    timesteps: torch.Tensor  # (B,): integer timesteps, or for flow models draws u in [0, 1] that place s


def _bytes(source: ImageSource, name: str) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise RlaifError(f"image {name} ({source}) cannot be read: {exc.strerror}") from exc


class MicroBatches(Dataset):
    """Micro-batch ``k`` of this process, by index. A user error inside a worker comes back as its message
    (DataLoader would wrap the exception in a worker traceback); the training loop raises it as one line."""

    def __init__(self, table: PairTable, settings: BatchSettings, store: TensorStore | None) -> None:
        self.table, self.settings, self.store = table, settings, store

    def positions(self, k: int) -> list[int]:
        s = self.settings
        start = k * s.batch_size * s.processes + s.rank * s.batch_size
        return list(range(start, start + s.batch_size))

    def __getitem__(self, k: int) -> MicroBatch | str:
        try:
            return self._build(k)
        except RlaifError as exc:
            return str(exc)

    def _build(self, k: int) -> MicroBatch:
        s = self.settings
        positions = self.positions(k)
        pairs = [self.table[pair_index(position, self.table, s.seed) if s.shuffle else position]
                 for position in positions]
        plans, chosen, rejected, captions, contents = ([], []), [], [], [], ([], [])
        for pair, position in zip(pairs, positions, strict=True):
            data = _bytes(pair.chosen, pair.chosen_name), _bytes(pair.rejected, pair.rejected_name)
            for side, content in zip(contents, data, strict=True):
                side.append(hashlib.sha256(content).hexdigest())
            augmentation = plan_augmentation(image_size(data[0], pair.chosen_name), s.resolution, s.random_crop,
                                             s.hflip, random.Random(keyed_seed("augment", s.seed, position)))
            fitted = fit_augmentation(augmentation, image_size(data[1], pair.rejected_name), s.random_crop)
            plans[0].append(augmentation)
            plans[1].append(fitted)
            chosen.append(prepare_image(data[0], pair.chosen_name, augmentation, self.store, contents[0][-1]))
            rejected.append(prepare_image(data[1], pair.rejected_name, fitted, self.store, contents[1][-1]))
            dropped = random.Random(keyed_seed("drop", s.seed, position)).random() < s.caption_dropout
            captions.append("" if dropped else pair.caption)
        # per image, keyed by its content, not its side: a pair judged with its label flipped (eval --pairs on another
        # label column) sees each image through the same draw, so its verdict flips exactly
        draws = [torch.randn(s.latent_shape, generator=generator(keyed_seed("vae", s.seed, position, content)))
                 for side in contents for position, content in zip(positions, side, strict=True)]
        noise = [torch.randn(s.latent_shape, generator=generator(keyed_seed("noise", s.seed, position)))
                 for position in positions]
        low, high = s.noise_range  # fractions of the schedule's axis, from the clean image (0) to pure noise (1)
        if s.weighting is None:  # [0, 1) of the schedule draws exactly what randrange(timesteps) always drew
            first = min(round(low * s.timesteps), s.timesteps - 1)
            end = max(round(high * s.timesteps), first + 1)
            timesteps = [random.Random(keyed_seed("t", s.seed, position)).randrange(first, end)
                         for position in positions]
        else:  # u runs the other way (u = 0: pure noise, rlaif.train.flow.shifted_sigma): 1 - u rescaled into the range
            timesteps = [1 - high + (high - low) * draw_u(s.weighting, generator(keyed_seed("t", s.seed, position)))
                         for position in positions]
        return MicroBatch(positions, captions, plans[0] + plans[1], chosen + rejected, torch.stack(draws),
                          torch.stack(noise), torch.tensor(timesteps))


def _as_is(item: MicroBatch | str) -> MicroBatch | str:
    return item


def micro_batches(dataset: MicroBatches, first: int, stop: int, workers: int) -> DataLoader:
    """Micro-batches ``first`` .. ``stop - 1`` in order, built by ``workers`` processes, each up to two
    micro-batches ahead of the step (0 workers: built in this process when the step asks for them)."""
    return DataLoader(dataset, sampler=range(first, stop), batch_size=None, collate_fn=_as_is,
                      num_workers=workers, prefetch_factor=2 if workers else None)
