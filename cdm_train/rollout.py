"""Backward simulation on the dynamic continuous schedule (DESIGN.md step 1).

The student runs deterministic Euler from pure noise along a freshly drawn schedule,
without gradient. Per sample only three things are kept: x_i and v_i at its
trajectory index i (the student-step input and the direction for the off-trajectory
extrapolation), and x0_{i+1}, the prediction one step later (the final sample when
i + 1 = N), which trains the fake teacher.

Early exit: trajectory indices are drawn before the rollout and assigned to the batch
rows in descending order (rows are i.i.d., so this changes no distribution), which
makes the rows still needed at step k a prefix of the batch: a sample leaves after
step min(i + 1, N - 1) and the batch shrinks by slicing, with no index tensors and no
host sync. With early exit off every row runs all N steps; the recorded values are the
same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdm_kernels import euler_step

from .adapters import Cond, ModelAdapter, cond_select
from .config import ScheduleConfig


def sample_schedule(cfg: ScheduleConfig, generator: torch.Generator) -> list[float]:
    """[1.0] + sorted_desc(N - 1 draws of U(lo, hi)) + [0.0], N ~ U{1..Nmax}; or the fixed schedule."""
    if cfg.fixed is not None:
        return [float(s) for s in cfg.fixed] + [0.0]
    n = int(torch.randint(1, cfg.max_steps + 1, (1,), generator=generator))
    inner = torch.rand(n - 1, generator=generator, dtype=torch.float64)
    inner = cfg.inner_sigma_min + (cfg.inner_sigma_max - cfg.inner_sigma_min) * inner
    return [1.0] + sorted(inner.tolist(), reverse=True) + [0.0]


def sample_trajectory_indices(num_steps: int, batch: int, generator: torch.Generator) -> list[int]:
    """One index i ~ U{0..N-1} per sample, in descending order (see module docstring)."""
    draws = torch.randint(0, num_steps, (batch,), generator=generator).tolist()
    return sorted(draws, reverse=True)


def last_step_needed(index: int, num_steps: int) -> int:
    """The last rollout step a sample with trajectory index `index` needs: i + 1, or N - 1."""
    return min(index + 1, num_steps - 1)


@dataclass
class Rollout:
    sigmas: list[float]  # the schedule, N + 1 values from 1.0 to 0.0
    indices: list[int]  # trajectory index per sample (descending)
    x_i: torch.Tensor  # (B, ...) student input at step i
    v_i: torch.Tensor  # (B, ...) student velocity at step i
    sigma_i: torch.Tensor  # (B,) fp32
    x0_next: torch.Tensor  # (B, ...) x0 prediction at step i + 1 (final sample if i + 1 = N)
    nfe: int  # student forward evaluations (counted per sample)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@torch.no_grad()
def rollout(student: torch.nn.Module, adapter: ModelAdapter, cond: Cond, noise: torch.Tensor,
            sigmas: list[float], indices: list[int], *, early_exit: bool) -> Rollout:
    batch = noise.shape[0]
    n = len(sigmas) - 1
    if n < 1 or len(indices) != batch:
        raise ValueError(f"need >= 1 step and one index per sample (got {n} steps, {len(indices)} indices)")
    if any(a < b for a, b in zip(indices, indices[1:])) or not all(0 <= i < n for i in indices):
        raise ValueError("trajectory indices must be in [0, N) and descending")
    need = [last_step_needed(i, n) for i in indices]
    x_i = torch.empty_like(noise)
    v_i = torch.empty_like(noise)
    x0_next = torch.empty_like(noise)
    x = noise
    nfe = 0
    for k in range(max(need) + 1 if early_exit else n):
        active = sum(1 for s in need if s >= k) if early_exit else batch
        if active < x.shape[0]:
            x = x[:active]
        rows = slice(0, active)
        sigma = torch.full((active,), sigmas[k], device=x.device, dtype=torch.float32)
        c = cond if active == batch else cond_select(cond, rows)
        v = adapter(student, x, sigma, c).to(x.dtype)
        nfe += active
        x_next, x0 = euler_step(x, v, sigmas[k], sigmas[k + 1])
        # Rows are sorted by index (descending): those with i == k and i == k - 1 are contiguous.
        at_i = [b for b in range(active) if indices[b] == k]
        if at_i:
            sl = slice(at_i[0], at_i[-1] + 1)
            x_i[sl] = x[sl]
            v_i[sl] = v[sl]
            if k == n - 1:  # i + 1 = N: the "next prediction" is the final sample
                x0_next[sl] = x_next[sl]
        after_i = [b for b in range(active) if indices[b] == k - 1]
        if after_i:
            sl = slice(after_i[0], after_i[-1] + 1)
            x0_next[sl] = x0[sl]
        x = x_next
    sigma_i = torch.tensor([sigmas[i] for i in indices], dtype=torch.float32)
    sigma_i = sigma_i.to(noise.device, non_blocking=True)
    return Rollout(sigmas=sigmas, indices=list(indices), x_i=x_i, v_i=v_i, sigma_i=sigma_i, x0_next=x0_next,
                   nfe=nfe)
