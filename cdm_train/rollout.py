"""Backward simulation on the dynamic continuous schedule (docs/design.md, step 1).

The student runs deterministic Euler from pure noise along a freshly drawn schedule,
shifted as the model's diffusers scheduler shifts it (schedule.py), without gradient.
Per sample only three things are kept, all at its trajectory index i: x_i and v_i (the
student-step input and the direction for the off-trajectory extrapolation) and
x0_i = x_i - s_i v_i, the prediction made at step i, which trains the fake teacher.
(The official code records `all_x0`, a list that starts with the initial noise, and
trains the fake teacher on `all_x0[i + 1]`: the same prediction made at step i.)

Early exit: trajectory indices are drawn before the rollout and assigned to the batch
rows in descending order (rows are i.i.d., so this changes no distribution), which
makes the rows still needed at step k a prefix of the batch: a sample leaves after
step i and the batch shrinks by slicing, with no index tensors and no host sync.
Expected cost on the official schedule (N ~ U{1..28}, i ~ U{0..N-1}): (N + 1) / 2
student calls per sample instead of N, 0.53 of the full rollout. With early exit off
every row runs all N steps; the recorded values are the same either way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cdm_kernels import euler_step

from .cond import Cond, ModelAdapter, cond_select
from .config import ScheduleConfig
from .rng import LENGTH, derive_seed
from .schedule import Shift, shift_sigmas


def official_num_steps(step: int, max_steps: int, batches_per_epoch: int = 1) -> int:
    """N as the official train.py draws it: ``random.Random((epoch, batch_idx)).randint(1, Nmax)``.

    The official environment is Python 3.10, where a tuple seed is replaced by its hash, cast to an unsigned
    64-bit integer (CPython's random_seed); Python 3.11+ refuses tuple seeds, so the hash is taken here. Tuples of
    ints hash the same in every process (no hash randomisation), so every rank draws the same N. The official
    SD3/LongCat configs have num_batches_per_epoch = 1: (epoch, batch_idx) = (step, 0).
    """
    epoch, batch_idx = divmod(int(step), int(batches_per_epoch))
    return random.Random(hash((epoch, batch_idx)) % 2**64).randint(1, int(max_steps))


def seeded_num_steps(seed: int, step: int, max_steps: int) -> int:
    """N from (seed, step) alone: the same on every rank, different for different seeds."""
    generator = torch.Generator().manual_seed(derive_seed(seed, 0, step, LENGTH))
    return int(torch.randint(1, max_steps + 1, (1,), generator=generator))


def draw_num_steps(cfg: ScheduleConfig, seed: int, step: int) -> int:
    """The rollout length of iteration `step`, shared by all ranks (schedule.length_draw)."""
    if cfg.length_draw == "official":
        return official_num_steps(step, cfg.max_steps)
    return seeded_num_steps(seed, step, cfg.max_steps)


def draw_schedule(cfg: ScheduleConfig, generator: torch.Generator, num_steps: int | None = None) -> list[float]:
    """The unshifted schedule: [1.0] + sorted_desc(N - 1 draws of U(lo, hi)) + [0.0]; or the fixed schedule +
    [0.0]. This is what the official code hands to the pipeline as `sigmas`. N is `num_steps` (shared by the
    ranks, `draw_num_steps`); None draws it from `generator` (for callers outside training). The inner sigmas
    come from `generator`: per rank, as the official code's global `random` (seeded with seed + rank)."""
    if cfg.fixed is not None:
        return [float(s) for s in cfg.fixed] + [0.0]
    n = int(torch.randint(1, cfg.max_steps + 1, (1,), generator=generator)) if num_steps is None else int(num_steps)
    if not 1 <= n <= cfg.max_steps:
        raise ValueError(f"num_steps: {n} outside [1, schedule.max_steps={cfg.max_steps}]")
    inner = torch.rand(n - 1, generator=generator, dtype=torch.float64)
    inner = cfg.inner_sigma_min + (cfg.inner_sigma_max - cfg.inner_sigma_min) * inner
    return [1.0] + sorted(inner.tolist(), reverse=True) + [0.0]


def sample_schedule(cfg: ScheduleConfig, generator: torch.Generator, shift: Shift | float = 1.0) -> list[float]:
    """`draw_schedule` shifted as the model's scheduler would shift it: the sigmas the rollout runs at."""
    return shift_sigmas(draw_schedule(cfg, generator), shift)


def sample_trajectory_indices(num_steps: int, batch: int, generator: torch.Generator) -> list[int]:
    """One index i ~ U{0..N-1} per sample, in descending order (see module docstring)."""
    draws = torch.randint(0, num_steps, (batch,), generator=generator).tolist()
    return sorted(draws, reverse=True)


def last_step_needed(index: int, num_steps: int) -> int:
    """The last rollout step a sample with trajectory index `index` needs: step i itself."""
    if not 0 <= index < num_steps:
        raise ValueError(f"trajectory index {index} outside [0, {num_steps})")
    return index


@dataclass
class Rollout:
    sigmas: list[float]  # the schedule, N + 1 values from 1.0 to 0.0
    indices: list[int]  # trajectory index per sample (descending)
    x_i: torch.Tensor  # (B, ...) student input at step i
    v_i: torch.Tensor  # (B, ...) student velocity at step i
    sigma_i: torch.Tensor  # (B,) fp32
    x0_i: torch.Tensor  # (B, ...) x0 prediction made at step i: x_i - s_i v_i (the fake teacher's target)
    nfe: int  # student forward evaluations (counted per sample)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@torch.no_grad()
def rollout(student: torch.nn.Module, adapter: ModelAdapter, cond: Cond, noise: torch.Tensor,
            sigmas: list[float], indices: list[int], *, early_exit: bool,
            state_dtype: torch.dtype | None = None) -> Rollout:
    """`state_dtype` (e.g. bf16, the official pipeline's latents): the trajectory is held in it between steps
    (x_k, v_k and the Euler update rounded to it, as diffusers' scheduler rounds to the model output's dtype);
    the model is fed those values in `noise`'s dtype (under bf16 autocast the same as feeding bf16), and the
    recorded x_i, v_i, x0_i come back in `noise`'s dtype, as the official training steps upcast them."""
    compute_dtype = noise.dtype
    if state_dtype is not None:
        noise = noise.to(state_dtype)
    batch = noise.shape[0]
    n = len(sigmas) - 1
    if n < 1 or len(indices) != batch:
        raise ValueError(f"need >= 1 step and one index per sample (got {n} steps, {len(indices)} indices)")
    if any(a < b for a, b in zip(indices, indices[1:])) or not all(0 <= i < n for i in indices):
        raise ValueError("trajectory indices must be in [0, N) and descending")
    need = [last_step_needed(i, n) for i in indices]
    x_i = torch.empty_like(noise)
    v_i = torch.empty_like(noise)
    x0_i = torch.empty_like(noise)
    x = noise
    nfe = 0
    for k in range(max(need) + 1 if early_exit else n):
        active = sum(1 for s in need if s >= k) if early_exit else batch
        if active < x.shape[0]:
            x = x[:active]
        rows = slice(0, active)
        sigma = torch.full((active,), sigmas[k], device=x.device, dtype=torch.float32)
        c = cond if active == batch else cond_select(cond, rows)
        v = adapter(student, x.to(compute_dtype), sigma, c).to(x.dtype)
        nfe += active
        # Rows are sorted by index (descending): those with i == k are contiguous.
        at_i = [b for b in range(active) if indices[b] == k]
        x_next, x0 = euler_step(x, v, sigmas[k], sigmas[k + 1])
        if at_i:
            sl = slice(at_i[0], at_i[-1] + 1)
            x_i[sl] = x[sl]
            v_i[sl] = v[sl]
            x0_i[sl] = x0[sl]
        x = x_next
    sigma_i = torch.tensor([sigmas[i] for i in indices], dtype=torch.float32)
    sigma_i = sigma_i.to(noise.device, non_blocking=True)
    x_i, v_i, x0_i = (t.to(compute_dtype) for t in (x_i, v_i, x0_i))
    return Rollout(sigmas=sigmas, indices=list(indices), x_i=x_i, v_i=v_i, sigma_i=sigma_i, x0_i=x0_i, nfe=nfe)
