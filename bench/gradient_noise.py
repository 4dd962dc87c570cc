# How many samples one policy-gradient update needs: the gradient noise scale B = tr(Sigma) / |G|^2 of
# McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv:1812.06162: the simple noise scale
# B_simple), G the expected gradient and Sigma the per-sample covariance. An update that averages B samples has a
# signal-to-noise ratio |G|^2 / (tr(Sigma) / B) of about 1; far fewer samples and the update is mostly noise.
# Support code for bench/noise_scale.py, which measures it for the Carve3D/DDPO gradient.
import torch

from ppo import micro_step_loss


def noise_scale(grads):
    """grads: (n, d) per-sample gradients. Unbiased |G|^2 (the mean of g_i . g_j over pairs i != j) with its
    jackknife standard error, tr(Sigma) (the summed per-coordinate sample variance), B = tr(Sigma) / |G|^2, and a
    lower bound on B, tr(Sigma) / (|G|^2 + 2 se): when the signal is weak, n samples cannot pin |G|^2 down, but
    they can bound it from above. B is inf where the bound on |G|^2 is <= 0."""
    g = grads.double()
    n = g.shape[0]
    if n < 3:
        raise ValueError(f"noise_scale needs at least 3 per-sample gradients, got {n}")
    total, sq = g.sum(0), (g * g).sum(1)

    def pairs_mean(tot, sumsq, m):  # mean of g_i . g_j over the m (m - 1) ordered pairs i != j
        return (tot.square().sum(-1) - sumsq) / (m * (m - 1))

    g2 = pairs_mean(total, sq.sum(), n)
    loo = pairs_mean(total[None] - g, sq.sum() - sq, n - 1)  # leave-one-out estimates, (n,)
    se = ((n - 1) / n * (loo - loo.mean()).square().sum()).sqrt()
    trace = ((g - g.mean(0)) ** 2).sum() / (n - 1)
    return {"n": n, "grad_sq": g2.item(), "grad_sq_se": se.item(), "trace_cov": trace.item(),
            "noise_scale": (trace / g2).item() if g2 > 0 else float("inf"),
            "noise_scale_lower": (trace / (g2 + 2 * se)).item() if g2 + 2 * se > 0 else float("inf")}


def per_sample_gradients(policy, samples, advantages, params, *, eta, guidance_scale, clip_range, adv_clip_max,
                         autocast):
    """(n, T, d): for each sample alone and each of its T timesteps, the gradient of train.py's PPO loss at ratio 1
    (the first, on-policy update), flattened over params. The mean over T is the sample's gradient when the update
    trains on every timestep (timestep_fraction 1); the mean over a random subset, when it trains on that subset."""
    keys = ("prompt_embeds", "timesteps", "latents", "next_latents", "log_probs")
    n, T = samples["latents"].shape[:2]
    out = []
    for i in range(n):
        mb = {k: samples[k][i:i + 1] for k in keys}
        mb["advantages"] = advantages[i:i + 1].to(samples["latents"].device)
        for j in range(T):
            for p in params:
                p.grad = None
            loss, _ = micro_step_loss(policy, policy, mb, j, eta=eta, guidance_scale=guidance_scale,
                                      clip_range=clip_range, adv_clip_max=adv_clip_max, autocast=autocast, unmoved=True)
            loss.backward()
            out.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                                  for p in params]).cpu())
    for p in params:
        p.grad = None
    return torch.stack(out).view(n, T, -1)
