# Per-prompt reward normalisation (DDPO's PerPromptStatTracker; Carve3D keeps it and adds a second one for the
# KL, Carve3D Sec. 4.2): each prompt's reward is z-scored against that prompt's recent history, so prompts that are
# easy or hard for the reconstructor weigh the same. Re-implements kvablack/ddpo-pytorch
# ddpo_pytorch/stat_tracking.py (append first, then normalise; population std + 1e-6; the whole batch's
# statistics while a prompt has fewer than min_count values) and adds a JSON state, so that a resumed run
# normalises exactly like an uninterrupted one.
from collections import deque

import numpy as np
import torch


class PerPromptStatTracker:
    def __init__(self, buffer_size, min_count):
        if int(buffer_size) < 1 or int(min_count) < 1:
            raise ValueError(f"buffer_size ({buffer_size}) and min_count ({min_count}) must be >= 1")
        if int(min_count) > int(buffer_size):
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): a prompt's buffer could never reach "
                "min_count, so per-prompt statistics would never be used; lower min_count"
            )
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers = {}

    def update(self, prompts, values):
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings (they key the per-prompt buffers)")
        prompts = [str(p) for p in prompts]  # plain str keys (np.str_ -> str) keep the state JSON-clean
        if torch.is_tensor(values):
            values = values.detach().cpu().double()
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or len(values) != len(prompts):
            raise ValueError(f"values must be 1-D with one value per prompt: {values.shape} vs {len(prompts)} prompts")
        if not np.isfinite(values).all():
            # A NaN would sit in the buffer and poison this prompt's statistics for buffer_size updates.
            raise ValueError("values must be finite (got NaN/inf); check the reward before normalising")

        prompt_array = np.array(prompts, dtype=object)
        advantages = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std() + 1e-6
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order (buffers are independent)
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask])  # append first, then normalise (ddpo semantics)
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std  # too little history: whole batch (all prompts)
            else:
                mean, std = np.mean(buffer), np.std(buffer) + 1e-6  # population std
            advantages[mask] = (values[mask] - mean) / std
        return advantages

    def state_dict(self):
        # Python floats round-trip exactly through JSON, so a resumed tracker is bit-identical.
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: [float(v) for v in buf] for prompt, buf in self.buffers.items()},
        }

    def load_state_dict(self, state):
        for key in ("buffer_size", "min_count", "buffers"):
            if key not in state:
                raise KeyError(f"PerPromptStatTracker state is missing {key!r}")
        if (state["buffer_size"], state["min_count"]) != (self.buffer_size, self.min_count):
            raise ValueError(
                f"tracker state has buffer_size={state['buffer_size']}, min_count={state['min_count']} but this "
                f"tracker has {self.buffer_size}, {self.min_count}; resume with the same config"
            )
        self.buffers = {
            prompt: deque((float(v) for v in values), maxlen=self.buffer_size)
            for prompt, values in state["buffers"].items()
        }


if __name__ == "__main__":
    # Two prompts, one easy (rewards near -0.2) and one hard (near -0.6): after normalisation both have
    # advantages of the same scale, and the best sample of the hard prompt is rewarded like the easy one's.
    tracker = PerPromptStatTracker(buffer_size=6, min_count=3)
    prompts = ["a red cube"] * 3 + ["a blue ball"] * 3
    rewards = np.array([-0.25, -0.20, -0.15, -0.70, -0.60, -0.50])
    for p, r, a in zip(prompts, rewards, tracker.update(prompts, rewards)):
        print(f"{p:12s} reward {r:+.2f} -> advantage {a:+.2f}")
    print("state:", tracker.state_dict())
