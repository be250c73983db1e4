"""Few-step and many-step Euler sampling of flow-matching models (teacher or student)."""

from __future__ import annotations

import torch

from cdm_kernels import euler_step

from .cond import Cond, ModelAdapter, cond_cat
from .schedule import Shift, shift_sigmas


def uniform_sigmas(steps: int) -> list[float]:
    """[1, (steps-1)/steps, ..., 1/steps, 0]: the plain Euler schedule (the official 4-step inference
    schedule is uniform_sigmas(4) = [1, 0.75, 0.5, 0.25] + [0], before the model's shift)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [1.0 - k / steps for k in range(steps)] + [0.0]


@torch.no_grad()
def sample_euler(model: torch.nn.Module, adapter: ModelAdapter, cond: Cond, noise: torch.Tensor, steps: int,
                 guidance_scale: float | None = None, sigmas: list[float] | None = None,
                 shift: Shift | float = 1.0) -> torch.Tensor:
    """Deterministic Euler from pure noise (sigma 1) to data (sigma 0).

    `sigmas` (ending in 0) default to `uniform_sigmas(steps)`; either way they are shifted by the
    model scheduler's `shift`, as the diffusers pipeline does with the sigmas it is given.

    With guidance_scale (CFG), each step evaluates cond and uncond in one batched call
    and uses v_uncond + scale * (v_cond - v_uncond). Returns the final sample x(0).
    """
    sigmas = shift_sigmas(uniform_sigmas(steps) if sigmas is None else list(sigmas), shift)
    x = noise
    b = noise.shape[0]
    use_cfg = guidance_scale is not None and guidance_scale != 1.0
    both = cond_cat([cond, adapter.uncond(cond)]) if use_cfg else None
    for s_from, s_to in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((b,), s_from, device=x.device, dtype=torch.float32)
        if use_cfg:
            v_both = adapter(model, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
            v_cond, v_uncond = v_both[:b], v_both[b:]
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = adapter(model, x, sigma, cond)
        x, _ = euler_step(x, v.to(x.dtype), s_from, s_to)
    return x
