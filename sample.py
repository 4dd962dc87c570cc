# DDPO's sampler for the MVDream policy (Carve3D Sec. 4, as DDPO, Black et al. 2024 Sec. 4): DDIM with eta > 0
# is a Gaussian policy, and the log-density of every step it took feeds PPO (ppo.py) and Carve3D's KL (kl.py).
#
# `ddim_step_with_logprob` is adapted from DDPO's ddim_with_logprob (kvablack/ddpo-pytorch,
# ddpo_pytorch/diffusers_patch/ddim_with_logprob.py; same logic in desaixie/carve3d). Differences:
#   * epsilon prediction only, no clipping/thresholding (MVDream's config; anything else raises);
#   * all math in fp32 (model output and sample are upcast) and the returned sample stays fp32, so the stored
#     next latent is exactly the value whose log-prob was computed (DDPO stored the fp16-rounded sample but
#     scored the fp32 one, so its "on-policy" ratios drifted from 1);
#   * noise comes from an explicit torch.Generator (any device) instead of diffusers' randn_tensor.
#
# Step schedule: policy.scheduler is diffusers' DDIMScheduler from mvdream.make_scheduler() ("leading" spacing,
# steps_offset=1, set_alpha_to_one=False), i.e. t_k = 1000 - k*(1000//S) + 1 ... 1. When S divides 1000
# (20, 25, 50, 100) this is exactly MVDream's original DDIM sampler (mvdream/ldm/models/diffusion/ddim.py).
# S = 30 is a trap: the original runs 31 steps (991, 958, ..., 1: range(0, 1000, 33) has 31 entries) while
# diffusers runs 30 (958, ..., 1), so LGM's app (30 steps through the diffusers port) and the original scripts
# differ. We use S = 50 for the paper setup and S = 20 for the toy world.
import math
import time

import torch

from mvdream import MVDreamPolicy
from support.devices import autocast
from support.seeding import make_generator


def alphas_cumprod_on(scheduler, device):
    """The schedule's alpha_bar on `device`, copied once and kept on the scheduler. A copy of the CPU tensor at
    every step would be a blocking host-to-device copy, i.e. a host sync per DDIM step: the GPU would idle while
    the next UNet call is launched."""
    cached = getattr(scheduler, "_alphas_cumprod_on_device", None)
    if cached is None or cached.device != torch.device(device):
        cached = scheduler.alphas_cumprod.to(device, torch.float32)
        scheduler._alphas_cumprod_on_device = cached
    return cached


def ddim_mean_std(scheduler, model_output, timestep, sample, eta):
    """Mean and std of the DDIM step's Gaussian p(x_t' | x_t) (Song et al. 2021 eq. 12 and 16), in fp32."""
    cfg = scheduler.config
    if cfg.prediction_type != "epsilon" or cfg.clip_sample or cfg.thresholding:
        raise ValueError("ddim_step_with_logprob: only epsilon prediction without clip_sample/thresholding is "
                         "supported (mvdream.make_scheduler)")
    if scheduler.num_inference_steps is None:
        raise ValueError("ddim_step_with_logprob: call scheduler.set_timesteps(num_steps) first")
    B = sample.shape[0]
    eps, x = model_output.float(), sample.float()
    t = torch.as_tensor(timestep, device=x.device).long().reshape(-1).expand(B)  # one t per sample (ppo.py shuffles)
    N = cfg.num_train_timesteps
    # Clamped previous timestep: at the last step t' = 0, so alpha_bar_prev = alpha_bar_0 (never 1) and
    # sigma_t > 0 at every step (as DDPO's clamp).
    t_prev = (t - N // scheduler.num_inference_steps).clamp(0, N - 1)
    alphas = alphas_cumprod_on(scheduler, x.device)
    shape = (B,) + (1,) * (x.dim() - 1)
    a_t, a_prev = alphas[t].view(shape), alphas[t_prev].view(shape)

    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # DDIM (Song et al. 2021) eq. 16
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * eps
    return mean, std


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, prev_sample=None, generator=None,
                           noise=None):
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    x, B = sample.float(), sample.shape[0]
    if prev_sample is None:  # sample x_t' (noise given: used as is; else drawn from the generator)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else x.device)
        prev_sample = mean + std * noise.to(x.device, torch.float32)
    prev_sample = prev_sample.float()

    # Gaussian log-density of the (detached) sample, averaged over all non-batch dims (DDPO's convention, so
    # ratios and KLs are per-dimension); gradients flow only through the mean. eta = 0 has no density: NaN.
    if eta == 0:
        return prev_sample, torch.full((B,), float("nan"), device=x.device)
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - std.log() - math.log(math.sqrt(2 * math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.dim())))


