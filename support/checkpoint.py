# Checkpoints that are never half-written and resume exactly: rank 0 writes into a temporary directory and
# renames it when complete (atomic on POSIX); trainer_state.json, written last, marks completeness. Every rank
# enters save/load together and meets at a barrier, never inside a collective that only rank 0 runs (the
# multi-GPU hang of kvablack/ddpo-pytorch issue #13). Support code for train.py.
import dataclasses
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from support.devices import barrier, gather_list

STATE_FILE = "trainer_state.json"


def checkpoint_dir(cfg):
    return os.path.join(cfg.run_dir, "checkpoints")


def latest_checkpoint(cfg):
    root = checkpoint_dir(cfg)
    if not os.path.isdir(root):
        return None
    # By epoch number (epoch_10000 after epoch_9999); only epoch_<N> dirs with their marker file count.
    done = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"epoch_(\d+)", d)) and
                  os.path.isfile(os.path.join(root, d, STATE_FILE)))
    return os.path.join(root, done[-1][1]) if done else None


def save_checkpoint(cfg, epoch, policy, optimizer, trackers, counters, rank):
    rng = gather_list([{"torch": torch.get_rng_state().tolist(), "numpy": np.random.get_state()[1].tolist(),
                        "python": random.getstate()[1]}])
    if rank == 0:
        root = checkpoint_dir(cfg)
        final = os.path.join(root, f"epoch_{epoch:04d}")
        tmp = os.path.join(root, f".tmp_epoch_{epoch:04d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # Standard diffusers/peft LoRA file (pytorch_lora_weights.safetensors, alpha in its header):
        # diffusers' load_lora_weights / unet.load_lora_adapter and evaluate.py --lora read it.
        policy.save_lora(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(rng, os.path.join(tmp, "rng_states.pt"))
        state = {"epoch": epoch, "counters": counters,
                 "trackers": {k: t.state_dict() for k, t in trackers.items()},
                 "config": dataclasses.asdict(cfg)}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:  # written last: the completeness marker
            json.dump(state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()


def load_checkpoint(path, policy, optimizer, trackers, rank):
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    policy.load_lora(path)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu"))
    for k, t in trackers.items():
        t.load_state_dict(state["trackers"][k])
    rng = torch.load(os.path.join(path, "rng_states.pt"), weights_only=False)
    if rank < len(rng):
        torch.set_rng_state(torch.tensor(rng[rank]["torch"], dtype=torch.uint8))
    return state


def resume(cfg, policy, optimizer, trackers, counters, rank):
    """-> (checkpoint path or None, first epoch to run, counters), after loading the checkpoint if any."""
    ckpt = None if cfg.resume == "never" else (latest_checkpoint(cfg) if cfg.resume == "auto" else cfg.resume)
    if not ckpt:
        return None, 0, counters
    state = load_checkpoint(ckpt, policy, optimizer, trackers, rank)
    return ckpt, state["epoch"] + 1, state["counters"]


class BestCheckpoint:
    """Writes run_dir/checkpoints/best/ (the LoRA + best.json) whenever a validation beats the best so far.

    Rule: the lowest val MRC among the validations (epoch 0 = the starting policy included) whose val KL is at
    most best_max_val_kl (if > 0; Carve3D stops training at an empirically safe KL), in the toy world whose
    val fidelity is within best_max_fidelity_drop of epoch 0's and whose val size bias is within
    best_max_size_drift of epoch 0's or no farther from 0 than epoch 0's, and (if best_min_diversity > 0, with
    num_val_samples >= 2) whose val diversity is at least best_min_diversity times epoch 0's: a lower MRC bought
    by losing the prompt (reward hacking: every prompt collapsing to one blob reconstructs well), by drawing
    objects at another size than the data's (the toy's MRC changes with the size of a consistent object) or by
    drawing every sample of a prompt alike never counts as better. The state lives in the run's counters, so a
    resumed run keeps choosing exactly as an uninterrupted one."""

    def __init__(self, cfg, counters):
        self.cfg, self.counters = cfg, counters
        counters.setdefault("best_epoch", -1)
        counters.setdefault("best_val_mrc", float("inf"))

    def qualifies(self, epoch, metrics):
        for key in ("val_fidelity", "val_diversity", "val_size_bias"):
            if epoch == 0 and key in metrics:
                self.counters[f"{key}_0"] = metrics[key]
        if self.cfg.best_max_val_kl > 0 and metrics.get("val_kl", 0.0) > self.cfg.best_max_val_kl:
            return False
        bias_0 = self.counters.get("val_size_bias_0")   # absent in runs from before the size bias was logged
        if "val_size_bias" in metrics and bias_0 is not None and abs(metrics["val_size_bias"]) > abs(bias_0) and \
                abs(metrics["val_size_bias"] - bias_0) > self.cfg.best_max_size_drift:
            return False
        diversity_0 = self.counters.get("val_diversity_0")
        if self.cfg.best_min_diversity > 0 and diversity_0 is not None and \
                metrics["val_diversity"] < self.cfg.best_min_diversity * diversity_0:
            return False
        start = self.counters.get("val_fidelity_0")
        return "val_fidelity" not in metrics or start is None or \
            metrics["val_fidelity"] >= start - self.cfg.best_max_fidelity_drop

    def consider(self, epoch, metrics, policy, rank):
        if self.qualifies(epoch, metrics) and metrics["val_mrc"] < self.counters["best_val_mrc"]:
            self.counters.update(best_epoch=epoch, best_val_mrc=metrics["val_mrc"])
            if rank == 0:
                root = checkpoint_dir(self.cfg)
                tmp, final = os.path.join(root, ".tmp_best"), os.path.join(root, "best")
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                policy.save_lora(tmp)
                with open(os.path.join(tmp, "best.json"), "w") as f:
                    json.dump({"epoch": epoch, "metrics": metrics, "rule": self.__doc__.split("\n\n")[1]}, f, indent=1)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            barrier()
        metrics.update(best_epoch=self.counters["best_epoch"])
