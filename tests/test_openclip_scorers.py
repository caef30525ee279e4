"""HPSv2 / HPSv2.1, CLIP score and LAION aesthetics through their real loaders on a tiny random OpenCLIP
model in the original file formats, against independent computations of each formula and preprocessing."""

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from conftest import TEST_DATA, install_in_hf_cache
from PIL import Image

from rlaif.cache import cache_dir
from rlaif.errors import RlaifError
from rlaif.scorers.aesthetic import HEAD_FILE, load_head
from rlaif.scorers.hps import CHECKPOINTS, REPO
from rlaif.scoring import LoadedScorer

ARCH = "rlaif-tiny-clip"
SIZE = 32
MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)
# Non-square, square, tall and exactly-224-longest images; prompts repeat to exercise the per-prompt cache.
SHAPES = [(48, 80), (64, 64), (90, 40), (20, 32)]
PROMPTS = ["a red circle", "a large blue square on a white background", "a red circle", "green"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny OpenCLIP architecture (768-d embeddings, as ViT-L/14) registered by config, random weights."""
    folder = tmp_path_factory.mktemp("openclip")
    config = {"embed_dim": 768, "quick_gelu": True,
              "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (folder / f"{ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    return model, folder


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SHAPES]


def to_pixels(image: Image.Image) -> torch.Tensor:
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def shortest_side_crop(image: Image.Image) -> Image.Image:
    """Resize the shortest side to SIZE (bicubic, torchvision's size rule) and centre-crop SIZE x SIZE."""
    w, h = image.size
    if w <= h:
        size = (SIZE, int(SIZE * h / w))
    else:
        size = (int(SIZE * w / h), SIZE)
    resized = image.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - SIZE) / 2.0)), int(round((size[1] - SIZE) / 2.0))
    return resized.crop((left, top, left + SIZE, top + SIZE))


