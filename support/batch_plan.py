# The batch arithmetic of one epoch: samples per rank and in total, the train batch, micro-steps, and whether
# the update is Carve3D's pure on-policy one (one optimizer step with every sample: total sample batch == total
# train batch, desaixie/carve3d README "Pure On-policy Training") or DDPO's multi-update PPO. ddpo-pytorch's
# scripts/train.py prints and asserts the same numbers. Support code for train.py and ppo.py.
from dataclasses import dataclass


@dataclass
class BatchPlan:
    """The derived batch arithmetic of one epoch (ddpo-pytorch prints and asserts the same numbers)."""
    world_size: int
    sample_batch_size: int          # prompts per sampling batch, per rank
    num_batches_per_epoch: int      # sampling batches per epoch, per rank
    train_batch_size: int           # samples per micro-batch, per rank
    gradient_accumulation_steps: int
    num_steps: int                  # denoising steps per trajectory
    timestep_fraction: float

    @property
    def samples_per_rank(self):
        return self.sample_batch_size * self.num_batches_per_epoch

    @property
    def samples_per_epoch(self):
        return self.samples_per_rank * self.world_size

    @property
    def train_batch_total(self):
        return self.train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def updates_per_epoch(self):
        return self.samples_per_epoch // self.train_batch_total

    @property
    def num_train_timesteps(self):
        return max(1, int(self.num_steps * self.timestep_fraction))

    @property
    def on_policy(self):
        return self.updates_per_epoch == 1

    def validate(self):
        """Inconsistent batch sizes are errors that name the config keys involved."""
        if self.samples_per_rank % self.train_batch_size:
            raise ValueError(
                f"config: sample_batch_size * num_batches_per_epoch = {self.samples_per_rank} samples per rank "
                f"is not divisible by train_batch_size = {self.train_batch_size}")
        if self.samples_per_epoch % self.train_batch_total:
            raise ValueError(
                f"config: samples per epoch ({self.samples_per_epoch} = sample_batch_size * num_batches_per_epoch"
                f" * {self.world_size} ranks) must be a multiple of the train batch ({self.train_batch_total} ="
                f" train_batch_size * gradient_accumulation_steps * ranks); make them equal for Carve3D's pure"
                f" on-policy update")
        if self.updates_per_epoch < 1:
            raise ValueError(
                f"config: the train batch ({self.train_batch_total}) is larger than the samples per epoch "
                f"({self.samples_per_epoch}); lower gradient_accumulation_steps or train_batch_size")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"config: timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        return self

    def describe(self):
        mode = ("pure on-policy: one optimizer step per epoch with every sample (Carve3D)" if self.on_policy
                else f"multi-update PPO: {self.updates_per_epoch} optimizer steps per epoch")
        return "\n".join([
            f"ranks                        {self.world_size}",
            f"samples per epoch            {self.samples_per_epoch} = {self.sample_batch_size} prompts x "
            f"{self.num_batches_per_epoch} batches x {self.world_size} ranks",
            f"train batch per update       {self.train_batch_total} = {self.train_batch_size} x "
            f"{self.gradient_accumulation_steps} accumulation x {self.world_size} ranks",
            f"timesteps trained per sample {self.num_train_timesteps} of {self.num_steps}",
            f"micro-steps per update       {self.gradient_accumulation_steps * self.num_train_timesteps} per rank",
            f"updates per epoch            {self.updates_per_epoch} ({mode})",
        ])
