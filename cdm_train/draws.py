"""Every random draw of one training iteration, made up front in a fixed order.

The draws depend only on (seed, rank, world, step) and the config, never on the speed switches,
so reference and fast mode see the same randomness, a resumed run draws what an
uninterrupted one would, and a test can hand the very same draws to an independent
transcription of the official algorithm (tests/test_official_parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cond import Cond
from .config import Config
from .prompts import official_prompt_rows
from .rng import NOISE_CA, NOISE_CDM, NOISE_DM, NOISE_FAKE, StepRandom, step_random
from .rollout import draw_num_steps, draw_schedule, sample_trajectory_indices
from .schedule import Shift, shift_sigmas

# Rows of IterationDraws.uniform: one U(0, 1) draw per sample for each directly drawn training sigma.
U_FAKE, U_CA, U_DM, U_CDM_STUDENT, U_CDM_TEACHER = range(5)


@dataclass
class IterationDraws:
    raw_sigmas: list[float]  # the unshifted schedule, ending in 0 (what the official code passes as `sigmas`)
    sigmas: list[float]  # the same, shifted as the model's scheduler shifts it: the rollout's sigmas
    indices: list[int]  # trajectory index i per sample, descending (rows are i.i.d.)
    cond: Cond
    noise: torch.Tensor  # (B, ...) the rollout's initial noise
    uniform: torch.Tensor  # (5, B) fp32 U(0, 1): fake, CA (times s_i), DM, CDM student, CDM teacher sigmas
    rnd: StepRandom  # rnd.seeds: Philox seeds of the in-kernel noise (fake, CA, DM, CDM re-noising)

    @property
    def noise_seeds(self) -> dict[str, int]:
        s = self.rnd.seeds
        return {"fake": s[NOISE_FAKE], "ca": s[NOISE_CA], "dm": s[NOISE_DM], "cdm": s[NOISE_CDM]}


def draw_cond(cfg: Config, sample_cond, rnd: StepRandom, *, rank: int, world: int, step: int) -> Cond:
    """The step's conditioning: official prompt order (without replacement, train.prompt_order=epoch) for
    samplers over a prompt dataset (they have `size` and `take`), else the sampler's own draw (digits labels)."""
    batch = cfg.train.batch_size
    if cfg.train.prompt_order == "epoch" and hasattr(sample_cond, "take"):
        rows = official_prompt_rows(sample_cond.size, cfg.train.seed, step, rank, world, batch)
        return sample_cond.take(rows)
    return sample_cond(batch, rnd.host)


def draw_iteration(cfg: Config, sample_cond, latent_shape: tuple[int, ...], shift: Shift | float, *, rank: int,
                   step: int, device: torch.device, world: int = 1) -> IterationDraws:
    """The draws of iteration `step` on `rank` of `world` processes."""
    rnd = step_random(cfg.train.seed, rank, step, device)
    batch = cfg.train.batch_size
    raw = draw_schedule(cfg.schedule, rnd.host, draw_num_steps(cfg.schedule, cfg.train.seed, step))
    indices = sample_trajectory_indices(len(raw) - 1, batch, rnd.host)
    cond = draw_cond(cfg, sample_cond, rnd, rank=rank, world=world, step=step)
    noise = torch.randn((batch, *latent_shape), generator=rnd.device, device=device)
    uniform = torch.rand(5, batch, generator=rnd.device, device=device, dtype=torch.float32)
    return IterationDraws(raw_sigmas=raw, sigmas=shift_sigmas(raw, shift), indices=indices, cond=cond, noise=noise,
                          uniform=uniform, rnd=rnd)
