# Prompt sources and which prompts each rank samples in an epoch. Support code for train.py and evaluate.py.
import os

import torch

import toy
from support.seeding import make_generator


def load_prompts(source, limit=0):
    """toy:train, toy:test (the toy world's splits) or a text file (one prompt per line, # comments).

    limit N > 0 keeps N prompts evenly spaced over the source (the first N when it holds fewer than 2N):
    the toy grammar enumerates colours first, so its first N prompts would all be red."""
    if source.startswith("toy:"):
        split = source.split(":", 1)[1]
        if split not in ("train", "test"):
            raise ValueError(f"prompt source {source!r}: use toy:train or toy:test")
        prompts = toy.train_prompts() if split == "train" else toy.test_prompts()
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"prompt file {source!r} not found (one prompt per line, # comments)")
        with open(source) as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    return prompts[::max(1, len(prompts) // limit)][:limit] if limit else prompts


def epoch_prompts(cfg, prompts, epoch, rank, world, samples_per_rank):
    """This rank's prompts for an epoch. Every rank draws the same global list, then takes its slice.

    Warm-up (epoch 0, Carve3D): each prompt repeated stat_min_count times (padded with its own head to
    the global sample count) so every tracker starts from real per-prompt statistics.
    """
    total = samples_per_rank * world
    if epoch == 0:
        reps = [p for p in prompts for _ in range(cfg.stat_min_count)]
        while len(reps) < total:
            reps += reps[: total - len(reps)]
        chosen = reps[:total]
        if len(reps) > total and rank == 0:
            print(f"warning: warm-up covers {total} of {len(reps)} prompt repeats; raise the sample batch or lower "
                  f"stat_min_count so every prompt reaches min_count")
    else:
        g = make_generator("cpu", cfg.seed, "prompts", epoch)
        idx = torch.randint(len(prompts), (total,), generator=g).tolist()
        chosen = [prompts[i] for i in idx]
    return chosen[rank * samples_per_rank:(rank + 1) * samples_per_rank]
