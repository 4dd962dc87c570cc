# Checkpoints that are never half-written, resume exactly, and whose later damage is found: rank 0 writes into a
# temporary directory and renames it when complete (atomic on POSIX); trainer_state.json marks completeness, and
# manifest.json, written last, lists every file's size and sha256 (support/files.py), because the rename protects
# against the trainer's own crash but not against a partial copy or a full disk afterwards. resume: auto skips a
# damaged checkpoint, saying why, for the newest intact one. Every rank enters save/load together and meets at a
# barrier, never inside a collective that only rank 0 runs (the multi-GPU hang of kvablack/ddpo-pytorch issue
# #13). Support code for train.py.
import dataclasses
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from support import compiling, files
from support import mvdream_weights as weights
from support.devices import barrier, gather_list

STATE_FILE = "trainer_state.json"
EXPECTED = {STATE_FILE: "the trainer state of a train.py checkpoint (JSON)",
            "optimizer.pt": "the optimizer state of a train.py checkpoint (a torch.save archive)",
            "rng_states.pt": "the per-rank RNG states of a train.py checkpoint (a torch.save archive)",
            weights.LORA_FILE: weights.LORA_EXPECTED,
            "best.json": "the record of the best/ LoRA (JSON)"}


def checkpoint_dir(cfg):
    return os.path.join(cfg.run_dir, "checkpoints")


def complete_checkpoints(cfg):
    """Complete epoch_<N> directories (with their marker file), newest first by epoch number (epoch_10000 after
    epoch_9999)."""
    root = checkpoint_dir(cfg)
    if not os.path.isdir(root):
        return []
    done = sorted((int(m.group(1)), d) for d in os.listdir(root) if (m := re.fullmatch(r"epoch_(\d+)", d)) and
                  os.path.isfile(os.path.join(root, d, STATE_FILE)))
    return [os.path.join(root, d) for _, d in reversed(done)]


def latest_checkpoint(cfg):
    done = complete_checkpoints(cfg)
    return done[0] if done else None


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
        # "manifest": a checkpoint that says it has one but lost it is damaged, not one of an older version
        state = {"epoch": epoch, "counters": counters,
                 "trackers": {k: t.state_dict() for k, t in trackers.items()},
                 "config": dataclasses.asdict(cfg), "manifest": files.MANIFEST}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:  # the completeness marker
            json.dump(state, f)
        files.write_manifest(tmp)  # last: sizes and sha256 of everything above
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        device = next(policy.parameters()).device
        if compiling.active(cfg, device):  # new compiled code, if any
            compiling.save_cache(cfg.run_dir, device)
    barrier()


def _fix(path, explicit):
    if explicit:
        return (f"copy {path} again from the machine that wrote it, or set resume: to another "
                f"run_dir/checkpoints/epoch_NNNN (or auto)")
    return (f"delete {path} (resume: auto then continues from the newest intact checkpoint before it), or copy it "
            f"again from the machine that wrote it")


def read_checkpoint(path, fix=None):
    """Everything a resume takes from a checkpoint, checked against its manifest and read before anything is
    changed, so that a damaged checkpoint leaves the policy and optimizer as they were."""
    fix = fix or _fix(path, explicit=True)
    with files.fix_hint(fix):
        has_manifest = files.check_manifest(path, fix, expected=EXPECTED)
        state = files.read_json(os.path.join(path, STATE_FILE), EXPECTED[STATE_FILE], fix)
        if not isinstance(state, dict) or "epoch" not in state:
            raise files.DamagedFileError(os.path.join(path, STATE_FILE), EXPECTED[STATE_FILE], "it has no 'epoch'", fix)
        if state.get("manifest") and not has_manifest:
            raise files.MissingFileError(os.path.join(path, files.MANIFEST), f"the manifest that {STATE_FILE} lists",
                                         "it is missing", fix)
        weights.read_lora(path)
        loaded = {"state": state}
        for name, key, kwargs in (("optimizer.pt", "optimizer", {"map_location": "cpu"}),
                                  ("rng_states.pt", "rng", {"weights_only": False})):
            file = os.path.join(path, name)
            with files.read_or_explain(file, EXPECTED[name], fix):
                loaded[key] = torch.load(file, **kwargs)
    return loaded


def load_checkpoint(path, policy, optimizer, trackers, rank, loaded=None):
    loaded = loaded or read_checkpoint(path)
    policy.load_lora(path)
    optimizer.load_state_dict(loaded["optimizer"])
    for k, t in trackers.items():
        t.load_state_dict(loaded["state"]["trackers"][k])
    if rank < len(loaded["rng"]):
        torch.set_rng_state(torch.tensor(loaded["rng"][rank]["torch"], dtype=torch.uint8))
    return loaded["state"]


