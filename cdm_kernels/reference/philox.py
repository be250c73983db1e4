"""Counter-based Philox-4x32-10 normal noise, bit-compatible with Triton's `tl.randn`.

Every backend draws the noise element `j` (logical row-major index in the `(B, ...)`
tensor) as ``tl.randn(seed, offset + j)``. This module is the plain-PyTorch twin of
that generator, so the reference backend produces the same noise as the fused kernels
(bitwise-identical uniforms; the Box-Muller step differs only by libm rounding) and a
kernel can regenerate noise instead of storing it.

uint32 arithmetic is emulated in int64 (torch has no uint32 multiply-high), splitting
one factor into 16-bit halves so no product overflows 63 bits.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_N_ROUNDS = 10
# Largest fp32 scale with INT32_MAX * scale < 1.0 (Triton's uint_to_uniform_float).
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xffffffff for a uint32 constant and uint32 tensor."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p_hi = a * b_hi  # < 2**48
    p_lo = a * b_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_uint32x4(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox-4x32-10 on counters (counter_lo, counter_hi, 0, 0) with key = seed (uint64).

    `counter` is an int64 tensor of non-negative counters. Returns four int64 tensors
    holding uint32 values.
    """
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    # Reinterpret as int32, fold negatives onto [0, 2**31), scale into [0, 1).
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.int32).to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_randn(shape, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """Standard normal fp32 noise of `shape`, element j = tl.randn(seed, offset + j)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    counter = torch.arange(numel, dtype=torch.int64, device=device) + offset
    r0, r1, _, _ = philox_uint32x4(seed, counter)
    u1 = torch.clamp_min(_uint32_to_uniform(r0), 1.0e-7)
    u2 = _uint32_to_uniform(r1)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return (radius * torch.cos(theta)).reshape(tuple(shape))
