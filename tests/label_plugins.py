"""Scorer plugins for the tests, loaded by ``module:attr`` (the tests put this folder on PYTHONPATH)."""

import os
import time

import numpy as np
import torch


class _Scorer:
    def __init__(self, fn):
        self.score = fn


def raising(device="cpu"):
    def score(images, prompts):
        raise RuntimeError("model exploded")
    return _Scorer(score)


def wrong_length(device="cpu"):
    return _Scorer(lambda images, prompts: [1.0] * (len(images) + 1))


def nan(device="cpu"):
    """NaN for the batch's fourth image only; the object calls itself by another name than the one registered."""
    scorer = _Scorer(lambda images, prompts: torch.arange(len(images), dtype=torch.float32).where(
        torch.arange(len(images)) != 3, float("nan")))
    scorer.name = "brightness"
    return scorer


def constant(device="cpu"):
    return _Scorer(lambda images, prompts: [1.0] * len(images))


def counting_brightness(device="cpu"):
    """Mean brightness, counting scored images in the file named by RLAIF_TEST_COUNT."""
    def score(images, prompts):
        with open(os.environ["RLAIF_TEST_COUNT"], "a") as log:
            log.write(f"{len(images)}\n")
        return torch.tensor([float(torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32)).mean())
                             for image in images])
    return _Scorer(score)


def channel_mean(device="cpu", channel="0"):
    """Mean of one RGB channel (an option), counting scored images in RLAIF_TEST_COUNT; its identity (the
    stand-in for a weights file) comes from RLAIF_TEST_WEIGHTS."""
    def score(images, prompts):
        with open(os.environ["RLAIF_TEST_COUNT"], "a") as log:
            log.write(f"{len(images)}\n")
        return [float(torch.from_numpy(np.asarray(image.getchannel(int(channel)), dtype=np.float32)).mean())
                for image in images]
    scorer = _Scorer(score)
    scorer.identity = os.environ.get("RLAIF_TEST_WEIGHTS", "")
    return scorer


def slow_brightness(device="cpu"):
    """Mean brightness after RLAIF_TEST_DELAY seconds per image (a stand-in for a large model's pace, so a test
    can kill a run part-way), counting scored images in RLAIF_TEST_COUNT."""
    def score(images, prompts):
        time.sleep(float(os.environ.get("RLAIF_TEST_DELAY", "0")) * len(images))
        with open(os.environ["RLAIF_TEST_COUNT"], "a") as log:
            log.write(f"{len(images)}\n")
        return [float(torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32)).mean()) for image in images]
    return _Scorer(score)


def recording_brightness(device="cpu"):
    """Mean brightness, writing "RANK PROMPT" for each scored image to the file named by RLAIF_TEST_COUNT (RANK:
    the torchrun process, 0 alone), so a test can see which process scored which rows."""
    def score(images, prompts):
        with open(os.environ["RLAIF_TEST_COUNT"], "a") as log:
            log.writelines(f"{os.environ.get('RANK', '0')} {prompt}\n" for prompt in prompts)
        return [float(np.asarray(image.convert("L"), dtype=np.float64).mean()) for image in images]
    return _Scorer(score)


def uncached_processor(device="cpu"):
    """Fails as transformers does for a processor that is not in the offline cache: a first sentence naming the
    repository, then advice for a mistyped name."""
    raise OSError("Can't load image processor for 'org/name'. If you were trying to load it from "
                  "'https://huggingface.co/models', make sure you don't have a local directory with the same name. "
                  "Otherwise, make sure 'org/name' is the correct path to a directory containing a "
                  "preprocessor_config.json file")
