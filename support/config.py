# YAML config -> train.Config: key=value overrides, types checked against the dataclass's annotations, and
# every error names the key and the fix. Support code for train.py (train.Config documents every field).
import dataclasses
import os
import re
import typing

import yaml

from support.batch_plan import BatchPlan

_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
CHOICES = {"mixed_precision": ("bf16", "no"), "nonfinite": ("skip", "stop"), "world": ("toy", "paper"),
           "device": ("auto", "cuda", "cpu"), "lgm_config": ("tiny", "big")}
POSITIVE = ("num_epochs", "save_every", "val_every", "num_steps", "sample_batch_size", "num_batches_per_epoch",
            "train_batch_size", "gradient_accumulation_steps", "num_inner_epochs", "lora_rank",
            "stat_buffer_size", "stat_min_count")


def load_config(config_class, path, overrides=()):
    """YAML (+ key=value overrides) -> config_class. Unknown keys and wrong types are errors that name the key."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found (try toy.yaml or config.yaml)")
    with open(path) as f:
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
    if cfg.stat_min_count > cfg.stat_buffer_size:
        raise ValueError(f"{path}: stat_min_count ({cfg.stat_min_count}) must not exceed stat_buffer_size "
                         f"({cfg.stat_buffer_size})")
    if cfg.resume not in ("auto", "never") and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise FileNotFoundError(f"{path}: config key 'resume' is {cfg.resume!r}, not a complete checkpoint directory "
                                f"(no trainer_state.json); use auto, never or a run_dir/checkpoints/epoch_NNNN path")
    if not cfg.eta > 0:
        raise ValueError(f"{path}: config key 'eta' must be > 0, got {cfg.eta} (a deterministic DDIM step has no "
                         f"log-probability to train on)")
    # The batch arithmetic does not depend on the number of ranks (it cancels): check it before any launch.
    try:
        batch_plan(cfg, 1).validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def batch_plan(cfg, world_size):
    return BatchPlan(world_size, cfg.sample_batch_size, cfg.num_batches_per_epoch, cfg.train_batch_size,
                     cfg.gradient_accumulation_steps, cfg.num_steps, cfg.timestep_fraction)


def save_resolved(cfg, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
