import contextlib
import math

import pytest
import torch

from mvdream import MVDreamPolicy, make_scheduler
from sample import alphas_cumprod_on, ddim_mean_std, ddim_step_with_logprob, sample_fixed_noise, sample_trajectories

VOCAB = ["a", "red", "blue", "green", "cube", "ball"]
PROMPTS = ["a red cube", "a blue ball"]


def _scheduler(steps):
    s = make_scheduler()
    s.set_timesteps(steps)
    return s


def _mixed_batch(steps=20, seed=0):
    # per-sample timesteps incl. the first and the last step (t = 1 -> previous step clamped to 0)
    s = _scheduler(steps)
    t = torch.stack([s.timesteps[0], s.timesteps[7], s.timesteps[-2], s.timesteps[-1]])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 3, 8, 8, generator=g)
    eps = torch.randn(4, 4, 3, 8, 8, generator=g)
    return s, t, x, eps


def test_eta0_equals_diffusers_ddim_step():
    s, t, x, eps = _mixed_batch()
    ours, log_prob = ddim_step_with_logprob(s, eps, t, x, eta=0.0)
    assert t[-1] == 1 and ours.dtype == torch.float32
    for i in range(4):
        ref = s.step(eps[i:i + 1], int(t[i]), x[i:i + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[i:i + 1], ref, atol=1e-5, rtol=1e-5)
    assert torch.isnan(log_prob).all()  # no density for a deterministic step


def test_eta1_sample_matches_diffusers_and_logprob_matches_normal():
    s, t, x, eps = _mixed_batch()
    ours, log_prob = ddim_step_with_logprob(s, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for i in range(4):
        ti = int(t[i])
        # diffusers' own step with the same noise (variance_noise) and with zero noise (= the mean)
        ref = s.step(eps[i:i + 1], ti, x[i:i + 1], eta=1.0, variance_noise=noise[i:i + 1]).prev_sample
        zero = torch.zeros_like(noise[i:i + 1])
        mean = s.step(eps[i:i + 1], ti, x[i:i + 1], eta=1.0, variance_noise=zero).prev_sample
        std = s._get_variance(ti, ti - 1000 // 20).sqrt()
        torch.testing.assert_close(ours[i:i + 1], ref, atol=1e-5, rtol=1e-5)
        want = torch.distributions.Normal(mean.double(), std.double()).log_prob(ours[i:i + 1].double()).mean()
        torch.testing.assert_close(log_prob[i].double(), want, atol=1e-4, rtol=1e-5)
    assert log_prob.shape == (4,) and log_prob.dtype == torch.float32


def test_given_prev_sample_is_scored_not_resampled():
    s, t, x, eps = _mixed_batch()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    prev, lp = ddim_step_with_logprob(s, eps.half(), t, x.half(), eta=1.0, prev_sample=target)
    assert torch.equal(prev, target) and prev.dtype == torch.float32
    # fp16 inputs are upcast: same log-prob as fp32 inputs holding the same values
    lp32 = ddim_step_with_logprob(s, eps.half().float(), t, x.half().float(), eta=1.0, prev_sample=target)[1]
    assert torch.equal(lp, lp32) and torch.isfinite(lp).all()
    # moving the target away from the mean lowers its density
    lp_far = ddim_step_with_logprob(s, eps, t, x, eta=1.0, prev_sample=target + 3.0)[1]
    assert (lp_far < lp).all()


def test_log_prob_gradient_flows_through_model_output_only():
    s, t, x, eps = _mixed_batch()
    eps = eps.clone().requires_grad_(True)
    target = torch.randn(x.shape).requires_grad_(True)
    lp = ddim_step_with_logprob(s, eps, t, x, eta=1.0, prev_sample=target)[1]
    lp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0 and target.grad is None


def test_requires_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(make_scheduler(), torch.zeros(1, 4), torch.tensor([1]), torch.zeros(1, 4), 1.0)


@pytest.mark.parametrize("steps", [20, 25, 50])
def test_timesteps_equal_the_original_ddim_sampler(steps):
    # MVDream's DDIMSampler: range(0, 1000, 1000 // S) + 1, run in reverse (mvdream/ldm/models/diffusion/ddim.py)
    original = [t + 1 for t in range(0, 1000, 1000 // steps)][::-1]
    assert _scheduler(steps).timesteps.tolist() == original


def test_30_steps_trap_is_real():
    original = [t + 1 for t in range(0, 1000, 1000 // 30)][::-1]
    ours = _scheduler(30).timesteps.tolist()
    assert (len(original), len(ours)) == (31, 30) and original[1:] == ours


# ---------------------------------------------------------------------------------------------------
# Trajectories with the tiny model

@pytest.fixture(scope="module")
def policy():
    p = MVDreamPolicy.tiny(VOCAB, seed=0)
    p.add_lora(4, 4)
    return p


def _replay(policy, traj, guidance_scale, eta=1.0, reference=False):
    out = []
    for j in range(traj["timesteps"].shape[1]):
        with torch.no_grad(), (policy.disable_adapters() if reference else contextlib.nullcontext()):
            eps = policy(traj["latents"][:, j], traj["timesteps"][:, j], traj["prompt_embeds"], guidance_scale)
        out.append(ddim_step_with_logprob(policy.scheduler, eps, traj["timesteps"][:, j], traj["latents"][:, j], eta,
                                          prev_sample=traj["next_latents"][:, j])[1])
    return torch.stack(out, dim=1)


def test_trajectory_layout(policy):
    traj = sample_trajectories(policy, PROMPTS, num_steps=4, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0), with_reference=True)
    B, T = 2, 4
    assert traj["prompts"] == PROMPTS
    assert traj["prompt_embeds"].shape == (B, 16, 64)
    assert traj["timesteps"].tolist() == [[751, 501, 251, 1]] * B
    assert traj["latents"].shape == traj["next_latents"].shape == (B, T, 4, 4, 16, 16)
    assert traj["latents"].dtype == traj["next_latents"].dtype == torch.float32
    assert traj["log_probs"].shape == traj["ref_log_probs"].shape == (B, T)
    assert traj["views"].shape == (B, 4, 3, 64, 64) and 0 <= traj["views"].min() and traj["views"].max() <= 1
    assert torch.equal(traj["latents"][:, 0], traj["initial_noise"])
    assert torch.equal(traj["latents"][:, 1:], traj["next_latents"][:, :-1])  # a chain
    assert torch.equal(traj["views"], policy.decode(traj["next_latents"][:, -1]))


def test_replay_reproduces_log_probs_and_reference_equals_policy_at_init(policy):
    traj = sample_trajectories(policy, PROMPTS, num_steps=4, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(1), with_reference=True)
    ratio = torch.exp(_replay(policy, traj, 3.0) - traj["log_probs"])
    assert (ratio - 1).abs().max() <= 1e-5
    assert torch.equal(traj["ref_log_probs"], traj["log_probs"])  # LoRA up = 0: policy == reference


def test_replay_with_trained_lora_and_reference_differs(fill_lora_up):
    p = MVDreamPolicy.tiny(VOCAB, seed=0)
    p.add_lora(4, 4)
    fill_lora_up(p, 0.1, 4)
    traj = sample_trajectories(p, PROMPTS, num_steps=3, guidance_scale=2.0,
                               generator=torch.Generator().manual_seed(2), with_reference=True)
    assert (torch.exp(_replay(p, traj, 2.0) - traj["log_probs"]) - 1).abs().max() <= 1e-5
    assert (torch.exp(_replay(p, traj, 2.0, reference=True) - traj["ref_log_probs"]) - 1).abs().max() <= 1e-5
    assert (traj["log_probs"] - traj["ref_log_probs"]).abs().max() > 1e-6
    # ref_means (for kl.gaussian_kl) re-score the stored transition as ref_log_probs does: the Gaussian
    # log-density of next_latents under N(ref_mean, std^2), recomputed here by hand
    assert traj["ref_means"].shape == traj["latents"].shape
    for j in range(3):
        t, x = traj["timesteps"][:, j], traj["latents"][:, j]
        _, std = ddim_mean_std(p.scheduler, torch.zeros_like(x), t, x, 1.0)   # std does not depend on eps
        lp = -((traj["next_latents"][:, j] - traj["ref_means"][:, j]) ** 2) / (2 * std ** 2) - std.log() \
            - math.log(math.sqrt(2 * math.pi))
        assert torch.allclose(lp.mean(dim=(1, 2, 3, 4)), traj["ref_log_probs"][:, j], atol=1e-5)


def test_sampling_is_deterministic_given_the_generator(policy):
    def run(seed):
        return sample_trajectories(policy, PROMPTS[:1], num_steps=2, guidance_scale=3.0,
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a["next_latents"], b["next_latents"]) and not torch.equal(a["next_latents"], c["next_latents"])
    with pytest.raises(ValueError, match="initial_noise"):
        sample_trajectories(policy, PROMPTS, num_steps=2, guidance_scale=3.0,
                            initial_noise=torch.zeros(1, 4, 4, 16, 16))


def test_per_sample_generators_make_noise_independent_of_batching(policy):
    # train.py and evaluate.py give every sample its own generator: a sample's noise must not depend on which
    # other samples share its batch (so 1 and 2 GPUs, or two batch sizes, sample the same trajectories)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = sample_trajectories(policy, PROMPTS, num_steps=3, guidance_scale=3.0, generator=gens([11, 12]))
    alone = [sample_trajectories(policy, [p], num_steps=3, guidance_scale=3.0, generator=gens([s]))
             for p, s in zip(PROMPTS, [11, 12])]
    # the noise is bit-identical; the UNet's batched fp32 arithmetic is not (torch 2.15 on CPU: up to 1.1e-5),
    # while noise drawn per batch instead of per sample would move the latents by O(0.1)
    for i, one in enumerate(alone):
        assert torch.equal(both["initial_noise"][i], one["initial_noise"][0])
        torch.testing.assert_close(both["next_latents"][i], one["next_latents"][0], atol=1e-4, rtol=1e-4)
    swapped = sample_trajectories(policy, PROMPTS[::-1], num_steps=3, guidance_scale=3.0, generator=gens([12, 11]))
    torch.testing.assert_close(swapped["next_latents"][1], both["next_latents"][0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one per sample"):
        sample_trajectories(policy, PROMPTS, num_steps=3, guidance_scale=3.0, generator=gens([1]))


def test_alpha_bar_is_copied_to_another_device_once():
    # a host-to-device copy per DDIM step would be a host sync per step on a GPU; the meta device stands in for it
    scheduler = make_scheduler()
    on_meta = alphas_cumprod_on(scheduler, torch.device("meta"))
    assert alphas_cumprod_on(scheduler, torch.device("meta")) is on_meta and on_meta.shape == (1000,)
    assert torch.equal(alphas_cumprod_on(scheduler, torch.device("cpu")), scheduler.alphas_cumprod.float())


def test_cpu_bf16_sampling_is_opt_in_and_close_to_fp32(policy):
    # evaluate.py --bf16: the UNet under bf16 autocast on the CPU. Off by default (fp32, bit for bit as before);
    # on, the samples move by bf16 rounding only (max 0.03 here), not by another noise (max ~1).
    kw = dict(seed=3, num_steps=3, guidance_scale=3.0, eta=1.0, batch_size=2)
    fp32 = sample_fixed_noise(policy, PROMPTS, 1, **kw)
    assert torch.equal(sample_fixed_noise(policy, PROMPTS, 1, cpu_bf16=False, **kw), fp32)
    bf16 = sample_fixed_noise(policy, PROMPTS, 1, cpu_bf16=True, **kw)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.1  # images in [0, 1]
