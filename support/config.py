# YAML config -> train.Config: key=value overrides, types checked against the dataclass's annotations, and
# every error names the key and the fix. Support code for train.py (train.Config documents every field).
import dataclasses
import os
import re
import typing

import yaml

from support import files
from support.batch_plan import BatchPlan

_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
CHOICES = {"mixed_precision": ("bf16", "no"), "nonfinite": ("skip", "stop"), "world": ("toy", "paper"),
           "device": ("auto", "cuda", "cpu"), "lgm_config": ("tiny", "big")}
POSITIVE = ("num_epochs", "save_every", "val_every", "num_steps", "samples_per_epoch", "micro_batch_size",
            "updates_per_epoch", "num_inner_epochs", "lora_rank", "num_val_samples")
NON_NEGATIVE = ("stat_buffer_size", "stat_min_count", "num_train_prompts", "num_val_prompts", "best_max_val_kl",
                "kl_mean_coeff", "kl_target", "best_min_diversity", "best_max_size_drift")
# Per-GPU batch keys of earlier versions: the config now states totals (support/batch_plan.py).
REPLACED = {k: "samples_per_epoch (total over all GPUs), updates_per_epoch and micro_batch_size (per GPU)"
            for k in ("sample_batch_size", "num_batches_per_epoch", "train_batch_size", "gradient_accumulation_steps")}


def load_config(config_class, path, overrides=()):
    """YAML (+ key=value overrides) -> config_class. Unknown keys and wrong types are errors that name the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (try toy.yaml or config.yaml)")
    with files.read_or_explain(path, "a YAML mapping of train.py config keys (train.Config lists them)",
                               "fix the YAML where the parser says, or start again from toy.yaml or config.yaml"), \
            open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(config_class)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)
        # A string key takes the text as typed: YAML 1.1 would turn mixed_precision=no into False.
        raw[key] = value if hints.get(key) is str and not isinstance(parsed, str) else parsed
    values = {key: _typed(path, key, value, hints) for key, value in raw.items()}
    cfg = config_class(**values)
    check_config(cfg, path)
    return cfg


def _typed(path, key, value, hints):
    if key in REPLACED:
        raise KeyError(f"{path}: config key {key!r} was replaced by {REPLACED[key]}")
    if key not in hints:
        close = [k for k in hints if k.split("_")[0] == str(key).split("_")[0]]
        raise KeyError(f"{path}: unknown config key {key!r}" + (f" (did you mean one of {close}?)" if close else ""))
    want = hints[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 and Python say float
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        quote = want is str and isinstance(value, bool)
        hint = " (quote it: YAML reads no/yes/on/off as booleans)" if quote else ""
        raise TypeError(f"{path}: config key {key!r} must be {want.__name__}, got {value!r}{hint}")
    return value


def check_config(cfg, path):
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{path}: config key {key!r} must be one of {allowed}, got {getattr(cfg, key)!r}")
    for key in POSITIVE:
        if getattr(cfg, key) < 1:
            raise ValueError(f"{path}: config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise ValueError(f"{path}: config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.resume not in ("auto", "never") and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise FileNotFoundError(f"{path}: config key 'resume' is {cfg.resume!r}, not a complete checkpoint directory "
                                f"(no trainer_state.json); use auto, never or a run_dir/checkpoints/epoch_NNNN path")
    if not 0 <= cfg.mrc_object_size <= 1:
        raise ValueError(f"{path}: config key 'mrc_object_size' must be in [0, 1] (0 = off), got {cfg.mrc_object_size}")
    if not 0 < cfg.mrc_fg_threshold <= 1:
        raise ValueError(f"{path}: config key 'mrc_fg_threshold' must be in (0, 1] (an image intensity), "
                         f"got {cfg.mrc_fg_threshold}")
    if not cfg.eta > 0:
        raise ValueError(f"{path}: config key 'eta' must be > 0, got {cfg.eta} (a deterministic DDIM step has no "
                         f"log-probability to train on)")
    if (cfg.kl_mean_coeff > 0 or cfg.kl_target > 0) and not cfg.kl_penalty:
        raise ValueError(f"{path}: config keys 'kl_mean_coeff' / 'kl_target' need the reference pass while sampling: "
                         f"set kl_penalty: true")
    if cfg.best_min_diversity > 0 and cfg.num_val_samples < 2:
        raise ValueError(f"{path}: config key 'best_min_diversity' needs the val diversity, which needs two or more "
                         f"samples per val prompt: set num_val_samples: 2")
    if cfg.kl_target > 0 and not cfg.kl_mean_coeff > 0:
        raise ValueError(f"{path}: config key 'kl_target' adapts kl_mean_coeff, which is 0: give it a start value")
    # What does not depend on the number of ranks is checked before any launch; the rest when it is known.
    try:
        BatchPlan(1, cfg.samples_per_epoch, cfg.updates_per_epoch, 1, cfg.num_steps, cfg.timestep_fraction,
                  cfg.num_inner_epochs, 0, cfg.stat_buffer_size, cfg.stat_min_count).validate()
    except ValueError as e:
        raise ValueError(f"{path}: {str(e).removeprefix('config: ')}") from None


def batch_plan(cfg, world_size, num_prompts=0):
    # micro_batch_size is the most that fits one GPU; a rank with fewer samples per optimizer step takes them
    # all in one call (config.yaml's 32 is 16 on 48 GPUs, Carve3D's per-GPU batch)
    per_rank = cfg.samples_per_epoch // max(1, cfg.updates_per_epoch) // world_size
    micro = min(cfg.micro_batch_size, per_rank) if per_rank >= 1 else cfg.micro_batch_size
    return BatchPlan(world_size, cfg.samples_per_epoch, cfg.updates_per_epoch, micro, cfg.num_steps,
                     cfg.timestep_fraction, cfg.num_inner_epochs, num_prompts, cfg.stat_buffer_size,
                     cfg.stat_min_count)


def print_plan(config_class, argv, load_prompts):
    """`train.py CONFIG --plan N [key=value ...]`: every check of a launch with N ranks, then the plan; no models."""
    i = argv.index("--plan")
    if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
        raise ValueError("--plan needs the number of ranks (GPUs), e.g. python train.py config.yaml --plan 8")
    rest = argv[:i] + argv[i + 2:]
    cfg = load_config(config_class, rest[0], rest[1:])
    prompts = load_prompts(cfg.train_prompts, cfg.num_train_prompts)
    plan = batch_plan(cfg, int(argv[i + 1]), len(prompts)).validate()
    print(plan.describe())
    return plan


def save_resolved(cfg, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
