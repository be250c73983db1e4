"""Euler extrapolation along a flow-matching velocity (reference twin of ops/euler.py)."""

from __future__ import annotations

import torch

from ._common import compute_dtype, sigma_view


def euler_extrapolate(x: torch.Tensor, v: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """x + (sigma_to - sigma_from) * v, computed in fp32, returned in x's dtype."""
    cd = compute_dtype(x, v)
    s_from = sigma_view(sigma_from, x, cd)
    s_to = sigma_view(sigma_to, x, cd)
    return (x.to(cd) + (s_to - s_from) * v.to(cd)).to(x.dtype)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_from, sigma_to) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic Euler step of the rollout: returns (x_next, x0_prediction).

    x0 = x - sigma_from * v is what the step "aims at"; x_next moves to sigma_to.
    At sigma_to = 0 the two are the same point.
    """
    cd = compute_dtype(x, v)
    s_from = sigma_view(sigma_from, x, cd)
    s_to = sigma_view(sigma_to, x, cd)
    x32, v32 = x.to(cd), v.to(cd)
    return (x32 + (s_to - s_from) * v32).to(x.dtype), (x32 - s_from * v32).to(x.dtype)
