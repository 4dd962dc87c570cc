import contextlib

import pytest
import torch

from mvdream import MVDreamPolicy
from ppo import micro_step_loss
from sample import sample_trajectories
from bench.gradient_noise import noise_scale, per_sample_gradients


def test_noise_scale_statistics_equal_brute_force():
    g = 1.0 + torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = noise_scale(g)
    pairs = [g[i] @ g[j] for i in range(7) for j in range(7) if i != j]  # E[g_i . g_j] = |G|^2 for i != j
    assert out["grad_sq"] == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-12)
    assert out["trace_cov"] == pytest.approx(g.var(0).sum().item(), rel=1e-12)
    assert out["noise_scale"] == pytest.approx(out["trace_cov"] / out["grad_sq"], rel=1e-12)
    # jackknife: the estimate recomputed without each sample in turn
    loo = torch.tensor([noise_scale(torch.cat([g[:i], g[i + 1:]]))["grad_sq"] for i in range(7)], dtype=torch.float64)
    se = (6 / 7 * ((loo - loo.mean()) ** 2).sum()).sqrt().item()
    assert out["grad_sq_se"] == pytest.approx(se, rel=1e-9)
    assert out["noise_scale_lower"] == pytest.approx(out["trace_cov"] / (out["grad_sq"] + 2 * se), rel=1e-9)
    with pytest.raises(ValueError, match="at least 3"):
        noise_scale(g[:2])
    assert noise_scale(g - g.mean(0))["noise_scale"] == float("inf")  # no mean gradient: no signal at any batch


def test_noise_scale_recovers_a_known_one():
    # g_i = G + N(0, s^2 I_d): B = d s^2 / |G|^2 = 50 * 4 / 2 = 100
    gen = torch.Generator().manual_seed(1)
    G = torch.zeros(50, dtype=torch.float64)
    G[:2] = 1.0
    g = G + 2.0 * torch.randn(20000, 50, generator=gen, dtype=torch.float64)
    assert noise_scale(g)["noise_scale"] == pytest.approx(100, rel=0.1)


def test_per_sample_gradients_average_to_the_batched_update_gradient(fill_lora_up):
    policy = MVDreamPolicy.tiny(["a", "red", "blue", "cube", "ball"], seed=0)
    policy.add_lora(4, 4)
    fill_lora_up(policy, 0.05, 0)
    samples = sample_trajectories(policy, ["a red cube", "a blue ball", "a red ball"], num_steps=3,
                                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -0.5, 2.0])
    params = [p for p in policy.parameters() if p.requires_grad]
    kw = dict(eta=1.0, guidance_scale=3.0, clip_range=1e-4, adv_clip_max=5.0, autocast=contextlib.nullcontext)
    per_step = per_sample_gradients(policy, samples, adv, params, **kw)
    assert per_step.shape == (3, 3, sum(p.numel() for p in params)) and (per_step.norm(dim=2) > 0).all()
    grads = per_step.mean(1)  # every timestep trained
    # train.py's update over the 3 samples (mean over samples and timesteps) by the batched micro-step
    mb = {k: samples[k] for k in ("prompt_embeds", "timesteps", "latents", "next_latents", "log_probs")}
    mb["advantages"] = adv
    for j in range(3):
        (micro_step_loss(policy, policy, mb, j, unmoved=True, **kw)[0] / 3).backward()
    batched = torch.cat([p.grad.flatten() for p in params])
    # equal up to the UNet's fp32 batching differences (measured up to 1.3e-7 absolute)
    torch.testing.assert_close(grads.mean(0), batched, rtol=1e-3, atol=1e-4 * batched.abs().max().item())
    assert not torch.allclose(grads[0], grads[1])
