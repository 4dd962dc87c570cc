# Prompt files and which prompts each rank samples in an epoch. Support code for train.py and evaluate.py; the
# toy world's own source (toy:train, toy:test) is toy/prompts.py, which reads files through read_prompts.
import os

import torch

from support import files
from support.seeding import make_generator

FILES = ("a text file (one prompt per line, # comments) or a JSON prompt library with its key, e.g. threestudio's "
         "load/prompt_library.json:dreamfusion")


def read_prompts(source):
    """The prompts of a file source (see FILES). Carve3D evaluates on DreamFusion's prompts: threestudio ships them
    as the "dreamfusion" list of load/prompt_library.json (threestudio-project/threestudio); pass that file."""
    if ".json:" in source:
        prompts = _library(*source.rsplit(":", 1))
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"prompt source {source!r} not found; use {FILES}")
        with files.read_or_explain(source, "a prompt file of UTF-8 text, one prompt per line",
                                   f"save it again as UTF-8 text, or pass another source: {FILES}"), open(source) as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    return prompts


def spread(prompts, limit=0):
    # N > 0 keeps N prompts evenly spaced over the list (the first N when it holds fewer than 2N): the toy
    # grammar enumerates colours first, so its first N prompts would all be red
    return prompts[::max(1, len(prompts) // limit)][:limit] if limit else prompts


def _library(path, key):
    # {"dreamfusion": ["a 20-sided die made out of glass", ...], "magic3d": [...], ...}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt library {path!r} not found (threestudio's load/prompt_library.json "
                                f"has the DreamFusion prompts under the key 'dreamfusion')")
    library = files.read_json(path, "a JSON prompt library ({name: [prompts]}, like threestudio's "
                              "load/prompt_library.json)", "download threestudio's load/prompt_library.json again, "
                              "or pass another prompt source")
    if not isinstance(library, dict) or key not in library:
        keys = sorted(library) if isinstance(library, dict) else []
        raise KeyError(f"prompt library {path!r} has no key {key!r}; its keys: {keys}")
    prompts = library[key]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt library {path!r}: {key!r} must be a list of prompt strings")
    return [" ".join(p.split()) for p in prompts]  # the library has a few double spaces inside prompts


def epoch_prompts(cfg, prompts, epoch, rank, world, plan):
    """This rank's prompts for an epoch. Every rank draws the same global list, then takes its slice.

    Warm-up (epoch 0, Carve3D): each prompt repeated min_count times (padded with the list's head to the
    epoch's samples; BatchPlan.validate guarantees the room) so every tracker starts from per-prompt statistics.
    """
    total, per_rank = plan.samples_per_epoch, plan.samples_per_rank
    if epoch == 0:
        reps = [p for p in prompts for _ in range(plan.min_count)]
        chosen = (reps * (total // len(reps) + 1))[:total]
    else:
        g = make_generator("cpu", cfg.seed, "prompts", epoch)
        idx = torch.randint(len(prompts), (total,), generator=g).tolist()
        chosen = [prompts[i] for i in idx]
    return chosen[rank * per_rank:(rank + 1) * per_rank]
