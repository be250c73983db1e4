"""Per-step randomness derived from (seed, rank, step, stream).

Every iteration re-derives its generators from the step number instead of carrying
RNG state forward, so a resumed run draws exactly what an uninterrupted run would
(the checkpoint still records the global RNG states, for user code that uses them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

# Stream ids: one independent random stream per purpose.
HOST, DEVICE, NOISE_FAKE, NOISE_CA, NOISE_DM, NOISE_CDM, LENGTH = range(7)  # LENGTH: drawn with rank 0 on all ranks


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
    """The global torch / numpy RNG states, and the current CUDA device's (for user code that uses them).

    Training draws nothing from these (see the module docstring), so they are kept for
    completeness only. Only the current device's CUDA state is saved: a checkpoint must
    resume on a node with fewer visible GPUs (saved on 8, resumed on 4), and each rank
    uses one device anyway.
    """
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        state["cuda"] = torch.cuda.get_rng_state(index)
        state["cuda_device"] = index
    return state


def restore_global_rng(state: dict) -> None:
    """Inverse of `capture_global_rng`; also reads old checkpoints that hold one CUDA state per GPU."""
    # .cpu(): a checkpoint loaded with map_location=<cuda device> moves these byte tensors to the GPU.
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):  # old format: torch.cuda.get_rng_state_all() of the saving node
        if not cuda:
            log.info("checkpoint holds no CUDA RNG state; the current device's is left as it is")
            return
        if index >= len(cuda):
            log.info("checkpoint holds CUDA RNG states for %d device(s), none for device %d: using device 0's",
                     len(cuda), index)
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda.cpu(), index)
