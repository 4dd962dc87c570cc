# The batch arithmetic of one epoch, from totals: the config states Carve3D's totals (samples per epoch, optimizer
# steps per epoch) and a per-GPU micro-batch that fits memory; everything per rank derives from the number of
# ranks. So 1, 2, 8 or 48 GPUs run the same algorithm and only the wall time differs. One optimizer step per epoch
# with every sample is Carve3D's pure on-policy update (desaixie/carve3d README "Pure On-policy Training";
# config/dgx.py: 768 samples = the train batch on 48 GPUs); k steps per epoch is DDPO's multi-update PPO.
# The micro-batch (what fits memory) is the same in sampling and training. Support code for train.py.
from dataclasses import dataclass


@dataclass
class BatchPlan:
    world_size: int
    samples_per_epoch: int          # total over all ranks (Carve3D: 768)
    updates_per_epoch: int          # optimizer steps per epoch (Carve3D: 1, pure on-policy)
    micro_batch_size: int           # prompts per UNet call on one GPU, in sampling and training alike
    num_steps: int                  # denoising steps per trajectory
    timestep_fraction: float = 1.0
    num_inner_epochs: int = 1
    num_prompts: int = 0            # training prompts (0: not known yet, coverage not checked)
    stat_buffer_size: int = 0       # 0: 3 epochs' samples per prompt (Carve3D: 75 = 3 x 768 // 30)
    stat_min_count: int = 0         # 0: one epoch's samples per prompt (Carve3D: 25)

    @property
    def samples_per_rank(self):
        return self.samples_per_epoch // self.world_size

    @property
    def sampling_batches(self):     # micro-batches sampled per rank and epoch
        return self.samples_per_rank // self.micro_batch_size

    @property
    def train_batch_total(self):    # samples per optimizer step, all ranks
        return self.samples_per_epoch // self.updates_per_epoch

    @property
    def accumulation_steps(self):   # micro-batches per optimizer step, per rank
        return self.train_batch_total // self.world_size // self.micro_batch_size

    @property
    def num_train_timesteps(self):
        return max(1, int(self.num_steps * self.timestep_fraction))

    @property
    def on_policy(self):            # parameters never move between sampling and their (only) update
        return self.updates_per_epoch == 1 and self.num_inner_epochs == 1

    @property
    def samples_per_prompt(self):
        return self.samples_per_epoch // self.num_prompts if self.num_prompts else 0

    @property
    def min_count(self):
        return self.stat_min_count or max(1, self.samples_per_prompt)

    @property
    def buffer_size(self):
        return self.stat_buffer_size or 3 * max(1, self.samples_per_prompt)

    def validate(self):
        """Inconsistent totals are errors that name the config keys and a fix."""
        W, S, U, M = self.world_size, self.samples_per_epoch, self.updates_per_epoch, self.micro_batch_size
        if min(W, S, U, M, self.num_steps, self.num_inner_epochs) < 1:
            raise ValueError("config: samples_per_epoch, updates_per_epoch, micro_batch_size, num_steps and "
                             "num_inner_epochs must be >= 1")
        if S % U:
            raise ValueError(f"config: samples_per_epoch ({S}) must be a multiple of updates_per_epoch ({U})")
        if (S // U) % (W * M):
            unit = W * M * U
            raise ValueError(
                f"config: samples_per_epoch / updates_per_epoch = {S // U} samples per optimizer step do not split "
                f"into {W} ranks x micro_batch_size {M}; use a samples_per_epoch that is a multiple of {unit} "
                f"(e.g. {(S + unit - 1) // unit * unit}) or another micro_batch_size")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"config: timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if (self.stat_buffer_size or self.num_prompts) and self.min_count > self.buffer_size:
            raise ValueError(f"config: stat_min_count ({self.min_count}) must not exceed stat_buffer_size "
                             f"({self.buffer_size})")
        if self.num_prompts and S < self.num_prompts * self.min_count:
            raise ValueError(
                f"config: the warm-up epoch gives {S} samples (samples_per_epoch), fewer than {self.num_prompts} "
                f"prompts (num_train_prompts) x stat_min_count {self.min_count}: some prompts' trackers would stay "
                f"below their min count; raise samples_per_epoch, lower num_train_prompts or stat_min_count")
        return self

    def describe(self):
        mode = ("pure on-policy: one optimizer step per epoch with every sample (Carve3D)" if self.on_policy
                else f"multi-update PPO: {self.updates_per_epoch} optimizer steps x {self.num_inner_epochs} passes")
        lines = [
            f"ranks                        {self.world_size}",
            f"samples per epoch            {self.samples_per_epoch}",
            f"  per rank                   {self.samples_per_rank} = {self.sampling_batches} micro-batches x "
            f"{self.micro_batch_size} prompts (x 4 views, x 2 with CFG)",
            f"train batch per update       {self.train_batch_total} = {self.micro_batch_size} x "
            f"{self.accumulation_steps} accumulation x {self.world_size} ranks",
            f"timesteps trained per sample {self.num_train_timesteps} of {self.num_steps}",
            f"micro-steps per update       {self.accumulation_steps * self.num_train_timesteps} per rank",
            f"updates per epoch            {self.updates_per_epoch * self.num_inner_epochs} ({mode})",
        ]
        if self.num_prompts:
            lines.append(f"stat trackers                {self.num_prompts} prompts, ~{self.samples_per_prompt} samples "
                         f"per prompt per epoch: buffer {self.buffer_size}, min count {self.min_count}")
        return "\n".join(lines)
