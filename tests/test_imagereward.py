"""ImageReward: a tiny random checkpoint in the original ImageReward.pt key layout (BLIP ViT in timm layout,
BLIP's med BERT, MLP head), loaded through the real loader from a Hugging Face cache, against a forward pass
written independently from the original code's structure."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import install_in_hf_cache
from PIL import Image
from transformers import BertTokenizer

from rlaif.scorers.imagereward import CHECKPOINT, MED_CONFIG, REPO, TOKENIZER, split_checkpoint
from rlaif.scoring import LoadedScorer

VIT_WIDTH, VIT_DEPTH, VIT_HEADS, PATCH = 128, 2, 2, 16  # 64-dim heads, as BLIP's ViTs
TEXT_WIDTH, TEXT_HEADS, TEXT_FFN = 768, 12, 96  # 768 because the MLP head takes 768 features
WORDS = ["a", "red", "circle", "on", "blue", "background", "dog", "large", "square", "green"]
MEAN, STD = np.array((0.48145466, 0.4578275, 0.40821073)), np.array((0.26862954, 0.26130258, 0.27577711))


def original_checkpoint(vocab: int) -> dict[str, torch.Tensor]:
    """Random tensors under the original key names and shapes (BLIP_Pretrain + MLP of ImageReward.py)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    state = {
        "blip.visual_encoder.cls_token": rand(1, 1, VIT_WIDTH),
        "blip.visual_encoder.pos_embed": rand(1, (224 // PATCH) ** 2 + 1, VIT_WIDTH),
        "blip.visual_encoder.patch_embed.proj.weight": rand(VIT_WIDTH, 3, PATCH, PATCH),
        "blip.visual_encoder.patch_embed.proj.bias": rand(VIT_WIDTH),
        "blip.visual_encoder.norm.weight": 1 + rand(VIT_WIDTH), "blip.visual_encoder.norm.bias": rand(VIT_WIDTH),
        "blip.vision_proj.weight": rand(256, VIT_WIDTH), "blip.vision_proj.bias": rand(256),
        "blip.text_proj.weight": rand(256, TEXT_WIDTH), "blip.text_proj.bias": rand(256),
        "blip.text_encoder.embeddings.position_ids": torch.arange(512).expand(1, -1),
        "blip.text_encoder.embeddings.word_embeddings.weight": rand(vocab, TEXT_WIDTH, scale=1.0),
        "blip.text_encoder.embeddings.position_embeddings.weight": rand(512, TEXT_WIDTH, scale=0.2),
        "blip.text_encoder.embeddings.LayerNorm.weight": 1 + rand(TEXT_WIDTH),
        "blip.text_encoder.embeddings.LayerNorm.bias": rand(TEXT_WIDTH),
    }
    for i in range(VIT_DEPTH):
        p = f"blip.visual_encoder.blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = 1 + rand(VIT_WIDTH), rand(VIT_WIDTH)
        for name, out, inp in [("attn.qkv", 3 * VIT_WIDTH, VIT_WIDTH), ("attn.proj", VIT_WIDTH, VIT_WIDTH),
                               ("mlp.fc1", 4 * VIT_WIDTH, VIT_WIDTH), ("mlp.fc2", VIT_WIDTH, 4 * VIT_WIDTH)]:
            state[p + name + ".weight"], state[p + name + ".bias"] = rand(out, inp), rand(out)
    p = "blip.text_encoder.encoder.layer.0."
    linears = [("attention.self.query", TEXT_WIDTH, TEXT_WIDTH), ("attention.self.key", TEXT_WIDTH, TEXT_WIDTH),
               ("attention.self.value", TEXT_WIDTH, TEXT_WIDTH), ("attention.output.dense", TEXT_WIDTH, TEXT_WIDTH),
               ("crossattention.self.query", TEXT_WIDTH, TEXT_WIDTH),
               ("crossattention.self.key", TEXT_WIDTH, VIT_WIDTH),
               ("crossattention.self.value", TEXT_WIDTH, VIT_WIDTH),
               ("crossattention.output.dense", TEXT_WIDTH, TEXT_WIDTH),
               ("intermediate.dense", TEXT_FFN, TEXT_WIDTH), ("output.dense", TEXT_WIDTH, TEXT_FFN)]
    for name, out, inp in linears:
        state[p + name + ".weight"], state[p + name + ".bias"] = rand(out, inp, scale=0.2), rand(out)
    for norm in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
        state[p + norm + ".weight"], state[p + norm + ".bias"] = 1 + rand(TEXT_WIDTH), rand(TEXT_WIDTH)
    for i, (out, inp) in zip((0, 2, 4, 6, 7), [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)], strict=True):
        state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"] = rand(out, inp, scale=0.2), rand(out)
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizer(str(folder / "tokenizer" / "vocab.txt")).save_pretrained(folder / "tokenizer")
    tokenizer = BertTokenizer.from_pretrained(folder / "tokenizer")
    vocab = len(tokenizer) + 2  # BLIP adds [DEC] and [ENC]
    state = original_checkpoint(vocab)
    (folder / "repo").mkdir()
    torch.save(state, folder / "repo" / CHECKPOINT)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": TEXT_WIDTH, "initializer_range": 0.02,
           "intermediate_size": TEXT_FFN, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
           "model_type": "bert", "num_attention_heads": TEXT_HEADS, "num_hidden_layers": 1, "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": vocab, "encoder_width": 768, "add_cross_attention": True}
    (folder / "repo" / MED_CONFIG).write_text(json.dumps(med))
    install_in_hf_cache(REPO, folder / "repo")
    install_in_hf_cache(TOKENIZER, folder / "tokenizer")
    return state, tokenizer