def longest_side_pad(image: Image.Image) -> torch.Tensor:
    """HPS's evaluation transform (hpsv2/src/open_clip/transform.py): ToTensor, then ResizeMaxSize on the float
    tensor (longest side to SIZE, bicubic; skipped if already SIZE), zero padding centred, then normalisation."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    height, width = pixels.shape[1:]
    scale = SIZE / max(height, width)
    if scale != 1.0:
        height, width = round(height * scale), round(width * scale)
        pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bicubic",
                                                 align_corners=False, antialias=True)[0]
    pad_h, pad_w = SIZE - height, SIZE - width
    pixels = torch.nn.functional.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return ((pixels - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None])[None]


def cosine(model, pixels: torch.Tensor, prompt: str) -> float:
    with torch.no_grad():
        image = model.encode_image(pixels)[0]
        text = model.encode_text(open_clip.get_tokenizer(ARCH)([prompt]))[0]
        return float(image @ text / (image.norm() * text.norm()))


@pytest.mark.parametrize("version", ["hpsv2", "hpsv2.1"])
def test_hps_matches_reference_formula(tiny_clip, images, tmp_path, version):
    model, _ = tiny_clip
    (tmp_path / "repo").mkdir()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "repo" / CHECKPOINTS[version])
    install_in_hf_cache(REPO, tmp_path / "repo")
    scorer = LoadedScorer(version, arch=ARCH)
    got = scorer(images, PROMPTS)
    expected = [cosine(model, longest_side_pad(im), p) for im, p in zip(images, PROMPTS, strict=True)]
    # Cosines (|v| <= 1) of 768-d float32 embeddings from 2-layer, 32-wide towers: rounding ~ sqrt(768) * u ~ 2e-6
    # (u = 2**-24; worst case 768 * u = 5e-5); seen 2e-8. The four scores differ by > 4e-3.
    assert got == pytest.approx(expected, abs=1e-5)
    assert len({round(v, 5) for v in got}) == 4


def test_hps_checkpoint_must_match_strictly(tiny_clip, tmp_path):
    model, _ = tiny_clip
    state = dict(model.state_dict())
    state.pop("logit_scale")
    (tmp_path / "repo").mkdir()
    torch.save({"state_dict": state}, tmp_path / "repo" / CHECKPOINTS["hpsv2"])
    install_in_hf_cache(REPO, tmp_path / "repo")
    with pytest.raises(Exception, match="logit_scale"):
        LoadedScorer("hpsv2", arch=ARCH)


def test_clip_score_matches_formula(tiny_clip, images, tmp_path):
    model, _ = tiny_clip
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    scorer = LoadedScorer("clip", arch=ARCH, pretrained=str(tmp_path / "open_clip_pytorch_model.bin"))
    got = scorer(images, PROMPTS)
    expected = [max(100 * cosine(model, to_pixels(shortest_side_crop(im)), p), 0.0)
                for im, p in zip(images, PROMPTS, strict=True)]
    assert got == pytest.approx(expected, abs=1e-3)  # 100 x cosine: 100 x the HPS bound above (seen 1.4e-6)


def test_real_aesthetic_head_loads_strictly():
    head = load_head(str(TEST_DATA / HEAD_FILE))
    assert [tuple(head.layers[i].weight.shape) for i in (0, 2, 4, 6, 7)] == [(1024, 768), (128, 1024), (64, 128),
                                                                             (16, 64), (1, 16)]


def test_aesthetic_matches_formula_with_the_real_head(tiny_clip, images, tmp_path):
    model, _ = tiny_clip
    target = cache_dir() / "downloads" / HEAD_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEST_DATA / HEAD_FILE, target)
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    scorer = LoadedScorer("aesthetic", arch=ARCH, pretrained=str(tmp_path / "weights.bin"))
    got = scorer(images, PROMPTS)
    state = torch.load(TEST_DATA / HEAD_FILE, map_location="cpu", weights_only=True)
    expected = []
    for image in images:
        with torch.no_grad():
            x = model.encode_image(to_pixels(shortest_side_crop(image)))[0]
        x = x / x.norm()
        for i in (0, 2, 4, 6, 7):  # linear layers only: dropout is off at inference, there are no activations
            x = state[f"layers.{i}.weight"] @ x + state[f"layers.{i}.bias"]
        expected.append(float(x[0]))
    # Scores ~4 through 5 float32 layers (n <= 1024) from a unit vector: ~ sqrt(5) * sqrt(1024) * u ~ 4e-6 of the
    # score, 2e-5 (seen 5e-7); the four scores differ by > 6e-3.
    assert got == pytest.approx(expected, abs=1e-4)
    assert len({round(v, 4) for v in got}) == 4


def test_a_scorer_missing_from_the_offline_cache_says_how_to_get_it():
    with pytest.raises(RlaifError) as error:
        LoadedScorer("clip")  # its OpenAI CLIP weights were never put in the tests' Hugging Face cache
    assert str(error.value).startswith("scorer 'clip' failed to load: Failed to download weights")
    assert str(error.value).endswith("; HF_HUB_OFFLINE is set: load it once while online (or unset HF_HUB_OFFLINE)")


@pytest.mark.parametrize(("name", "file"), [("hpsv2", "HPS_v2_compressed.pt"), ("imagereward", "ImageReward.pt")])
def test_a_checkpoint_missing_offline_is_named_with_its_repository(name, file):
    """huggingface_hub's own error names no file (a new user's trial); the scorers' checkpoints are named."""
    with pytest.raises(RlaifError) as error:
        LoadedScorer(name, repo="someone/absent")
    assert str(error.value) == (f"scorer '{name}' failed to load: {file} of someone/absent is not in the local Hugging "
                                "Face cache; HF_HUB_OFFLINE is set: load it once while online (or unset "
                                "HF_HUB_OFFLINE)")


def test_a_transformers_scorer_missing_offline_names_the_repository_in_one_short_line():
    with pytest.raises(RlaifError) as error:
        LoadedScorer("label_plugins:uncached_processor")
    assert str(error.value) == ("scorer 'label_plugins:uncached_processor' failed to load: Can't load image processor "
                                "for 'org/name'; HF_HUB_OFFLINE is set: if these files are not in the local Hugging "
                                "Face cache, load it once while online (or unset HF_HUB_OFFLINE)")


def test_weights_trained_with_quick_gelu_load_with_it(tiny_clip, tmp_path, monkeypatch):
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip >= 2.29 builds ViT-L-14 with plain GELU and
    loads them anyway (a warning), so `clip` and `aesthetic` embedded every image otherwise than the originals.
    Here a tiny architecture without quick_gelu, and a tag (as open_clip records OpenAI's) saying its weights
    need it: the loaded model must compute what the QuickGELU model that made the weights computes."""
    from rlaif.scorers.openclip_common import load_pretrained

    model, folder = tiny_clip
    config = json.loads((folder / f"{ARCH}.json").read_text())
    del config["quick_gelu"]
    plain = f"{ARCH}-plain-gelu"
    (tmp_path / f"{plain}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{plain}.json")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    tag = {"file": str(tmp_path / "weights.pt"), "quick_gelu": True, "mean": tuple(MEAN.tolist()),
           "std": tuple(STD.tolist()), "interpolation": "bicubic", "resize_mode": "shortest"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, plain, {"openai": tag})
    loaded, _ = load_pretrained(plain, "openai", torch.device("cpu"))
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(pixels), model.encode_image(pixels), atol=1e-6)
