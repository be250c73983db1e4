"""Per-step randomness derived from (seed, rank, step, stream).

Every iteration re-derives its generators from the step number instead of carrying
RNG state forward, so a resumed run draws exactly what an uninterrupted run would
(the checkpoint still records the global RNG states, for user code that uses them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Stream ids: one independent random stream per purpose.
HOST, DEVICE, NOISE_FAKE, NOISE_CA, NOISE_DM, NOISE_CDM = range(6)


def derive_seed(seed: int, rank: int, step: int, stream: int) -> int:
    """A 62-bit seed, well mixed (numpy SeedSequence), fits every generator and Philox."""
    state = np.random.SeedSequence([seed, rank, step, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 30 ^ int(state[1])) & (2**62 - 1)


@dataclass
class StepRandom:
    host: torch.Generator  # schedule, trajectory indices, prompt choice (host side: no device sync)
    device: torch.Generator  # noise and per-sample sigmas (drawn on the device)
    seeds: dict[int, int]  # Philox seeds for in-kernel noise, by stream id


def step_random(seed: int, rank: int, step: int, device: torch.device) -> StepRandom:
    host = torch.Generator().manual_seed(derive_seed(seed, rank, step, HOST))
    dev = torch.Generator(device=device).manual_seed(derive_seed(seed, rank, step, DEVICE))
    seeds = {s: derive_seed(seed, rank, step, s) for s in (NOISE_FAKE, NOISE_CA, NOISE_DM, NOISE_CDM)}
    return StepRandom(host=host, device=dev, seeds=seeds)


def capture_global_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
