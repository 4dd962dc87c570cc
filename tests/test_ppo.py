import numpy as np
import pytest
import torch

from ppo import ppo_loss, shuffle_samples


def test_ppo_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(16, generator=g, dtype=torch.float64) * 1e-3
    new = old + torch.randn(16, generator=g, dtype=torch.float64) * 2e-4
    adv = torch.randn(16, generator=g, dtype=torch.float64) * 4
    clip, amax = 1e-4, 5.0
    loss, info = ppo_loss(new, old, adv, clip, amax)
    terms, clipped = [], 0
    for n, o, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        a = min(max(a, -amax), amax)
        r = np.exp(n - o)
        terms.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
        clipped += abs(r - 1) > clip
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-12, abs=1e-15)
    assert info["clipfrac"].item() == pytest.approx(clipped / 16)
    assert info["approx_kl"].item() == pytest.approx(0.5 * np.mean((new - old).numpy() ** 2), rel=1e-12)
    assert info["ratio_dev"].item() == pytest.approx(np.mean(np.abs(np.exp((new - old).numpy()) - 1)), rel=1e-9)


def test_ppo_gradient_is_policy_gradient_on_policy_and_zero_when_clipped():
    # On-policy (ratio 1): d loss / d log_prob_i = -A_i / n, the score-function estimator (Carve3D Sec. 4.1).
    adv = torch.tensor([1.0, -2.0, 7.0])
    logp = torch.zeros(3, requires_grad=True)
    ppo_loss(logp, torch.zeros(3), adv, 1e-4, 5.0)[0].backward()
    assert torch.allclose(logp.grad, -torch.tensor([1.0, -2.0, 5.0]) / 3)
    # Ratio beyond the clip in the direction the advantage favours: no gradient.
    logp = torch.tensor([1e-3, -1e-3], requires_grad=True)
    ppo_loss(logp, torch.zeros(2), torch.tensor([1.0, -1.0]), 1e-4, 5.0)[0].backward()
    assert torch.all(logp.grad == 0)


def test_shuffle_keeps_transitions_paired_and_applies_timestep_fraction():
    B, T = 5, 6
    t = torch.arange(B * T).view(B, T)
    samples = {"timesteps": t, "latents": t.view(B, T, 1, 1, 1).float().expand(B, T, 2, 3, 3).clone(),
               "next_latents": -t.view(B, T, 1).float(), "log_probs": t.double() * 0.5,
               "prompt_embeds": torch.arange(B).view(B, 1, 1).float().expand(B, T, 4).clone(),
               "advantages": torch.arange(B).float()}
    out = shuffle_samples(samples, torch.Generator().manual_seed(1), num_train_timesteps=4)
    assert out["timesteps"].shape == (B, 4)
    rows = out["timesteps"] // T
    assert torch.all(rows == rows[:, :1])                                 # each row stays one sample
    assert sorted(rows[:, 0].tolist()) == list(range(B))                  # a permutation of samples
    assert torch.equal(out["advantages"], rows[:, 0].float())            # advantages follow their sample
    assert torch.equal(out["prompt_embeds"][:, 0, 0], rows[:, 0].float())  # (B, L, D) not permuted in time
    assert torch.equal(out["latents"][:, :, 0, 0, 0], out["timesteps"].float())
    assert torch.equal(out["next_latents"][..., 0], -out["timesteps"].float())
    assert torch.equal(out["log_probs"], out["timesteps"].double() * 0.5)
    for r in range(B):                                                   # distinct timesteps per sample
        assert len(set(out["timesteps"][r].tolist())) == 4
    # Different per-sample time orders (the point of shuffling along time).
    assert len({tuple((out["timesteps"][r] % T).tolist()) for r in range(B)}) > 1


@pytest.mark.parametrize("coeff", [0.0, 10.0])
def test_exact_kl_term_pulls_a_moved_policy_back_to_the_reference(coeff, fill_lora_up):
    # advantages 0: the PPO surrogate has no gradient, so the only force is kl_mean_coeff x gaussian_kl
    from mvdream import MVDreamPolicy
    from ppo import ppo_update
    from sample import sample_trajectories
    from support.batch_plan import BatchPlan
    from toy.world import VOCAB
    policy = MVDreamPolicy.tiny(VOCAB, seed=0)
    policy.add_lora(4, 4)
    fill_lora_up(policy, 0.1, 4)                     # a policy that has moved away from the reference
    traj = sample_trajectories(policy, ["a red cube", "a blue ball"], num_steps=3, guidance_scale=2.0,
                               generator=torch.Generator().manual_seed(0), with_reference=True)
    samples = {k: traj[k] for k in ("prompt_embeds", "timesteps", "latents", "next_latents", "log_probs",
                                    "ref_log_probs", "ref_means")}
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)         # small enough not to overshoot (lr 1e-2 oscillates)
    plan = BatchPlan(world_size=1, samples_per_epoch=2, updates_per_epoch=1, micro_batch_size=2, num_steps=3)
    kls = []
    for step in range(4):
        info = ppo_update(policy, policy, samples, torch.zeros(2), opt, plan, eta=1.0, guidance_scale=2.0,
                          train_cfg=True, clip_range=1e-4, adv_clip_max=5.0, max_grad_norm=1.0,
                          generator=torch.Generator().manual_seed(step), kl_mean_coeff=coeff)
        kls.append(info[0]["kl_step"])
    assert kls[0] > 0
    if coeff == 0:
        assert kls[3] == pytest.approx(kls[0], rel=1e-5)   # nothing moves the policy
    else:                                                  # measured before each step: falling at every step
        assert all(b < a for a, b in zip(kls, kls[1:])) and kls[3] < 0.8 * kls[0], kls
