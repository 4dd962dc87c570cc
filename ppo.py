"""DDPO's clipped PPO on denoising trajectories, made pure on-policy as in Carve3D (Sec. 4.1).

Each denoising step x_{t} -> x_{t'} of a sampled trajectory is one "action" with a Gaussian policy
(sample.py). DDPO maximises E[A * rho] with rho = p_theta(x_t'|x_t) / p_old(x_t'|x_t), clipped PPO
style; the advantage A of a whole trajectory is shared by all its steps (Black et al. 2024, Eq. 4).

Carve3D's change: total sample batch == total train batch, so every epoch makes exactly one
optimizer step with all samples and all timesteps. Parameters do not move between sampling and that
step, so rho == 1 up to numerics and the update is the on-policy score-function estimator
(carve3d_ddpo_spec Sec. 4.1). When the sample batch is k times the train batch this is ordinary
multi-update PPO (k steps per epoch), which is what DDPO's own configs do.

Adapted from ddpo-pytorch's training loop (scripts/train.py): same loss, same clipping of
advantages, same shuffling along the batch and independently along time, same approx_kl/clipfrac;
written here as functions over a trajectory dict, with explicit generators and a cross-rank
non-finite guard.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kl import kl_loss_term
from sample import ddim_step_with_logprob


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


def ppo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """DDPO's clipped surrogate (negated for minimisation) and its diagnostics, per micro-batch.

    loss = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1-eps, 1+eps)),  A clipped to [-adv_clip_max, adv_clip_max].
    approx_kl = 1/2 mean (log rho)^2 (ddpo-pytorch's estimator), clipfrac = mean(|rho-1| > eps).
    """
    advantages = torch.clamp(advantages.to(log_prob.dtype), -adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob.to(log_prob.dtype)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_dev": (ratio - 1.0).abs().mean(),
        }
    return loss, info


def shuffle_samples(samples, generator, num_train_timesteps):
    """Shuffle along the batch and, independently per sample, along time (ddpo-pytorch).

    A micro-batch at time index j then mixes different denoising steps, which is why the DDIM step
    takes per-sample timesteps. Keeping only the first num_train_timesteps of each sample's random
    time order implements timestep_fraction.
    """
    B, T = samples["timesteps"].shape
    perm = torch.randperm(B, generator=generator)
    time_perms = torch.stack([torch.randperm(T, generator=generator) for _ in range(B)])[:, :num_train_timesteps]
    out = {}
    for key, value in samples.items():
        if not torch.is_tensor(value):
            out[key] = [value[i] for i in perm.tolist()]
            continue
        value = value[perm.to(value.device)]
        if value.dim() >= 2 and value.shape[1] == T and key in TIME_KEYS:
            idx = time_perms.to(value.device)
            idx = idx.view(B, num_train_timesteps, *([1] * (value.dim() - 2))).expand(-1, -1, *value.shape[2:])
            value = torch.gather(value, 1, idx)
        out[key] = value
    return out


TIME_KEYS = ("timesteps", "latents", "next_latents", "log_probs", "ref_log_probs")


def _all_ranks_true(flag, device):
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)
    return flag


def ppo_update(model, policy, samples, advantages, optimizer, plan, *, eta, guidance_scale, train_cfg,
               clip_range, adv_clip_max, max_grad_norm, generator, autocast=contextlib.nullcontext,
               kl_beta=0.0, kl_in_loss=False, nonfinite="skip", params=None, num_inner_epochs=1):
    """One epoch of PPO over this rank's samples. Returns a list of per-optimizer-step info dicts.

    model: the callable for the policy forward (the DDP wrapper under torchrun so LoRA gradients are
    all-reduced; the policy itself otherwise). samples: the trajectory dict of sample.py for this rank
    (B = plan.samples_per_rank). advantages: (B,) for this rank's samples.
    """
    params = params if params is not None else [p for p in policy.parameters() if p.requires_grad]
    device = samples["latents"].device
    B = samples["latents"].shape[0]
    if B != plan.samples_per_rank:
        raise ValueError(f"ppo_update: got {B} samples, the batch plan expects {plan.samples_per_rank} per rank")
    samples = dict(samples, advantages=advantages.to(device))
    accum = plan.gradient_accumulation_steps
    n_time = plan.num_train_timesteps
    infos = []
    for _ in range(num_inner_epochs):
        shuffled = shuffle_samples(samples, generator, n_time)
        micro = [
            {k: v[i:i + plan.train_batch_size] for k, v in shuffled.items()}
            for i in range(0, B, plan.train_batch_size)
        ]
        for start in range(0, len(micro), accum):
            group = micro[start:start + accum]
            stats, loss_finite = [], True
            for mi, mb in enumerate(group):
                for j in range(n_time):
                    last = mi == len(group) - 1 and j == n_time - 1
                    # Only the last micro-step of an update all-reduces gradients (nanoGPT's trick).
                    sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                    with sync:
                        with autocast():
                            eps = model(mb["latents"][:, j], mb["timesteps"][:, j], mb["prompt_embeds"],
                                        guidance_scale if train_cfg else 1.0)
                        log_prob = ddim_step_with_logprob(policy.scheduler, eps.float(), mb["timesteps"][:, j],
                                                          mb["latents"][:, j], eta,
                                                          prev_sample=mb["next_latents"][:, j])[1]
                        loss, info = ppo_loss(log_prob, mb["log_probs"][:, j], mb["advantages"],
                                              clip_range, adv_clip_max)
                        if kl_in_loss:
                            loss = loss + kl_loss_term(log_prob, mb["ref_log_probs"][:, j], kl_beta)
                        # Mean over samples and timesteps of the whole update (accumulation divides).
                        (loss / (len(group) * n_time)).backward()
                    loss_finite &= bool(torch.isfinite(loss.detach()).item())
                    info["loss"] = loss.detach()
                    stats.append(info)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            # Every rank must take the same decision, or their adapters diverge (and DDP hangs later).
            ok = _all_ranks_true(loss_finite and bool(torch.isfinite(grad_norm).item()), device)
            if ok:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # also before a stop: no stale non-finite grads for a caller
            if not ok and nonfinite == "stop":
                raise FloatingPointError(
                    "ppo_update: non-finite loss or gradient norm; stopping (config nonfinite: stop). "
                    "Set nonfinite: skip to skip such updates, or lower learning_rate / use bf16 instead of fp16.")
            means = torch.stack([torch.stack([s[k] for s in stats]).float().mean() for k in stats[0]])
            if dist.is_available() and dist.is_initialized():  # log the mean over every rank's samples (ddpo)
                dist.all_reduce(means)
                means = means / dist.get_world_size()
            info = dict(zip(stats[0], means.tolist()))
            info.update(grad_norm=float(grad_norm), skipped=0 if ok else 1)
            infos.append(info)
    return infos


if __name__ == "__main__":
    # The surrogate on a handful of numbers: positive advantages push ratios up until the clip.
    log_old = torch.zeros(6)
    log_new = torch.tensor([-2e-4, -5e-5, 0.0, 5e-5, 2e-4, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 7.0, -7.0])
    loss, info = ppo_loss(log_new, log_old, adv, clip_range=1e-4, adv_clip_max=5.0)
    loss.backward()
    print("loss", float(loss), {k: round(float(v), 6) for k, v in info.items()})
    print("d loss / d log_prob", log_new.grad.tolist(), "(zero where the clip is active)")
    print(BatchPlan(1, 8, 2, 8, 2, 20, 1.0).validate().describe())
