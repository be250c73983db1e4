"""Flow-matching loss of the fake teacher (reference twin of ops/flow_matching.py).

loss = mean((pred_v - (noise - x0))^2) over non-batch dims, then batch mean. With a
seed the noise is regenerated from Philox(seed, offset), the same noise that
`renoise(x0, sigma, seed=seed, offset=offset)` used to build the model input, so the
trainer never stores it. Only pred_v receives a gradient (x0 and noise are targets).
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, per_sample_mean, reduce_per_sample
from .renoise import draw_noise


def flow_matching_loss(pred_v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None = None, *,
                       seed: int | None = None, offset: int = 0, reduction: str = "mean") -> torch.Tensor:
    cd = compute_dtype(pred_v, x0, noise)
    eps = noise.detach().to(cd) if noise is not None else draw_noise(x0, seed, offset, cd)
    target = eps - x0.detach().to(cd)
    per_sample = per_sample_mean((pred_v.to(cd) - target) ** 2)
    return reduce_per_sample(per_sample, reduction)
