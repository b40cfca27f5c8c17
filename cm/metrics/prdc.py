"""Improved precision and recall of a generated set (Kynkäänniemi et al., NeurIPS 2019).

Each set's manifold is the union of balls around its samples, each ball's radius being the
distance to the sample's k-th nearest neighbour *in the same set* (itself excluded, by index,
so duplicated samples still get a proper neighbour). Precision is the fraction of generated
samples inside the real manifold; recall the fraction of real samples inside the generated one.

Pairwise distances are computed in row blocks of ``batch_size`` so 50k x 50k never sits in
memory at once: a block holds ``batch_size x N`` distances (2,048 x 50,000 float64 = 0.8 GB).
"""

from __future__ import annotations

import numpy as np
import torch

from cm.metrics.checks import check_feats


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m) between rows of a (n, D) and b (m, D), >= 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return d.clamp_min_(0)


def _kth_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Squared distance (N,) of each row of x to its k-th nearest other row of x."""
    out = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), batch_size):
        d = _sq_dists(x[i : i + batch_size], x)  # (B, N)
        rows = torch.arange(len(d), device=x.device)
        d[rows, rows + i] = float("inf")  # exclude self
        out[i : i + len(d)] = d.kthvalue(k, dim=1).values
    return out


@torch.no_grad()
def precision_recall(
    real_feats: np.ndarray,
    gen_feats: np.ndarray,
    k: int = 5,
    batch_size: int = 256,  # rows per block: 256 x 50,000 float64 distances = 100 MB per temporary
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """{"precision", "recall"} of generated features (M, D) against real ones (N, D).

    ``k`` is the neighbour used for the radii (5 in the paper); both sets need more than k
    rows. float64 by default so borderline ball memberships do not depend on round-off; use
    ``dtype=torch.float32`` on a GPU for speed (membership can then flip for points lying
    within ~1e-6 relative of a ball's surface).
    """
    real = check_feats("real_feats", real_feats)
    gen = check_feats("gen_feats", gen_feats)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"real_feats and gen_feats differ in feature dim: {real.shape[1]} vs {gen.shape[1]}")
    if not 1 <= k < min(len(real), len(gen)):
        raise ValueError(f"k must be in [1, min(N_real, N_gen) - 1]; got k={k} with {len(real)} real "
                         f"and {len(gen)} generated samples (need at least k+1 = {k + 1} of each)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    r = torch.as_tensor(real, dtype=dtype, device=device)  # (N, D)
    g = torch.as_tensor(gen, dtype=dtype, device=device)  # (M, D)
    r_rad, g_rad = _kth_radii(r, k, batch_size), _kth_radii(g, k, batch_size)  # (N,), (M,)

    # One pass over the (M, N) cross distances serves both directions.
    gen_in_real = torch.zeros(len(g), dtype=torch.bool, device=g.device)  # (M,)
    real_in_gen = torch.zeros(len(r), dtype=torch.bool, device=r.device)  # (N,)
    for i in range(0, len(g), batch_size):
        d = _sq_dists(g[i : i + batch_size], r)  # (B, N)
        gen_in_real[i : i + len(d)] = (d <= r_rad[None, :]).any(1)
        real_in_gen |= (d <= g_rad[i : i + len(d), None]).any(0)
    return {"precision": float(gen_in_real.double().mean()), "recall": float(real_in_gen.double().mean())}