def reference_reward(state, tokenizer, image: Image.Image, prompt: str) -> float:
    """ImageReward.score() for one image, from the original structure: timm ViT, med BERT, MLP. In float64, so
    that the comparison measures only the scorer's float32 rounding."""
    w, h = image.size
    size = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    resized = image.convert("RGB").resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    pixels = (np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float64) / 255 - MEAN) / STD
    x = torch.from_numpy(pixels).double().permute(2, 0, 1)[None]
    s = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    v = "blip.visual_encoder."
    x = F.conv2d(x, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[v + "cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + s[v + "pos_embed"]
    for i in range(VIT_DEPTH):
        b = f"{v}blocks.{i}."
        y = F.layer_norm(x, (VIT_WIDTH,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        q, k, val = F.linear(y, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).reshape(
            1, -1, 3, VIT_HEADS, VIT_WIDTH // VIT_HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (VIT_WIDTH // VIT_HEADS) ** -0.5).softmax(-1)
        y = (attn @ val).transpose(1, 2).reshape(1, -1, VIT_WIDTH)
        x = x + F.linear(y, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        y = F.layer_norm(x, (VIT_WIDTH,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])),
                     s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
        x = x + y
    image_embeds = F.layer_norm(x, (VIT_WIDTH,), s[v + "norm.weight"], s[v + "norm.bias"], eps=1e-6)

    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    t = "blip.text_encoder."
    e = (s[t + "embeddings.word_embeddings.weight"][ids.input_ids[0]]
         + s[t + "embeddings.position_embeddings.weight"][:35])
    hidden = F.layer_norm(e, (TEXT_WIDTH,), s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"],
                          eps=1e-12)[None]
    mask = (1.0 - ids.attention_mask[:, None, None, :].double()) * -10000.0
    d = TEXT_WIDTH // TEXT_HEADS
    p = f"{t}encoder.layer.0."

    def attention(prefix, query_in, key_in, bias):
        def heads(z):
            return z.reshape(1, -1, TEXT_HEADS, d).transpose(1, 2)
        q = heads(F.linear(query_in, s[prefix + "self.query.weight"], s[prefix + "self.query.bias"]))
        k = heads(F.linear(key_in, s[prefix + "self.key.weight"], s[prefix + "self.key.bias"]))
        val = heads(F.linear(key_in, s[prefix + "self.value.weight"], s[prefix + "self.value.bias"]))
        context = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + bias).softmax(-1) @ val
        out = F.linear(context.transpose(1, 2).reshape(1, -1, TEXT_WIDTH), s[prefix + "output.dense.weight"],
                       s[prefix + "output.dense.bias"])
        return F.layer_norm(out + query_in, (TEXT_WIDTH,), s[prefix + "output.LayerNorm.weight"],
                            s[prefix + "output.LayerNorm.bias"], eps=1e-12)

    hidden = attention(p + "attention.", hidden, hidden, mask)
    hidden = attention(p + "crossattention.", hidden, image_embeds, 0.0)
    ffn = F.linear(F.gelu(F.linear(hidden, s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"])),
                   s[p + "output.dense.weight"], s[p + "output.dense.bias"])
    hidden = F.layer_norm(ffn + hidden, (TEXT_WIDTH,), s[p + "output.LayerNorm.weight"],
                          s[p + "output.LayerNorm.bias"], eps=1e-12)
    z = hidden[0, 0]
    for i in (0, 2, 4, 6, 7):
        z = F.linear(z, s[f"mlp.layers.{i}.weight"], s[f"mlp.layers.{i}.bias"])
    return float((z[0] - 0.16717362830052426) / 1.0333394966054072)


def test_imagereward_matches_the_original_structure(checkpoint):
    state, tokenizer = checkpoint
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
              [(240, 320), (224, 224), (300, 200)]]
    prompts = ["a red circle on a blue background", "a large green dog", "a red circle on a blue background"]
    got = LoadedScorer("imagereward")(images, prompts)
    with torch.no_grad():
        expected = [reference_reward(state, tokenizer, im, p) for im, p in zip(images, prompts, strict=True)]
    # Tolerance from a float32 error analysis. Each score ends a chain of L ~ 30 reductions (ViT blocks, BERT
    # layer, MLP head) over up to n = 1024 terms. One reduction's rounding error is ~ sqrt(n) * u of the magnitudes
    # it sums (u = 2**-24 = 6e-8; at most n * u whatever the CPU's order, blocking or FMA), and the layers' errors
    # add up like a random walk: a score is off by ~ sqrt(L) * sqrt(n) * u ~ 1e-5 of the scores' scale S = max|score|
    # (~45 here), small scores included (the sums behind them are as large). Seen: 4e-6 * S on one CPU, 1.1e-5 * S
    # on another. 1e-4 * S leaves 10x for other CPUs; what real bugs move (in units of S): tanh-approximate GELU in
    # the BERT layer 1.3e-4, REWARD_MEAN left out 3.6e-3, REWARD_STD = 1 3.3e-2, ImageNet mean/std 0.76.
    scale = max(abs(v) for v in expected)
    assert got == pytest.approx(expected, rel=0, abs=1e-4 * scale)
    assert len({round(v, 4) for v in got}) == 3


def test_every_checkpoint_key_is_accounted_for(checkpoint):
    state, _ = checkpoint
    with pytest.raises(ValueError, match="unexpected key 'blip.itm_head.weight'"):
        split_checkpoint({**state, "blip.itm_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key 'blip.visual_encoder.blocks.0.ls1.gamma'"):
        split_checkpoint({**state, "blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(1)})
    parts = split_checkpoint(state)
    used = sum(len(p) for p in parts.values())
    assert used == len(state) - 5  # vision_proj and text_proj (weight, bias) and the position_ids buffer
