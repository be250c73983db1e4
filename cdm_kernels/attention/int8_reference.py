"""Pure-PyTorch twin of the Triton INT8-QK attention kernel (``_int8_kernels.py``).

Every rounding step of the kernel is reproduced here, so the kernel must agree with this
function up to float32 summation order (and the last bit of ``exp2``), and the accuracy of the
scheme can be measured on any device. Not a fast path: it materialises the full score matrix.

The scheme (SageAttention's "smoothed K, per-block INT8 QK^T", our own code):

- Q is pre-multiplied by ``softmax_scale * log2(e)`` in float32 (the kernel works with ``exp2``).
- K has its per-(batch, head) mean over tokens subtracted, ``torch.mean(k, dim=2,
  dtype=torch.float32)`` (the kernel's launcher computes it with that very call). Softmax over
  keys is invariant to a per-query constant, and ``q . mean(k)`` is one, so the result is the
  same attention while K's values shrink to their spread around the mean.
- Q is split into blocks of ``block_m`` tokens, K into blocks of ``block_n`` tokens (zero
  padded at the tail). Per (batch, head, block): ``amax = max(|x|, 1e-30)``,
  ``inv = 127 / amax`` and ``scale = amax / 127``, both correctly rounded float32 divisions,
  and ``x8 = round_half_even(clamp(x * inv, -127, 127))``: int8 in [-127, 127]. A block holding
  a NaN or an infinity gets a NaN scale, so non-finite input shows up in the output (an integer
  cannot carry a NaN).
- Scores are ``float32(q8 @ k8^T) * (q_scale * k_scale)``; the integer dot product is exact
  (int32 accumulate in the kernel; in float32 here, exact too since |sum| <= 127^2 * D < 2^24).
- Online softmax over key blocks, in base 2: ``m_j`` is the running row maximum after key
  block j (a cumulative max); ``p_j = exp2(s_j - m_j)`` in float32 is rounded to the PV dtype
  (fp16 for fp16 inputs, bf16 for bf16 and fp32 inputs: bf16 keeps fp32's range) and
  multiplied with V rounded to that dtype, float32 accumulate. Block j's numerator and
  denominator (the sum of the rounded ``p_j``) are carried to the end with the factor
  ``exp2(m_j - m_last)`` (the kernel's successive rescalings, which telescope to it).
"""

from __future__ import annotations

import math

import torch

from .reference import LOG2E

INT8_MAX = 127.0
AMAX_FLOOR = 1e-30


def pv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype P and V are rounded to for the PV product, given the input dtype."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _div_rn(a, b: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 a / b (torch's CPU division by a tensor is not always: it can
    multiply by the reciprocal). Double then float is exact rounding for a division."""
    return (a / b.double()).float()


def quantize_int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, H, S, D) float32 -> (int8 values held in float32 (B, H, S_pad, D), scales (B, H, n_blocks)).

    The kernel's quantisation, exactly: per-block amax, correctly rounded 127 / amax, clamp,
    round half to even. A block with a non-finite value gets a NaN scale.
    """
    b, h, s, d = x.shape
    n_blocks = -(-s // block)
    xp = torch.nn.functional.pad(x, (0, 0, 0, n_blocks * block - s))
    xb = xp.view(b, h, n_blocks, block, d)
    finite = torch.isfinite(xb).all(dim=-1).all(dim=-1)
    amax = torch.nan_to_num(xb.abs(), nan=0.0, posinf=0.0).amax(dim=(-1, -2)).clamp_min(AMAX_FLOOR)
    inv = _div_rn(INT8_MAX, amax)
    scale = torch.where(finite, (amax.double() / INT8_MAX).float(), torch.full_like(amax, float("nan")))
    x8 = (torch.nan_to_num(xb, nan=0.0, posinf=0.0, neginf=0.0) * inv[..., None, None]).clamp(-INT8_MAX, INT8_MAX)
    x8 = torch.round(x8)  # round half to even
    return x8.view(b, h, n_blocks * block, d), scale


def int8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    block_m: int = 128,
    block_n: int = 64,
    smooth_k: bool = True,
    round_pv: bool = True,
) -> torch.Tensor:
    """Emulate the INT8-QK attention kernel in PyTorch. q, k, v: (B, H, S, D); returns float32.

    ``smooth_k`` and ``round_pv`` exist to measure what each part of the scheme costs or buys;
    the kernel always smooths K and rounds P and V to the PV dtype.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, s, d = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    q_mult = torch.tensor(softmax_scale * LOG2E, dtype=torch.float32)  # the kernel's fp32 scalar argument
    qf = q.float() * q_mult.to(q.device)
    kf = k.float()
    if smooth_k:
        kf = kf - torch.mean(k, dim=2, dtype=torch.float32, keepdim=True)
    pv = pv_dtype(q.dtype)
    vf = v.to(pv).float() if round_pv else v.float()

    q8, q_scale = quantize_int8_blocks(qf, block_m)
    k8, k_scale = quantize_int8_blocks(kf, block_n)
    n_blocks = k8.shape[2] // block_n
    s_pad_n = n_blocks * block_n

    q_scale_tok = q_scale.repeat_interleave(block_m, dim=2)[..., :s]  # (B, H, S)
    k_scale_tok = k_scale.repeat_interleave(block_n, dim=2)  # (B, H, S_pad_n)
    dots = q8[:, :, :s] @ k8.transpose(-1, -2)  # integers, exact in float32
    scores = dots * (q_scale_tok[..., None] * k_scale_tok[..., None, :])
    key_valid = torch.arange(s_pad_n, device=q.device) < s
    scores = scores.masked_fill(~key_valid, float("-inf"))

    sb = scores.view(b, h, s, n_blocks, block_n)
    m_run = sb.amax(dim=-1).cummax(dim=-1).values  # (B, H, S, n_blocks): running max after each block
    p = torch.exp2(sb - m_run[..., None])
    if round_pv:
        p = p.to(pv).float()
    carry = torch.exp2(m_run - m_run[..., -1:])  # block j's weight at the end of the loop
    denom = (p.sum(dim=-1) * carry).sum(dim=-1)
    vp = torch.nn.functional.pad(vf, (0, 0, 0, s_pad_n - s)).view(b, h, n_blocks, block_n, d)
    pv_blocks = p.permute(0, 1, 3, 2, 4) @ vp  # (B, H, n_blocks, S, D)
    numer = (pv_blocks * carry.permute(0, 1, 3, 2)[..., None]).sum(dim=2)
    return numer / denom[..., None]


__all__ = ["int8_attention_reference", "quantize_int8_blocks", "pv_dtype", "INT8_MAX"]
