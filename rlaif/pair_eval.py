"""``rlaif eval --pairs TABLE``: how often a tuned model ranks a pairs table's winners first, read as the DPO
paper reads it (the model against its reference, as an implicit preference classifier), beside how often each
scorer agrees with the same labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from rlaif.config import TrainConfig
from rlaif.distributed import cpu_only
from rlaif.images import open_rgb
from rlaif.models import default_size, denoiser, load_pipeline
from rlaif.scoring import LoadedScorer, parse_options
from rlaif.train.batches import BatchSettings, MicroBatches
from rlaif.train.encoding import Encoder, latent_shape
from rlaif.train.objective import FLUX_TRAIN_GUIDANCE, objective_for
from rlaif.train.outputs import (
    apply_tuned,
    check_output,
    check_trained_from,
    is_full,
    train_info,
    trained_config,
    trained_tables,
)
from rlaif.train.pair_table import PairTable, table_changed
from rlaif.train.trainer import frozen_dtypes, held_out_metrics, settings_then


@dataclass(frozen=True)
class PairAccuracy:
    """One judge of a pairs table: the share of pairs whose labelled winner it prefers (a tie counts half)."""

    judge: str
    pairs: int
    accuracy: float
    labels: str  # the table's label column judged against
    margin: float | None = None  # the DPO reward margin (tuned model only)
    ties: int = 0  # the table's pairs labelled 0.5, which no judge is asked about
    unlabelled: int = 0  # and its pairs without a label
    same_images: int = 0  # and its pairs of one picture twice (Pick-a-Pic's are_different false)


def trained_table(tuned: Path, pairs: str) -> str | None:
    """Whether ``pairs`` is a table ``tuned`` was trained on, its own or one of its --init chain's, for reading its
    accuracy (what it learnt, or how it generalises): "the table it was trained on" (or "... trained on through
    --init"), with ", changed since" when its files are no longer the ones train.json records; None for another
    table."""
    found = _learnt_from(tuned, pairs, train_info(tuned))
    return found[1] if found else None


def trained_table_remarks(tuned: Path, pairs: str, labels: str) -> list[str]:
    """What `eval --pairs` says after judging ``pairs`` against column ``labels`` when ``tuned`` learnt from that
    table: the accuracy there says what it learnt (less the pairs its own run held out), and, for its own table,
    which label column it trained on when that is another. Nothing for another table."""
    info = train_info(tuned)
    found = _learnt_from(tuned, pairs, info)
    if found is None:
        return []
    own, described = found
    recorded = info if own else {}  # an --init table's held-out pairs and labels are its run's, not recorded here
    held_out = recorded.get("pairs_held_out") or 0
    some = (f" (all but the {held_out} pairs it held out by caption, whose accuracy its log gives as the held-out "
            "accuracy)" if held_out else "")
    remarks = [f"{pairs} is {described} ({tuned}): on the pairs it trained on{some}, accuracy says what it learnt, "
               "not how it generalises"]
    if recorded.get("label_column") not in (None, labels):
        remarks.append(f"note: it trained on the labels of column {recorded['label_column']}, not {labels}; pass "
                       f"--label-column {recorded['label_column']} to judge against those")
    return remarks


def _learnt_from(tuned: Path, pairs: str, info: dict) -> tuple[bool, str] | None:
    """Whether ``pairs`` is among the tables ``tuned`` (its train.json ``info``) learnt from: (its own table rather
    than one of its --init chain's, ``trained_table``'s description), else None."""
    path = Path(pairs)
    named = str(path.resolve()) if path.exists() else pairs  # as train.json records it: a hub id or URL as given
    for number, table in enumerate(trained_tables(info)):
        if table["pairs"] == named:
            changed = path.exists() and table_changed(pairs, table["pairs_file"])  # a hub id's or URL's: unknown
            return not number, ("the table it was trained on" + (" through --init" if number else "")
                                + (", changed since" if changed else ""))
    return None


def judged_batches(pairs: int, max_pairs: int, batch_size: int, processes: int = 1
                   ) -> tuple[int, int, int]:
    """(pairs judged, batch size, shares): ``max_pairs`` of ``pairs`` (all, if fewer), split into ``processes``
    equal shares when they divide them (else every process judges them all: the same pairs whatever the processes),
    in equal batches of the largest size up to ``batch_size`` that divides a share, so no pair is left out and every
    batch weighs alike."""
    count = min(pairs, max_pairs)
    shares = processes if count % processes == 0 else 1
    return count, max(size for size in range(1, batch_size + 1) if count // shares % size == 0), shares


def _dpo_accuracy(config: TrainConfig, tuned: Path, base: str, trained: dict, table: PairTable, count: int,
                  batch_size: int, shares: int, accelerator: Accelerator) -> tuple[float, float]:
    """The tuned model's DPO implicit accuracy and reward margin on the first ``count`` pairs of ``table``, each
    process judging its own of ``shares`` (1: every process all of them)."""
    if is_full(tuned):  # two networks: the tuned one, and the base as its reference
        policy = load_pipeline(base, "fp32", accelerator.device, tuned=tuned)
        reference = denoiser(load_pipeline(base, "fp32", accelerator.device))
    else:  # one network, as in training: the LoRA unfused, the reference the same network with it switched off
        policy = load_pipeline(base, "fp32", accelerator.device, component_dtypes=frozen_dtypes(config))
        apply_tuned(policy, tuned, fuse=False)
        reference = None
    resolution = trained["resolution"] or default_size(policy)
    objective = objective_for(policy, config.flow_weighting,  # FLUX.1-dev: the distilled guidance it trained at
                              train_info(tuned).get("distilled_guidance", FLUX_TRAIN_GUIDANCE))
    rank = accelerator.process_index if shares > 1 else 0
    settings = BatchSettings(0, batch_size, shares, rank, resolution, False, False, 0.0,
                             latent_shape(policy, resolution), objective.timesteps, shuffle=False,
                             weighting=objective.weighting,
                             noise_range=(trained["min_noise"], trained["max_noise"]))  # where it was trained
    encoder = Encoder(policy, None, max_sequence_length=config.max_sequence_length)
    metrics = held_out_metrics(config, MicroBatches(table, settings, None), encoder,
                               denoiser(policy), reference, objective, resolution, accelerator, count)
    return metrics["val_implicit_acc"], metrics["val_reward_margin"]


def run_pairs_eval(base: str, tuned: Path, pairs: str, scorers: list[str], scorer_options: list[str],
                   max_pairs: int = 512, batch_size: int = 4, label: str | None = None) -> list[PairAccuracy]:
    """Judge ``max_pairs`` pairs of ``pairs`` (spread over the table: ``PairTable.spread``) with the tuned model against
    the plain ``base`` model as its reference (the beta, loss and precision it was trained with, a LoRA's frozen
    weights included; centre crop, no caption dropout, fixed noise and timesteps per pair) and with each scorer."""
    tuned = check_output(tuned)
    check_trained_from(tuned, base)
    trained = settings_then(trained_config(tuned))
    table = PairTable(pairs, label)
    accelerator = Accelerator(cpu=cpu_only())
    count, batch_size, shares = judged_batches(len(table), max_pairs, batch_size, accelerator.num_processes)
    table = table.spread(count)
    config = TrainConfig(pairs=pairs, model=base, out=tuned, loss=trained["loss"],
                         beta=None if trained["loss"] == "sft" else trained["beta"],
                         dpo_positive=trained["dpo_positive"], mixed_precision=trained["mixed_precision"],
                         flow_weighting=trained["flow_weighting"], max_sequence_length=trained["max_sequence_length"])
    left_out = {"ties": table.ties, "unlabelled": table.unlabelled, "same_images": table.same_images}
    if config.loss == "sft":  # no reference model: the DPO classifier does not exist, nothing to load
        found = [PairAccuracy("tuned model: no DPO implicit accuracy (trained with --loss sft, without a reference "
                              "model)", count, float("nan"), table.label, **left_out)]
    else:
        accuracy, margin = (_dpo_accuracy(config, tuned, base, trained, table, count, batch_size, shares, accelerator)
                            if count else (float("nan"), None))
        found = [PairAccuracy("tuned model (DPO implicit accuracy)", count, accuracy, table.label, margin, **left_out)]
    share = count // shares
    first = share * accelerator.process_index if shares > 1 else 0
    judged = [table[position] for position in range(first, first + share)]
    options = parse_options(scorer_options)
    for spec in scorers:
        scorer = LoadedScorer(spec, device=accelerator.device, **options.get(spec, {}))
        agree = 0.0
        for start in range(0, share, batch_size):
            batch = judged[start:start + batch_size]
            images = [open_rgb(p.chosen, p.chosen_name) for p in batch] + \
                [open_rgb(p.rejected, p.rejected_name) for p in batch]
            names = [p.chosen_name for p in batch] + [p.rejected_name for p in batch]
            scores = torch.as_tensor(scorer(images, [p.caption for p in batch] * 2, names), dtype=torch.float64)
            chosen, rejected = scores[: len(batch)], scores[len(batch):]
            agree += float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
        if shares > 1:  # a count of halves: exact in float64
            agree = float(accelerator.reduce(torch.tensor([agree], dtype=torch.float64, device=accelerator.device),
                                             "sum")[0])
        found.append(PairAccuracy(f"scorer {spec}", count, agree / count if count else float("nan"), table.label,
                                  **left_out))
        del scorer
    return found
