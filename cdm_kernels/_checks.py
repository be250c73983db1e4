"""Argument validation shared by every backend.

Runs before any kernel launch and raises ValueError naming the offending argument.
Only shape/dtype/device metadata is inspected, so the checks are free of host syncs
and trace cleanly under torch.compile.
"""

from __future__ import annotations

import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
MAX_SAMPLE_NUMEL = 2**31 - 1


def check_tensor(name: str, t, *, min_ndim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16, float64")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s) (batch first), got shape "
                         f"{tuple(t.shape)}")
    if t.dim() >= 1 and t.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch dimension")
    per_sample = t.numel() // t.shape[0] if t.dim() >= 1 else 1  # (no t[0]: a view costs a microsecond)
    if per_sample > MAX_SAMPLE_NUMEL:
        # The fused kernels index inside one sample with 32-bit offsets (the batch offset is 64-bit).
        raise ValueError(f"{name}: one sample holds {per_sample} elements (shape {tuple(t.shape)}); the fused "
                         f"ops index within a sample with 32-bit offsets, at most {MAX_SAMPLE_NUMEL}. Split the "
                         f"sample (e.g. along time) or use a smaller latent")
    return t


def check_like(name: str, t, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """t is a supported tensor of ref's shape on ref's device (ref already passed check_tensor)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in SUPPORTED_DTYPES:
        check_tensor(name, t)  # raises with the precise message
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    # Same shape as a checked ref: the dimension, batch and per-sample checks hold already.
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    return t


def check_sigma(name: str, sigma, ref: torch.Tensor):
    """Accept a Python number, a 0-d tensor, a (B,) tensor or a (B, 1, ..., 1) tensor."""
    if type(sigma) is float:  # the common cases first: numbers.Real is an ABC check (~1 us)
        return sigma
    if isinstance(sigma, bool):
        raise ValueError(f"{name} must be a float or a tensor, got bool")
    if not isinstance(sigma, torch.Tensor) and isinstance(sigma, numbers.Real):
        return float(sigma)
    if not isinstance(sigma, torch.Tensor):
        raise ValueError(f"{name} must be a float or a tensor, got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {sigma.dtype}")
    if sigma.device != ref.device:
        raise ValueError(f"{name} is on {sigma.device} but the data is on {ref.device}")
    batch = ref.shape[0]
    shape = tuple(sigma.shape)
    if not shape:
        return sigma
    ok_1d = len(shape) == 1 and shape[0] in (1, batch)
    ok_nd = ok_1d or (len(shape) == ref.dim() and shape[0] in (1, batch) and all(s == 1 for s in shape[1:]))
    if not (ok_1d or ok_nd):
        raise ValueError(f"{name} must be a float, a ({batch},) tensor or a ({batch}, 1, ..., 1) tensor "
                         f"matching the data's {ref.dim()} dims, got shape {shape}")
    return sigma


def check_reduction(reduction) -> str:
    if type(reduction) is not str or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_positive(name: str, value) -> float:
    if type(value) is float and 0.0 < value < float("inf"):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not value > 0.0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def check_finite_number(name: str, value) -> float:
    if type(value) is float and -float("inf") < value < float("inf"):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_noise_or_seed(noise, seed, offset, ref_name: str, ref: torch.Tensor):
    """Exactly one of `noise` (a tensor like ref) or `seed` (a non-negative int)."""
    if (noise is None) == (seed is None):
        raise ValueError("pass exactly one of noise (a tensor) or seed (an int for in-kernel Philox noise)")
    if noise is not None:
        check_like("noise", noise, ref_name, ref)
    else:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0 \
                or int(seed) >= 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or int(offset) < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if int(offset) + ref.numel() >= 2**31:
        # Kernels index the Philox counter with int32 (identical streams on every Triton version).
        raise ValueError(f"offset + numel must stay below 2**31 (offset={offset}, numel={ref.numel()})")
