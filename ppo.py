"""DDPO's clipped PPO on denoising trajectories, made pure on-policy as in Carve3D (Sec. 4.2).

Each denoising step x_t -> x_t' of a sampled trajectory is one "action" of a Gaussian policy (sample.py).
DDPO maximises E[A * rho] with rho = p_theta(x_t'|x_t) / p_old(x_t'|x_t), clipped PPO style; the advantage A
of a whole trajectory is shared by all its steps (Black et al. 2024, Sec. 4.2, Eq. 4).

Carve3D's change ("pure on-policy training", Sec. 4.2): total sample batch == total train batch, so every
epoch makes exactly one optimizer step with all samples and all timesteps. Parameters do not move between
sampling and that step, so rho == 1 and the update is the on-policy score-function estimator (DDPO's Eq. 3).
Here rho == 1 holds exactly, in bf16 too: before the first optimizer step after sampling the parameters have
not moved, so the old log-prob IS the current one, and we take it from the training forward itself
(log_prob.detach()). The log-probs stored at sampling time are then a diagnostic only (logp_replay_err): a GPU
forward batched differently can differ in its last bits, enough to clip half the ratios at clip_range 1e-4
(docs/DESIGN.md), which would clip an update that is on-policy by construction. The Carve3D README (desaixie/carve3d) expects dropping the ratio to make no
difference. With k optimizer steps per epoch this is DDPO's multi-update PPO: the later steps compare with
the stored sampling log-probs. support/batch_plan.py holds that arithmetic.

Adapted from ddpo-pytorch's training loop (kvablack/ddpo-pytorch scripts/train.py): same loss, same clipping
of advantages, same shuffling along the batch and independently along time, same approx_kl/clipfrac;
written here as functions over a trajectory dict, with explicit generators and a cross-rank non-finite guard.
"""

import contextlib

import torch

from kl import gaussian_kl, kl_loss_term
from sample import ddim_mean_std, ddim_step_with_logprob
from support.batch_plan import BatchPlan
from support.devices import all_ranks_true, max_over_ranks, mean_over_ranks


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
            "ratio_dev_max": (ratio - 1.0).abs().max(),
        }
    return loss, info


TIME_KEYS = ("timesteps", "latents", "next_latents", "log_probs", "ref_log_probs", "ref_means")


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


def micro_step_loss(model, policy, mb, j, *, eta, guidance_scale, clip_range, adv_clip_max, autocast,
                    kl_beta=0.0, kl_in_loss=False, kl_mean_coeff=0.0, unmoved=False):
    """The PPO loss of one micro-batch at its j-th (shuffled) timestep: re-score the stored transition
    x_t -> x_t' under the current policy and compare with the old policy's log-prob of it (unmoved: the
    parameters have not changed since sampling, so the old log-prob is this one, detached)."""
    with autocast():
        eps = model(mb["latents"][:, j], mb["timesteps"][:, j], mb["prompt_embeds"], guidance_scale)
    log_prob = ddim_step_with_logprob(policy.scheduler, eps.float(), mb["timesteps"][:, j], mb["latents"][:, j], eta,
                                      prev_sample=mb["next_latents"][:, j])[1]
    sampled = mb["log_probs"][:, j].to(log_prob.dtype)
    loss, info = ppo_loss(log_prob, log_prob.detach() if unmoved else sampled, mb["advantages"], clip_range,
                          adv_clip_max)
    info["logp_replay_err"] = (log_prob.detach() - sampled).abs().max()
    if kl_in_loss:  # Carve3D's kl_in_reward=False branch
        loss = loss + kl_loss_term(log_prob, mb["ref_log_probs"][:, j], kl_beta)
    if "ref_means" in mb:  # the exact per-step KL to the reference (kl.py; in the loss if kl_mean_coeff > 0)
        mean, std = ddim_mean_std(policy.scheduler, eps.float(), mb["timesteps"][:, j], mb["latents"][:, j], eta)
        kl = gaussian_kl(mean, mb["ref_means"][:, j], std).mean()
        info["kl_step"] = kl.detach()
        loss = loss + kl_mean_coeff * kl if kl_mean_coeff > 0 else loss
    return loss, info


