import hashlib

import torch

from rlaif.sample import plan_batches, plan_jobs
from rlaif.seeding import generator, image_seed


def test_image_seed_is_sha256_of_its_inputs():
    digest = hashlib.sha256(b"7\x003\x00a red circle").digest()
    assert image_seed(7, "a red circle", 3) == int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_image_seed_changes_with_each_input():
    base = image_seed(0, "p", 0)
    assert len({base, image_seed(1, "p", 0), image_seed(0, "q", 0), image_seed(0, "p", 1)}) == 4


def test_seeds_do_not_depend_on_the_prompt_list_or_batching():
    alone = {j.sample_id: j.seed for j in plan_jobs(["b"], 3, run_seed=5)}
    among = {j.sample_id: j.seed for j in plan_jobs(["a", "b", "c"], 3, run_seed=5)}
    assert alone.items() <= among.items()
    jobs = plan_jobs(["a", "b", "c"], 3, run_seed=5)
    assert [j for batch in plan_batches(jobs, 4) for j in batch] == jobs
    assert [len(b) for b in plan_batches(jobs, 4)] == [4, 4, 1]


def test_generator_is_cpu_and_reproducible():
    assert torch.equal(torch.randn(3, generator=generator(11)), torch.randn(3, generator=generator(11)))
    assert generator(1).device.type == "cpu"
