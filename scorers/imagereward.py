"""ImageReward (Xu et al., 2023) on transformers' BLIP classes, loading the original ``ImageReward.pt``.

Architecture of the original: BLIP ViT-L/16 image encoder at 224 px; a BERT text encoder (BLIP's "med"
BertModel, no pooler) that cross-attends to all image tokens; its [CLS] output goes into the MLP
768-1024-128-64-16-1; reward = (mlp - 0.16717362830052426) / 1.0333394966054072. Text: bert-base-uncased
with BLIP's added tokens ([DEC] as bos, [ENC]), padded/truncated to 35 tokens. Images: resize the shortest
side to 224 (bicubic), centre crop, OpenAI CLIP mean/std.

The checkpoint is mapped key by key onto ``BlipVisionModel`` / ``BlipTextModel``: every key is used, or
named below as unused by inference; anything else is an error, and each part loads strictly.
"""

from __future__ import annotations

import json
import re

import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from rlaif.cache import hub_file
from rlaif.files import content_identity
from rlaif.scorers.aesthetic import AestheticHead
from rlaif.scorers.openclip_common import OPENAI_MEAN, OPENAI_STD, pixel_batch
from rlaif.scoring import unique_prompts

REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER = "bert-base-uncased"
IMAGE_SIZE = 224
MAX_TOKENS = 35
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
VIT_HEAD_DIM = 64  # BLIP's ViT-B and ViT-L both use 64-dimensional heads
VIT_LAYER_NORM_EPS = 1e-6
# Keys of ImageReward.pt that inference does not use (BLIP's contrastive projections, a position-id buffer).
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
VISION_RENAMES = (  # original BLIP ViT (timm layout) -> transformers BlipVisionModel
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^norm\.", "post_layernorm."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
)


def _vision_key(key: str) -> str:
    for pattern, replacement in VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise ValueError(f"unexpected key 'blip.visual_encoder.{key}' in {CHECKPOINT}")


def split_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split ImageReward.pt into state dicts for the vision model, the text model and the MLP head."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    for key, value in state.items():
        if key.startswith(UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            parts["vision"][_vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            parts["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            parts["mlp"][key.removeprefix("mlp.")] = value
        else:
            raise ValueError(f"unexpected key {key!r} in {CHECKPOINT}")
    return parts


def vision_config(vision: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """The BLIP ViT's configuration, read off the checkpoint's shapes."""
    hidden = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    layers = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    return BlipVisionConfig(
        hidden_size=hidden, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=hidden // VIT_HEAD_DIM, patch_size=patch,
        image_size=IMAGE_SIZE, layer_norm_eps=VIT_LAYER_NORM_EPS, hidden_act="gelu",
    )


def text_config(med: dict, encoder_width: int) -> BlipTextConfig:
    """BLIP's med BertConfig as a BlipTextConfig; the image width is the ViT's, as BLIP sets it."""
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med.get("pad_token_id", 0),
        hidden_dropout_prob=med["hidden_dropout_prob"],
        attention_probs_dropout_prob=med["attention_probs_dropout_prob"],
    )


def blip_tokenizer(source: str = TOKENIZER) -> BertTokenizer:
    """bert-base-uncased with the two tokens BLIP adds: [DEC] as bos and [ENC]."""
    tokenizer = BertTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward:
    name = "imagereward"

    def __init__(self, device: str | torch.device = "cpu", repo: str = REPO, tokenizer: str = TOKENIZER) -> None:
        self.device = torch.device(device)
        checkpoint = hub_file(repo, CHECKPOINT)
        self.identity = content_identity(checkpoint)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        with open(hub_file(repo, MED_CONFIG)) as file:
            med = json.load(file)
        parts = split_checkpoint(state)
        self.vision = BlipVisionModel(vision_config(parts["vision"]))
        self.vision.load_state_dict(parts["vision"], strict=True)
        self.text = BlipTextModel(text_config(med, self.vision.config.hidden_size), add_pooling_layer=False)
        self.text.load_state_dict(parts["text"], strict=True)
        self.mlp = AestheticHead(self.text.config.hidden_size)
        self.mlp.load_state_dict(parts["mlp"], strict=True)
        for module in (self.vision, self.text, self.mlp):
            module.eval().to(self.device)
        self.tokenizer = blip_tokenizer(tokenizer)
        self.preprocess = Compose([Resize(IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC),
                                   CenterCrop(IMAGE_SIZE), ToTensor(), Normalize(OPENAI_MEAN, OPENAI_STD)])

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        distinct, index = unique_prompts(prompts)
        text = self.tokenizer(distinct, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(self.device)
        index = index.to(self.device)
        image_embeds = self.vision(pixel_values=pixel_batch(images, self.preprocess, self.device)).last_hidden_state
        output = self.text(
            input_ids=text.input_ids[index], attention_mask=text.attention_mask[index],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            is_decoder=False,
        )
        rewards = self.mlp(output.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (rewards - REWARD_MEAN) / REWARD_STD


def imagereward(device: str | torch.device = "cpu", repo: str = REPO, tokenizer: str = TOKENIZER) -> ImageReward:
    """ImageReward v1.0: human preference (ImageRewardDB), BLIP ViT-L + cross-attending BERT, normalised.
    Weights: 1.8 GB from the hub, fetched once."""
    return ImageReward(device, repo, tokenizer)