def ppo_update(model, policy, samples, advantages, optimizer, plan, *, eta, guidance_scale, train_cfg,
               clip_range, adv_clip_max, max_grad_norm, generator, autocast=contextlib.nullcontext,
               kl_beta=0.0, kl_in_loss=False, kl_mean_coeff=0.0, nonfinite="skip", params=None):
    """One epoch of PPO over this rank's samples. Returns a list of per-optimizer-step info dicts.

    model: the callable for the policy forward (the DDP wrapper under torchrun so LoRA gradients are
    all-reduced; the policy itself otherwise). samples: the trajectory dict of sample.py for this rank
    (B = plan.samples_per_rank). advantages: (B,) for this rank's samples.
    """
    params = params if params is not None else [p for p in policy.parameters() if p.requires_grad]
    B = samples["latents"].shape[0]
    if B != plan.samples_per_rank:
        raise ValueError(f"ppo_update: got {B} samples, the batch plan expects {plan.samples_per_rank} per rank")
    samples = dict(samples, advantages=advantages.to(samples["latents"].device))
    step_kw = dict(eta=eta, guidance_scale=guidance_scale if train_cfg else 1.0, clip_range=clip_range,
                   adv_clip_max=adv_clip_max, autocast=autocast, kl_beta=kl_beta, kl_in_loss=kl_in_loss,
                   kl_mean_coeff=kl_mean_coeff)
    infos, M = [], plan.micro_batch_size
    for _ in range(plan.num_inner_epochs):
        shuffled = shuffle_samples(samples, generator, plan.num_train_timesteps)
        micro = [{k: v[i:i + M] for k, v in shuffled.items()} for i in range(0, B, M)]
        for start in range(0, len(micro), plan.accumulation_steps):
            group = micro[start:start + plan.accumulation_steps]
            unmoved = not infos  # the first optimizer step after sampling: nothing has changed the parameters
            infos.append(_optimizer_step(model, policy, group, plan.num_train_timesteps, optimizer, params,
                                         max_grad_norm, nonfinite, dict(step_kw, unmoved=unmoved)))
    return infos


MAXED = ("ratio_dev_max", "logp_replay_err")  # logged as maxima, not means


def summarize(infos):
    """An epoch's optimizer steps -> one log line: means, and maxima of MAXED."""
    return {k: max(i[k] for i in infos) if k in MAXED else sum(i[k] for i in infos) / len(infos) for k in infos[0]}


def _optimizer_step(model, policy, group, n_time, optimizer, params, max_grad_norm, nonfinite, step_kw):
    # Accumulate the gradient of the mean loss over the group's samples and timesteps, then one AdamW step.
    device = group[0]["latents"].device
    stats, finite = [], torch.ones((), dtype=torch.bool, device=device)
    for mi, mb in enumerate(group):
        for j in range(n_time):
            last = mi == len(group) - 1 and j == n_time - 1
            # Only the last micro-step of an update all-reduces gradients (nanoGPT's trick).
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                loss, info = micro_step_loss(model, policy, mb, j, **step_kw)
                (loss / (len(group) * n_time)).backward()  # mean over samples and timesteps of the update
            finite &= torch.isfinite(loss.detach())  # no host sync per micro-step: one decision per update
            info["loss"] = loss.detach()
            stats.append(info)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    ok = all_ranks_true(bool((finite & torch.isfinite(grad_norm)).item()), device)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # also before a stop: no stale non-finite grads for a caller
    if not ok and nonfinite == "stop":
        raise FloatingPointError(
            "ppo_update: non-finite loss or gradient norm; stopping (config nonfinite: stop). "
            "Set nonfinite: skip to skip such updates, or lower learning_rate / use bf16 instead of fp16.")
    # logged values are means over every rank's samples (as ddpo-pytorch logs them), maxima for the MAXED ones
    keys = [k for k in stats[0] if k not in MAXED]
    means = mean_over_ranks(torch.stack([torch.stack([s[k] for s in stats]).float().mean() for k in keys]))
    info = dict(zip(keys, means.tolist()))
    maxima = max_over_ranks(torch.stack([torch.stack([s[k] for s in stats]).float().max() for k in MAXED]))
    info.update(zip(MAXED, maxima.tolist()))
    info.update(grad_norm=float(grad_norm), skipped=0 if ok else 1)
    return info


if __name__ == "__main__":
    # The surrogate on a handful of numbers: positive advantages push ratios up until the clip.
    log_old = torch.zeros(6)
    log_new = torch.tensor([-2e-4, -5e-5, 0.0, 5e-5, 2e-4, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 7.0, -7.0])
    loss, info = ppo_loss(log_new, log_old, adv, clip_range=1e-4, adv_clip_max=5.0)
    loss.backward()
    print("loss", float(loss), {k: round(float(v), 6) for k, v in info.items()})
    print("d loss / d log_prob", log_new.grad.tolist(), "(zero where the clip is active)")
    print(BatchPlan(world_size=2, samples_per_epoch=32, updates_per_epoch=1, micro_batch_size=8,
                    num_steps=20).validate().describe())