def choose_checkpoint(cfg, rank):
    """-> (path, what read_checkpoint read), or (None, None) for a new run. resume: auto takes the newest intact
    checkpoint, printing why each newer one was skipped; an explicit resume: PATH that is damaged stops the run."""
    explicit = cfg.resume not in ("auto", "never")
    candidates = [] if cfg.resume == "never" else [cfg.resume] if explicit else complete_checkpoints(cfg)
    chosen, loaded, tried = None, None, []
    for path in candidates:
        try:
            chosen, loaded = path, read_checkpoint(path, _fix(path, explicit))
            break
        except files.DamagedFileError as e:
            chosen = None
            tried.append(e)
            if explicit:
                break
            if rank == 0:
                print(f"resume: skipping damaged checkpoint {path} ({e.path}: {e.problem})")
    # Every rank read the same files: all of them agree before any loads or stops (no rank left in a collective).
    decisions = gather_list([(chosen, [str(e) for e in tried])])
    if any(d != decisions[0] for d in decisions):
        raise RuntimeError(f"resume: the ranks found different checkpoints intact ({[d[0] for d in decisions]}); "
                           f"every rank must see the same run_dir {cfg.run_dir}")
    if chosen is None and tried:
        if explicit:
            raise tried[0]
        raise files.DamagedFileError(
            checkpoint_dir(cfg), "an intact checkpoint to resume from (resume: auto)",
            f"none of its {len(tried)} complete checkpoints is intact (each below, newest first)",
            "copy the checkpoints again from the machine that wrote them, or delete them (or set resume: never) to "
            "start the run over", details="\n".join(f"  {e.path}: {e.problem}" for e in tried))
    return chosen, loaded


def resume(cfg, policy, optimizer, trackers, counters, rank):
    """-> (checkpoint path or None, first epoch to run, counters), after loading the checkpoint if any."""
    ckpt, loaded = choose_checkpoint(cfg, rank)
    if not ckpt:
        return None, 0, counters
    state = load_checkpoint(ckpt, policy, optimizer, trackers, rank, loaded)
    if rank == 0:
        _reconsider_best(cfg, state)
    barrier()
    return ckpt, state["epoch"] + 1, state["counters"]


def _reconsider_best(cfg, state):
    # best/ chosen at an epoch after the resumed one came from epochs that are now run again: it goes aside, and
    # best/ becomes again the LoRA of the best epoch in the restored counters (from that epoch's checkpoint), so
    # the rule re-decides from the resumed state as an uninterrupted run would.
    root = checkpoint_dir(cfg)
    best = os.path.join(root, "best")
    if not os.path.isdir(best):
        return
    try:
        on_disk = int(files.read_json(os.path.join(best, "best.json"), EXPECTED["best.json"], "")["epoch"])
    except (files.DamagedFileError, KeyError, TypeError, ValueError):
        on_disk = None  # unreadable: no telling which epoch it holds, so it goes aside too
    if on_disk is not None and on_disk <= state["epoch"]:
        return
    aside = os.path.join(root, f"best.stale_epoch_{on_disk:04d}" if on_disk is not None else "best.stale")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(best, aside)
    epoch = state["counters"].get("best_epoch", -1)
    source = os.path.join(root, f"epoch_{epoch:04d}")
    try:
        weights.read_lora(source)  # (checks the LoRA against the checkpoint's manifest)
    except (files.DamagedFileError, FileNotFoundError):
        return print(f"resume: moved best/ (epoch {on_disk}, after the resumed epoch {state['epoch']}) to {aside}; "
                     f"the best epoch so far, {epoch}, has no intact checkpoint, so best/ is written again at the "
                     f"next validation that qualifies and beats val MRC {state['counters'].get('best_val_mrc')}")
    _write_best(root, lambda d: shutil.copyfile(os.path.join(source, weights.LORA_FILE),
                                                os.path.join(d, weights.LORA_FILE)),
                {"epoch": epoch, "metrics": _logged_metrics(cfg, epoch), "rule": BestCheckpoint.RULE,
                 "restored_from": source})
    print(f"resume: moved best/ (epoch {on_disk}, after the resumed epoch {state['epoch']}) to {aside}; best/ is "
          f"again epoch {epoch}'s LoRA, from {source}")


def _logged_metrics(cfg, epoch):
    path, row = os.path.join(cfg.run_dir, "metrics.jsonl"), {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                row = r if isinstance(r, dict) and r.get("epoch") == epoch else row
    return row


def _write_best(root, write_lora, record):
    tmp, final = os.path.join(root, ".tmp_best"), os.path.join(root, "best")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_lora(tmp)
    with open(os.path.join(tmp, "best.json"), "w") as f:
        json.dump(record, f, indent=1)
    files.write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class BestCheckpoint:
    """Writes run_dir/checkpoints/best/ (the LoRA + best.json) whenever a validation beats the best so far.

    Rule: the lowest val MRC among the validations (epoch 0 = the starting policy included) whose val KL is at
    most best_max_val_kl (if > 0; Carve3D stops training at an empirically safe KL), in the toy world whose
    val fidelity is within best_max_fidelity_drop of epoch 0's and whose val size bias is within
    best_max_size_drift of epoch 0's or no farther from 0 than epoch 0's, and (if best_min_diversity > 0, with
    num_val_samples >= 2) whose val diversity is at least best_min_diversity times epoch 0's: a lower MRC bought
    by losing the prompt (reward hacking: every prompt collapsing to one blob reconstructs well), by drawing
    objects at another size than the data's (an MRC can change with the size of a consistent object) or by
    drawing every sample of a prompt alike never counts as better. The state lives in the run's counters, so a
    resumed run keeps choosing exactly as an uninterrupted one."""
    RULE = __doc__.split("\n\n")[1]  # what best.json says about its choice

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
                _write_best(checkpoint_dir(self.cfg), policy.save_lora,
                            {"epoch": epoch, "metrics": metrics, "rule": self.RULE})
            barrier()
        metrics.update(best_epoch=self.counters["best_epoch"])
