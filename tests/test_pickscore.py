"""PickScore through the real loader (hub ids -> from_pretrained) on a tiny random CLIP in the original
layout, against an independent computation of the published formula and preprocessing."""

import numpy as np
import pytest
import torch
from conftest import install_in_hf_cache
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from rlaif.scorers.pickscore import IMAGE_PROCESSOR, MODEL, PROCESSOR
from rlaif.scoring import LoadedScorer
from rlaif.tiny import build_tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 32


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pickscore")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder / "processor")
    IMAGE_PROCESSOR(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, resample=3,
                    image_mean=OPENAI_MEAN, image_std=OPENAI_STD).save_pretrained(folder / "processor")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=SIZE, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=3.0))
    model.save_pretrained(folder / "model")
    model.config.save_pretrained(folder / "processor")  # the processor repo carries the model config too
    install_in_hf_cache(PROCESSOR, folder / "processor")
    install_in_hf_cache(MODEL, folder / "model")
    return model.eval(), tokenizer


def reference_score(model, tokenizer, image: Image.Image, prompt: str) -> float:
    """PickScore for one image, written from the formula: resize shortest side (bicubic), centre crop,
    OpenAI mean/std, projected CLIP embeddings, logit_scale.exp() * cosine."""
    w, h = image.size
    scale = SIZE / min(w, h)
    resized = image.convert("RGB").resize((max(SIZE, int(w * scale)), max(SIZE, int(h * scale))), Image.BICUBIC)
    left, top = (resized.width - SIZE) // 2, (resized.height - SIZE) // 2
    pixels = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255.0
    pixels = (pixels - np.array(OPENAI_MEAN, dtype=np.float32)) / np.array(OPENAI_STD, dtype=np.float32)
    with torch.no_grad():
        vision = model.vision_model(pixel_values=torch.from_numpy(pixels).permute(2, 0, 1)[None]).pooler_output
        image_emb = model.visual_projection(vision)[0]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        text_emb = model.text_projection(model.text_model(input_ids=ids).pooler_output)[0]
        cos = torch.dot(image_emb, text_emb) / (image_emb.norm() * text_emb.norm())
        return float(model.logit_scale.exp() * cos)


def test_pickscore_matches_the_formula_on_non_square_images(tiny_pickscore):
    model, tokenizer = tiny_pickscore
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
              [(48, 80), (64, 64), (90, 40), (48, 80)]]
    prompts = ["a red circle", "a large blue square on a white background", "a red circle", "green"]
    scorer = LoadedScorer("pickscore")
    got = scorer(images, prompts)
    expected = [reference_score(model, tokenizer, im, p) for im, p in zip(images, prompts, strict=True)]
    # logit_scale.exp() (= 20) x a cosine of float32 towers (~12 reductions, n <= 64): 20 * sqrt(12) * sqrt(64) * u
    # ~ 3e-5 (u = 2**-24; seen 6e-6 against float64); the scores differ by > 0.2.
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(set(np.round(got, 4))) == 4  # the scores really differ, so the check means something