@torch.no_grad()
def sample_trajectories(policy, prompts, *, num_steps, guidance_scale, eta=1.0, generator=None, initial_noise=None,
                        with_reference=False, model=None):
    # One batch of B prompts x 4 views, CFG on every step. `model` (e.g. the DDP wrapper) runs the policy
    # forward; the reference (Carve3D's KL) is the same UNet with its adapters off, evaluated on the SAME
    # CFG inputs, scoring the SAME sampled next latent under its own mean (same sigma; desaixie/carve3d
    # carve3d_train.py computes log_prob_reference this way). Autocast, if any, is the caller's; the step
    # math is fp32 either way.
    # generator: one torch.Generator for the batch, or a list with one per sample (train.py, evaluate.py): then
    # each sample's initial and step noise depend on that sample alone, not on how samples are batched or
    # spread over GPUs.
    model = policy if model is None else model
    prompts = list(prompts)
    B, V, shape = len(prompts), policy.num_views, tuple(policy.latent_shape)
    device = policy.device
    step_noise = None
    if isinstance(generator, (list, tuple)):
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} prompts: pass one per sample (or one in all)")
        noise = torch.stack([torch.randn((1 + num_steps, V) + shape, generator=g, device=g.device).to(device)
                             for g in generator])
        initial_noise = noise[:, 0] if initial_noise is None else initial_noise
        step_noise = noise[:, 1:]
    if initial_noise is None:
        gen_device = generator.device if generator is not None else device
        initial_noise = torch.randn((B, V) + shape, generator=generator, device=gen_device)
    elif tuple(initial_noise.shape) != (B, V) + shape:
        raise ValueError(f"initial_noise must be {(B, V) + shape}, got {tuple(initial_noise.shape)}")
    initial_noise = initial_noise.to(device, torch.float32)
    x = initial_noise * policy.scheduler.init_noise_sigma  # = 1 for DDIM

    prompt_embeds = policy.encode_prompts(prompts)
    policy.scheduler.set_timesteps(num_steps, device=device)
    timesteps = policy.scheduler.timesteps
    latents, next_latents, log_probs, ref_log_probs, ref_means = [], [], [], [], []
    for k, t in enumerate(timesteps):
        tb = t.expand(B)
        eps = model(x, tb, prompt_embeds, guidance_scale)
        noise_k = None if step_noise is None else step_noise[:, k]
        x_next, log_prob = ddim_step_with_logprob(policy.scheduler, eps, tb, x, eta, generator=generator, noise=noise_k)
        if with_reference:
            with policy.disable_adapters():
                eps_ref = model(x, tb, prompt_embeds, guidance_scale)
            ref_log_probs.append(ddim_step_with_logprob(policy.scheduler, eps_ref, tb, x, eta, prev_sample=x_next)[1])
            ref_means.append(ddim_mean_std(policy.scheduler, eps_ref, tb, x, eta)[0])  # for kl.gaussian_kl
        latents.append(x)
        next_latents.append(x_next)
        log_probs.append(log_prob)
        x = x_next

    out = {
        "prompts": prompts,
        "prompt_embeds": prompt_embeds,
        "initial_noise": initial_noise,
        "timesteps": timesteps.unsqueeze(0).expand(B, -1).clone(),
        "latents": torch.stack(latents, dim=1),
        "next_latents": torch.stack(next_latents, dim=1),
        "log_probs": torch.stack(log_probs, dim=1),
        "views": policy.decode(x),
    }
    if with_reference:
        out["ref_log_probs"] = torch.stack(ref_log_probs, dim=1)
        out["ref_means"] = torch.stack(ref_means, dim=1)
    return out


@torch.no_grad()
def sample_fixed_noise(policy, prompts, num_samples, *, seed, num_steps, guidance_scale, eta, batch_size,
                       cpu_bf16=False):
    # Evaluation samples (P, S, 4, 3, H, W): sample s of prompt i draws all its noise (initial and every step)
    # from a CPU generator seeded by (seed, "noise", i, s), so two checkpoints are compared on identical noise,
    # whatever the batch size or device, as Carve3D compares base and finetuned models (Fig. 3). Used by
    # evaluate.py and view3d.py. cpu_bf16: bf16 autocast on the CPU too (always on CUDA).
    flat = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
    out = []
    for b in range(0, len(flat), batch_size):
        chunk = flat[b:b + batch_size]
        with autocast(policy.device, cpu=cpu_bf16):
            traj = sample_trajectories(policy, [prompts[i] for i, _ in chunk], num_steps=num_steps,
                                       guidance_scale=guidance_scale, eta=eta,
                                       generator=[make_generator("cpu", seed, "noise", i, s) for i, s in chunk])
        out.append(traj["views"].float())
    views = torch.cat(out)
    return views.view(len(prompts), num_samples, *views.shape[1:])


if __name__ == "__main__":
    # Demo: toy-size trajectory; shows the per-step log-probs and the reference gap at init (0 with LoRA up = 0).
    policy = MVDreamPolicy.tiny(["a", "red", "blue", "green", "cube", "ball"], seed=0)
    policy.add_lora(4, 4)
    t0 = time.perf_counter()
    traj = sample_trajectories(policy, ["a red cube", "a blue ball"], num_steps=20, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), with_reference=True)
    print(f"20 steps x 2 prompts x 4 views in {time.perf_counter() - t0:.2f} s")
    print("timesteps", traj["timesteps"][0].tolist())
    print("log_probs[0]", [round(v, 3) for v in traj["log_probs"][0].tolist()])
    print("max |log_prob - ref_log_prob| at init:", (traj["log_probs"] - traj["ref_log_probs"]).abs().max().item())
