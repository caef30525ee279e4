"""The training latent/text cache: each image is encoded once per augmentation and each caption once, the
cached values equal fresh ones, and the keys follow content, augmentation and weights."""

import dataclasses
import random
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from rlaif.models import load_pipeline
from rlaif.train import encoding
from rlaif.train.data import plan_augmentation
from rlaif.train.encoding import Encoder, prepare_image

CPU = torch.device("cpu")


class CallCounter:
    """Wraps a real method and counts its calls (the computation itself is untouched)."""

    def __init__(self, method):
        self.method, self.calls = method, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.method(*args, **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(64, 64), (80, 64), (64, 96)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def items(folder):
    """How many tensors the store files under ``folder`` hold (read with sqlite directly)."""
    count = 0
    for shard in folder.rglob("shard-*.sqlite"):
        connection = sqlite3.connect(shard)
        try:
            count += connection.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        finally:
            connection.close()
    return count


def posterior(encoder, images, plans):
    """Prepared as a DataLoader worker would (cached moments or pixels), then encoded where missing."""
    prepared = [prepare_image(path.read_bytes(), str(path), plan, encoder.latents)
                for path, plan in zip(images, plans, strict=True)]
    return encoder.latent_distribution(prepared, CPU)


def test_latents_are_encoded_once_per_image_and_augmentation(pipe, images, tmp_path, monkeypatch):
    counter = CallCounter(pipe.vae.encode)
    monkeypatch.setattr(pipe.vae, "encode", counter)
    cache = tmp_path / "cache"
    plans = [plan_augmentation(Image.open(p).size, 64, True, False, random.Random(i)) for i, p in enumerate(images)]
    first = posterior(Encoder(pipe, cache), images, plans)
    assert counter.calls == 1 and items(cache / "latents") == 3
    assert len(list((cache / "latents").rglob("*"))) <= 1 + 16  # one folder of shard files, not a file per image
    again = posterior(Encoder(pipe, cache), images, plans)  # a new run: everything from disk
    assert counter.calls == 1 and torch.equal(again.mean, first.mean) and torch.equal(again.std, first.std)
    fresh = posterior(Encoder(pipe, None), images, plans)
    assert counter.calls == 2 and torch.allclose(fresh.mean, first.mean, atol=1e-6)
    assert items(cache / "latents") == 3  # --no-cache writes nothing
    flipped = [dataclasses.replace(plans[0], flip=True)]
    mirrored = posterior(Encoder(pipe, cache), images[:1], flipped)
    assert counter.calls == 3 and items(cache / "latents") == 4
    assert not torch.allclose(mirrored.mean, first.mean[:1])


def test_a_half_precision_cache_computes_the_same_cached_or_not(pipe, images, tmp_path):
    """bf16 latents take half the disk; fresh moments are rounded the same way, so a run that found them in the
    cache and one that encoded them get the same numbers (and fp32 keeps its own entries)."""
    plans = [plan_augmentation(Image.open(p).size, 64, False, False, random.Random(0)) for p in images]
    fresh = posterior(Encoder(pipe, tmp_path, "bf16"), images, plans)
    cached = posterior(Encoder(pipe, tmp_path, "bf16"), images, plans)
    exact = posterior(Encoder(pipe, tmp_path, "fp32"), images, plans)
    assert torch.equal(fresh.mean, cached.mean) and torch.equal(fresh.std, cached.std)
    assert not torch.equal(fresh.mean, exact.mean) and torch.allclose(fresh.mean, exact.mean, rtol=1e-2, atol=1e-2)
    (bf16,) = (tmp_path / "latents").glob("*-bf16-*")
    (fp32,) = (tmp_path / "latents").glob("*-fp32-*")
    assert items(bf16) == items(fp32) == 3


def test_a_half_precision_text_cache_is_half_the_disk_and_computes_the_same_cached_or_not(pipe, tmp_path):
    """--cache-dtype applies to caption embeddings as well (an SDXL caption is 0.6 MB in fp32, a FLUX.1 one 8 MiB):
    bf16 entries take half the disk, fresh embeddings are rounded alike, and fp32 keeps its own exact entries."""
    captions = ["a red circle", "a blue square"]
    fresh = Encoder(pipe, tmp_path, "bf16").text(captions, CPU)[0]
    cached = Encoder(pipe, tmp_path, "bf16").text(captions, CPU)[0]
    exact = Encoder(pipe, tmp_path, "fp32").text(captions, CPU)[0]
    assert fresh.dtype == torch.float32 and torch.equal(fresh, cached)
    assert torch.equal(fresh, exact.to(torch.bfloat16).float()) and not torch.equal(fresh, exact)
    (bf16,) = (tmp_path / "text").glob("*-bf16")
    (fp32,) = (p for p in (tmp_path / "text").iterdir() if p != bf16)
    assert items(bf16) == items(fp32) == 2
    assert 0.45 < folder_bytes(bf16) / folder_bytes(fp32) < 0.55
    assert Encoder(pipe, tmp_path, "bf16").text_entry_bytes(CPU) * 2 == Encoder(pipe, tmp_path).text_entry_bytes(CPU)


def folder_bytes(folder):
    """Bytes of the entries' tensors in a store's SQLite shards (file sizes move in pages)."""
    total = 0
    for shard in folder.rglob("shard-*.sqlite"):
        connection = sqlite3.connect(shard)
        try:
            total += sum(length for (length,) in connection.execute("SELECT length(data) FROM items"))
        finally:
            connection.close()
    return total


def test_changed_weights_get_their_own_cache(pipe, tmp_path):
    before = Encoder(pipe, tmp_path).latents.folder
    with torch.no_grad():
        pipe.vae.encoder.conv_in.bias.add_(1e-3)
    try:
        assert Encoder(pipe, tmp_path).latents.folder != before
    finally:
        with torch.no_grad():
            pipe.vae.encoder.conv_in.bias.sub_(1e-3)
    assert Encoder(pipe, tmp_path).latents.folder == before


def test_a_new_decoding_gets_its_own_cache(pipe, images, tmp_path, monkeypatch):
    """Latents are keyed by an image's bytes: when a release changes the pixels a file decodes to (16-bit
    greyscale was clipped, now scaled), DECODE_VERSION moves and a warm cache's moments are not reused."""
    counter = CallCounter(pipe.vae.encode)
    monkeypatch.setattr(pipe.vae, "encode", counter)
    plans = [plan_augmentation(Image.open(p).size, 64, False, False, random.Random(0)) for p in images]
    posterior(Encoder(pipe, tmp_path), images, plans)
    monkeypatch.setattr(encoding, "DECODE_VERSION", encoding.DECODE_VERSION + 1)
    posterior(Encoder(pipe, tmp_path), images, plans)
    assert counter.calls == 2 and len(list((tmp_path / "latents").iterdir())) == 2


def test_each_caption_is_encoded_once(pipe, tmp_path, monkeypatch):
    counter = CallCounter(pipe.encode_prompt)
    monkeypatch.setattr(pipe, "encode_prompt", counter)
    cached = Encoder(pipe, tmp_path)
    embeds, pooled = cached.text(["a red circle", "", "a red circle"], CPU)
    assert counter.calls == 1 and pooled is None and items(tmp_path / "text") == 2
    assert torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    again, _ = Encoder(pipe, tmp_path).text(["", "a red circle"], CPU)
    assert counter.calls == 1 and torch.equal(again, embeds[[1, 0]])
    fresh, _ = Encoder(pipe, None).text(["a red circle", "", "a red circle"], CPU)
    assert counter.calls == 2 and torch.allclose(fresh, embeds, atol=1e-6)


def test_sdxl_text_cache_keeps_the_pooled_embeddings(tmp_path):
    xl = load_pipeline("tiny-xl")
    embeds, pooled = Encoder(xl, tmp_path).text(["a blue square", "a red circle"], CPU)
    again, again_pooled = Encoder(xl, tmp_path).text(["a blue square", "a red circle"], CPU)
    reference = xl.encode_prompt(["a blue square", "a red circle"], device=CPU, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    assert torch.allclose(embeds, reference[0], atol=1e-6) and torch.allclose(pooled, reference[2], atol=1e-6)
    assert torch.equal(again, embeds) and torch.equal(again_pooled, pooled)
