# Small statistics for evaluate.py's tables: a paired bootstrap over prompts (every row of a table resampled with
# the same prompt indices, so differences between rows keep their pairing), percentile intervals, and piecewise-
# linear interpolation along a batch of curves. Support code.
import torch


def bootstrap_indices(n, resamples, seed):
    """(resamples, n) indices drawn with replacement from range(n), from a fixed seed: the same for every row."""
    if n < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs n >= 1 items and >= 1 resamples, got n={n}, resamples={resamples}")
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def percentile_ci(samples, level=0.95):
    """[lo, hi]: the (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap samples (NaNs, e.g. a ratio over a
    zero difference, left out; [nan, nan] when all are NaN)."""
    x = torch.as_tensor(samples, dtype=torch.float64).flatten()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.nanquantile(x, q).tolist() if (~x.isnan()).any() else [float("nan")] * 2


def interp_linear(x, xs, ys):
    """Piecewise-linear y at x through the points (xs, ys), continued past the ends along the end segments (a clamp
    would treat everything beyond the measured range as its end). x (...,); xs, ys (..., K), K >= 2, xs distinct;
    the points need not be sorted -> (...,)."""
    xs, order = xs.sort(-1)
    ys = ys.gather(-1, order)
    x = x[..., None]
    k = torch.searchsorted(xs.contiguous(), x.contiguous()).clamp(1, xs.shape[-1] - 1)   # right end of the segment
    x0, x1, y0, y1 = xs.gather(-1, k - 1), xs.gather(-1, k), ys.gather(-1, k - 1), ys.gather(-1, k)
    return (y0 + (y1 - y0) * (x - x0) / (x1 - x0)).squeeze(-1)
