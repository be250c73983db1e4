"""Re-noising onto the flow-matching path (reference twin of ops/renoise.py)."""

from __future__ import annotations

import torch

from ._common import compute_dtype, sigma_view
from .philox import philox_randn


def draw_noise(ref: torch.Tensor, seed: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """The shared seeded noise: element j of ref's logical layout is tl.randn(seed, offset + j)."""
    if torch.compiler.is_compiling():
        # Traced, the Philox rounds become a long graph of int64 ops that inductor does not finish compiling
        # (25+ min on a CPU, past 60 s on an H200); as one opaque op it compiles like any other.
        return _philox_noise_op(ref.detach(), int(seed), int(offset), dtype)  # noise takes no gradient
    return philox_randn(ref.shape, seed, offset, device=ref.device).to(dtype)


@torch.library.custom_op("cdm_kernels_reference::philox_noise", mutates_args=())
def _philox_noise_op(ref: torch.Tensor, seed: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """philox_randn of ref's shape on ref's device (ref's values are unused): eager, the same code as above."""
    return philox_randn(ref.shape, seed, offset, device=ref.device).to(dtype)


@_philox_noise_op.register_fake
def _(ref, seed, offset, dtype):
    return torch.empty(ref.shape, dtype=dtype, device=ref.device)


def renoise(x0: torch.Tensor, sigma, noise: torch.Tensor | None = None, *, seed: int | None = None,
            offset: int = 0) -> torch.Tensor:
    """(1 - sigma) * x0 + sigma * noise; noise given, or drawn from Philox(seed, offset)."""
    cd = compute_dtype(x0, noise)
    s = sigma_view(sigma, x0, cd)
    eps = noise.to(cd) if noise is not None else draw_noise(x0, seed, offset, cd)
    return ((1.0 - s) * x0.to(cd) + s * eps).to(x0.dtype)


def predict_x0_renoise(xt: torch.Tensor, v: torch.Tensor, sigma, sigma_teacher,
                       noise: torch.Tensor | None = None, *, seed: int | None = None,
                       offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher input from a student prediction: x0 = xt - sigma v, re-noised to sigma_teacher.

    Returns (x0, xt_teacher), both detached: the teacher's input is a stop-gradient
    quantity in every CDM loss.
    """
    cd = compute_dtype(xt, v, noise)
    with torch.no_grad():
        s = sigma_view(sigma, xt, cd)
        x0 = xt.detach().to(cd) - s * v.detach().to(cd)
        st = sigma_view(sigma_teacher, xt, cd)
        eps = noise.detach().to(cd) if noise is not None else draw_noise(xt, seed, offset, cd)
        xt_teacher = (1.0 - st) * x0 + st * eps
    return x0.to(xt.dtype), xt_teacher.to(xt.dtype)
