"""Small helpers of the reference ops: compute dtype, sigma broadcasting, reductions."""

from __future__ import annotations

import torch


def compute_dtype(*tensors) -> torch.dtype:
    """fp32 arithmetic for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (for testing)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def sigma_view(sigma, ref: torch.Tensor, dtype: torch.dtype):
    """A Python float, or a detached tensor shaped (B, 1, ..., 1) to broadcast against ref.

    No gradient flows into sigma: it is a schedule value, not a model output.
    """
    if not isinstance(sigma, torch.Tensor):
        return float(sigma)
    sigma = sigma.detach().to(dtype)
    if sigma.dim() == 0:
        return sigma
    return sigma.reshape((sigma.shape[0],) + (1,) * (ref.dim() - 1))


def per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dim: (B, ...) -> (B,)."""
    if t.dim() == 1:
        return t
    return t.flatten(1).mean(dim=1)


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()
