# Sample diversity: the mean pairwise LPIPS between the samples of one prompt (Carve3D's claim is that RL keeps it
# while longer SFT loses it). Support code for train.py's validation and evaluate.py, which report the same number.
import torch


@torch.no_grad()
def per_prompt_diversity(views, lpips_model):
    """(P, S, 4, 3, H, W) -> (P,): mean pairwise LPIPS between the S samples of each prompt, averaged over the
    views; in fp32 whatever the views' dtype (validation calls it on bf16 rollouts too)."""
    P, S = views.shape[:2]
    if S < 2:
        return torch.full((P,), float("nan"))
    pairs = [(a, b) for a in range(S) for b in range(a + 1, S)]
    x = torch.stack([views[:, a] for a, _ in pairs], 1).flatten(0, 2).float()
    y = torch.stack([views[:, b] for _, b in pairs], 1).flatten(0, 2).float()
    d = torch.cat([lpips_model(x[i:i + 256], y[i:i + 256], normalize=True).flatten() for i in range(0, len(x), 256)])
    return d.view(P, -1).mean(1).cpu()

