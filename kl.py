"""KL regularisation to the SFT model (Carve3D Sec. 4.2) and the advantage it shapes.

Carve3D keeps the finetuned policy close to the model it starts from (the "SFT" model) so that RL
improves multi-view consistency without the distribution shift that longer SFT causes. The KL is
estimated on the very transitions the policy sampled, against the reference policy = the same UNet
with its LoRA adapters disabled, run on the same classifier-free-guidance inputs (sample.py computes
both log-probabilities during sampling). Per sample i with S denoising steps:

    KL_i = (1/S) sum_k [ log p_theta(x_k | x_{k-1}, c_i) - log p_ref(x_k | x_{k-1}, c_i) ]

where each log p is DDPO's per-dimension mean Gaussian log-density (sample.py), so KL_i is the
single-sample ("k1") estimate of the path KL divided by S * D (D = dimensions of one latent).

The config flags keep the names and meanings of Carve3D's code (desaixie/carve3d carve3d_train.py,
config/base.py; the final values in config/dgx.py, as its README's "KL-divergence Regularization" says):
    kl_log                       compute the reference log-probs on validation epochs and log val KL
    kl_penalty                   compute them on every sampling epoch and use the KL in training
    kl_in_reward                 put the KL into the advantage (else into the loss with weight kl_beta)
    kl_per_prompt_stat_tracking  z-score the KL per prompt with its own PerPromptStatTracker
    kl_normalized_coeff          c in  A = z_reward - c * z_KL                 (final paper value 0.2)
    kl_beta                      beta in loss += beta * mean(log p_theta - log p_ref)  (in-loss variant)
"""

import numpy as np
import torch

from stat_tracking import PerPromptStatTracker


def kl_estimate(log_probs, ref_log_probs):
    """(B, T) sampled-transition log-probs under policy and reference -> (B,) per-sample KL (mean over steps)."""
    if log_probs.shape != ref_log_probs.shape or log_probs.dim() != 2:
        raise ValueError(f"kl_estimate: log_probs {tuple(log_probs.shape)} and ref_log_probs "
                         f"{tuple(ref_log_probs.shape)} must both be (B, T)")
    return (log_probs.float() - ref_log_probs.float()).mean(dim=1)


def advantages_with_kl(z_reward, kl, prompts, kl_tracker, *, kl_in_reward, kl_per_prompt_stat_tracking,
                       kl_normalized_coeff):
    """Carve3D's advantage: A = z_reward - c * z_KL (Sec. 4.2, "KL in reward").

    z_reward comes from the reward's PerPromptStatTracker. With kl_per_prompt_stat_tracking the KL is
    z-scored per prompt by its own tracker (same buffer/min_count), so c trades off relative reward
    against relative KL within a prompt's recent history; without it the raw (tiny, per-dimension)
    KL is subtracted, as in Carve3D's other branch. With kl_in_reward False the advantage is the
    reward's alone and the KL enters the loss instead (kl_loss_term).
    """
    z_reward = np.asarray(z_reward, dtype=np.float64)
    if kl is None or not kl_in_reward:
        return z_reward
    kl = np.asarray(kl, dtype=np.float64)
    if kl.shape != z_reward.shape:
        raise ValueError(f"advantages_with_kl: kl {kl.shape} and rewards {z_reward.shape} must match")
    z_kl = kl_tracker.update(prompts, kl) if kl_per_prompt_stat_tracking else kl
    return z_reward - kl_normalized_coeff * z_kl


def kl_loss_term(log_prob, ref_log_prob, kl_beta):
    """In-loss KL (Carve3D's kl_in_reward=False branch): beta * mean(log p_theta - log p_ref).

    The gradient flows through the current policy's log-prob of the stored transition only; the
    reference log-prob was stored at sampling time. On-policy its expected gradient is zero
    (E_x~p[grad log p(x)] = 0): it pulls towards the reference only through the samples' noise.
    """
    return kl_beta * (log_prob - ref_log_prob.to(log_prob.dtype)).mean()


# ---------------------------------------------------------------------------------------------------
# Beyond Carve3D, off by default (config kl_mean_coeff, kl_target): the exact KL of every trained step in the loss.
# The z-scored KL above only ranks a prompt's samples against each other (per-prompt advantages have zero mean), so
# nothing pulls the policy as a whole back to the reference. KL(N(mu, s^2) || N(mu_ref, s^2)) per dimension is the
# per-step bound on the path KL that DPOK regularises with (Fan et al. 2023, Sec. 4); its gradient pulls mu towards
# mu_ref at every state. kl_target adapts its weight as PPO's adaptive KL penalty does (Schulman et al. 2017, Sec. 4).

def gaussian_kl(mean, ref_mean, std):
    """(B, ...) means of the policy and reference DDIM steps, shared std -> (B,) KL per dimension (mean over the
    non-batch dims, DDPO's log-prob convention). Differentiable in mean; ref_mean is the stored reference."""
    d = (mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)
    return d.mean(dim=tuple(range(1, d.dim())))


def adapt_kl_coeff(coeff, kl, target):
    """PPO's adaptive KL coefficient (Schulman et al. 2017, Sec. 4): halve it when the measured KL is below
    target / 1.5, double it above 1.5 x target."""
    return coeff / 2 if kl < target / 1.5 else coeff * 2 if kl > 1.5 * target else coeff


if __name__ == "__main__":
    # Two prompts, three samples each: the policy drifted further from the reference on sample 2.
    g = torch.Generator().manual_seed(0)
    logp = -1.0 + 0.01 * torch.randn(6, 20, generator=g)
    ref = logp - torch.tensor([1e-4, 2e-4, 9e-4, 1e-4, 1e-4, 3e-4])[:, None]
    kl = kl_estimate(logp, ref).numpy()
    prompts = ["a red cube"] * 3 + ["a blue ball"] * 3
    z_r = PerPromptStatTracker(9, 3).update(prompts, np.array([-0.3, -0.2, -0.1, -0.5, -0.4, -0.45]))
    adv = advantages_with_kl(z_r, kl, prompts, PerPromptStatTracker(9, 3), kl_in_reward=True,
                             kl_per_prompt_stat_tracking=True, kl_normalized_coeff=0.2)
    for p, k, zr, a in zip(prompts, kl, z_r, adv):
        print(f"{p:12s}  KL={k:.1e}  z_reward={zr:+.2f}  advantage={a:+.2f}")
