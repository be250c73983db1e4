"""Sigma shifting, exactly as diffusers' FlowMatchEulerDiscreteScheduler applies it.

The official CDM code never shifts sigmas itself: it passes its schedules
(`[1.0] + sorted U(0.25, 0.95)` during training, `[1.0, 0.75, 0.5, 0.25]` at inference)
to the diffusers pipeline, whose scheduler's `set_timesteps(sigmas=...)` applies the
model's shift before sampling. So every anchor sigma the student is trained at is the
*shifted* one. The sigmas CDM draws directly (fake-teacher, teacher and off-trajectory
sigmas, `U(0, 1)` or `U(0, s_i)`, clamped to [0.02, 0.98]) never pass through the
scheduler and stay unshifted; the CA cap `s_i` is the shifted anchor sigma.

Static shift (SD3: 3.0): ``s -> shift * s / (1 + (shift - 1) * s)``.
Dynamic shift (Flux, `use_dynamic_shifting`): ``s -> e^mu / (e^mu + (1/s - 1))``
(diffusers' exponential `time_shift` with sigma 1), with ``mu`` linear in the image
token count (`flux_mu`, diffusers' `calculate_shift`). Both map 1 to 1 and 0 to 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shift:
    """How a model's scheduler shifts a sigma schedule: static `value`, or dynamic with `mu`."""

    value: float = 1.0
    mu: float | None = None  # set: dynamic (resolution-dependent) shifting; `value` is ignored

    def __call__(self, sigma: float) -> float:
        if self.mu is not None:
            if sigma <= 0.0:
                return 0.0
            return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / sigma - 1.0))
        return self.value * sigma / (1.0 + (self.value - 1.0) * sigma)

    @property
    def is_identity(self) -> bool:
        return self.mu is None and self.value == 1.0


def shift_sigmas(sigmas: list[float], shift: Shift | float) -> list[float]:
    """Apply the shift to each sigma (a trailing 0 stays 0, the leading 1 stays 1)."""
    if not isinstance(shift, Shift):
        shift = Shift(float(shift))
    if shift.is_identity:
        return [float(s) for s in sigmas]
    return [shift(float(s)) for s in sigmas]


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """diffusers' `calculate_shift`: mu grows linearly with the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_from_scheduler_config(model_dir: str | Path, image_seq_len: int | None = None) -> Shift | None:
    """The shift a diffusers model directory's `scheduler/scheduler_config.json` declares, or None.

    Dynamic shifting needs the image token count (`image_seq_len`) to compute mu.
    """
    path = Path(model_dir) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    conf = json.loads(path.read_text(encoding="utf-8"))
    if conf.get("use_dynamic_shifting"):
        if image_seq_len is None:
            raise ValueError(f"{path}: dynamic shifting needs the image token count")
        return Shift(mu=flux_mu(image_seq_len, conf.get("base_image_seq_len", 256),
                                conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                                conf.get("max_shift", 1.15)))
    return Shift(float(conf.get("shift", 1.0)))
