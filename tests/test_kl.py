import numpy as np
import pytest
import torch

from kl import advantages_with_kl, kl_estimate, kl_loss_term
from stat_tracking import PerPromptStatTracker


def test_kl_estimate_is_mean_over_steps():
    lp = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.5]])
    ref = torch.tensor([[0.5, 2.0, 2.0], [0.0, 1.0, 0.5]])
    assert torch.allclose(kl_estimate(lp, ref), torch.tensor([0.5, -1 / 3]))
    with pytest.raises(ValueError, match="ref_log_probs"):
        kl_estimate(lp, ref[:, :2])


def test_kl_estimate_is_unbiased_for_the_per_dimension_path_kl():
    # x ~ N(mu_theta, s^2) per dim and step: E[KL_hat] = (1/(S D)) sum_k ||mu_theta - mu_ref||^2 / (2 s_k^2)
    # (Carve3D Sec. 4.2), with log-probs computed independently by torch.distributions.
    g = torch.Generator().manual_seed(0)
    n, S, D = 4000, 3, 8
    mu_t, mu_r = torch.randn(S, D, generator=g, dtype=torch.float64), torch.randn(S, D, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None]
    x = mu_t + sig * torch.randn(n, S, D, generator=g, dtype=torch.float64)
    lp = torch.distributions.Normal(mu_t, sig).log_prob(x).mean(-1)
    lr = torch.distributions.Normal(mu_r, sig).log_prob(x).mean(-1)
    est = kl_estimate(lp, lr)
    closed = (((mu_t - mu_r) ** 2).sum(-1) / (2 * sig[:, 0] ** 2)).sum() / (S * D)
    assert est.mean().item() == pytest.approx(closed.item(), abs=4 * est.std().item() / n ** 0.5)


def test_advantage_combines_reward_and_kl_z_scores():
    prompts = ["a", "a", "b", "b"]
    z_r = np.array([1.0, -1.0, 0.5, -0.5])
    kl = np.array([1e-4, 3e-4, 2e-4, 2e-4])
    tracker = PerPromptStatTracker(buffer_size=10, min_count=2)
    adv = advantages_with_kl(z_r, kl, prompts, tracker, kl_in_reward=True, kl_per_prompt_stat_tracking=True,
                             kl_normalized_coeff=0.2)
    z_kl_a = (np.array([1e-4, 3e-4]) - 2e-4) / (np.std([1e-4, 3e-4]) + 1e-6)
    z_kl_b = np.zeros(2)  # identical values: (x - mean) / (0 + 1e-6)
    assert np.allclose(adv, z_r - 0.2 * np.concatenate([z_kl_a, z_kl_b]))
    # Raw-KL branch and the in-loss branch.
    raw = advantages_with_kl(z_r, kl, prompts, tracker, kl_in_reward=True, kl_per_prompt_stat_tracking=False,
                             kl_normalized_coeff=0.2)
    assert np.allclose(raw, z_r - 0.2 * kl)
    assert np.array_equal(advantages_with_kl(z_r, kl, prompts, tracker, kl_in_reward=False,
                                             kl_per_prompt_stat_tracking=True, kl_normalized_coeff=0.2), z_r)


def test_kl_loss_term_gradient_flows_through_policy_only():
    lp = torch.tensor([0.1, 0.3], requires_grad=True)
    ref = torch.tensor([0.0, 0.0])
    loss = kl_loss_term(lp, ref, 0.001)
    loss.backward()
    assert loss.item() == pytest.approx(0.001 * 0.2)
    assert torch.allclose(lp.grad, torch.full((2,), 0.0005))


def test_gaussian_kl_matches_torch_distributions_per_dimension():
    from kl import gaussian_kl
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    std = torch.tensor([0.3, 0.7, 1.1]).view(3, 1, 1)  # one std per sample, as a DDIM step at per-sample t
    expect = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                               torch.distributions.Normal(ref, std.expand_as(ref)))
    got = gaussian_kl(mean, ref, std)
    assert got.shape == (3,) and torch.allclose(got, expect.mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(gaussian_kl(ref, ref, std), torch.zeros(3))
    # its gradient pulls the policy mean towards the reference
    m = mean.clone().requires_grad_(True)
    gaussian_kl(m, ref, std).sum().backward()
    assert (m.grad * (m.detach() - ref) > 0).all()


def test_carve3d_in_loss_kl_has_zero_expected_gradient_on_policy():
    # kl_loss_term differentiates log p(x) of x drawn from p itself: E[grad log p(x)] = 0 (kl.py's note)
    mu = torch.tensor(0.3, requires_grad=True)
    x = (mu.detach() + torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    log_p = -0.5 * (x - mu) ** 2
    kl_loss_term(log_p, log_p.detach() - 0.1, 1.0).backward()
    assert abs(mu.grad.item()) < 0.01                # vs the exact KL's gradient mu - mu_ref, far from 0 here


def test_adaptive_kl_coefficient_follows_ppos_rule():
    from kl import adapt_kl_coeff
    assert adapt_kl_coeff(0.1, 0.01, 0.1) == 0.05       # KL below target / 1.5: halve
    assert adapt_kl_coeff(0.1, 0.2, 0.1) == 0.2         # above 1.5 x target: double
    assert adapt_kl_coeff(0.1, 0.1, 0.1) == 0.1         # within: keep
    assert adapt_kl_coeff(0.1, 0.0667, 0.1) == 0.1 and adapt_kl_coeff(0.1, 0.149, 0.1) == 0.1
