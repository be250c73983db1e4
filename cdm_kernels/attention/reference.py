"""Pure-PyTorch twin of the Triton FP8 attention kernel: the same quantisation, emulated.

Every rounding step of the kernel is reproduced here (float8 e4m3 with round-to-nearest-even,
per-(batch, head, block) scales, K smoothing, P quantised per row and key block), so the kernel
must agree with this function up to float32 summation order, and the accuracy of the scheme
itself can be measured on any device. Not a fast path: it materialises the full score matrix.

The quantisation scheme (shared with `_kernels.py`):

- Q is pre-multiplied by ``softmax_scale * log2(e)`` (the kernel works with ``exp2``), K has
  its per-(batch, head) mean over tokens subtracted (softmax over keys is invariant to a
  per-query constant, and ``q . mean(k)`` is exactly such a constant), V is left as is.
- Each is split into blocks of tokens (``block_m`` for Q, ``block_n`` for K and V); a block's
  scale is ``amax(|x|) / 448`` and its float8 values are ``rne_e4m3(x * (448 / amax))``.
- Scores are ``(q8 @ k8^T) * q_scale * k_scale``. For each query row and key block, the
  probabilities are quantised against the block's own row maximum ``m_blk``:
  ``p8 = rne_e4m3(448 * exp2(s - m_blk))``, and the block contributes
  ``(p8 @ v8) * v_scale * exp2(m_blk - m) / 448`` to the numerator, where ``m`` is the row's
  overall maximum. The denominator sums the unquantised ``exp2(s - m)``.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0
LOG2E = 1.4426950408889634
# A block whose values are all zero gets this amax, so scales never divide by zero.
AMAX_FLOOR = 1e-30


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values onto the float8 e4m3fn grid (nearest-even), saturating at +-448."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def _quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x: (B, H, S, D) float32 -> (dequantisable float8 grid values, per-block scales, padded S)."""
    b, h, s, d = x.shape
    n_blocks = -(-s // block)
    s_pad = n_blocks * block
    xp = torch.nn.functional.pad(x, (0, 0, 0, s_pad - s))
    xb = xp.view(b, h, n_blocks, block, d)
    amax = xb.abs().amax(dim=(-1, -2)).clamp_min(AMAX_FLOOR)  # (B, H, n_blocks)
    inv = E4M3_MAX / amax
    scale = amax * (1.0 / E4M3_MAX)
    x8 = round_to_e4m3(xb * inv[..., None, None])
    return x8.view(b, h, s_pad, d), scale, s_pad


def fp8_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    block_m: int = 128,
    block_n: int = 64,
    smooth_k: bool = True,
    quantize_p: bool = True,
) -> torch.Tensor:
    """Emulate `fp8_attention` in PyTorch. q, k, v: (B, H, S, D); returns float32 (B, H, S, D).

    ``smooth_k`` and ``quantize_p`` exist to measure what each part of the scheme buys; the
    kernel always smooths K and quantises P.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, s, d = q.shape
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    qf = q.float() * (softmax_scale * LOG2E)
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=2, keepdim=True)
    vf = v.float()

    q8, q_scale, _ = _quantize_blocks(qf, block_m)
    k8, k_scale, s_pad_n = _quantize_blocks(kf, block_n)
    v8, v_scale, _ = _quantize_blocks(vf, block_n)
    n_blocks = s_pad_n // block_n

    q_scale_tok = q_scale.repeat_interleave(block_m, dim=2)[..., :s]  # (B, H, S)
    k_scale_tok = k_scale.repeat_interleave(block_n, dim=2)  # (B, H, S_pad_n)
    scores = (q8[:, :, :s] @ k8.transpose(-1, -2)) * q_scale_tok[..., None] * k_scale_tok[..., None, :]
    key_valid = torch.arange(s_pad_n, device=q.device) < s
    scores = scores.masked_fill(~key_valid, float("-inf"))

    sb = scores.view(b, h, s, n_blocks, block_n)
    m_blk = sb.amax(dim=-1)  # (B, H, S, n_blocks); every block holds at least one valid key
    m = m_blk.amax(dim=-1, keepdim=True)
    p_scaled = torch.exp2(sb - m_blk[..., None]) * E4M3_MAX
    row_factor = torch.exp2(m_blk - m) * (1.0 / E4M3_MAX)  # (B, H, S, n_blocks)
    denom = (p_scaled.sum(dim=-1) * row_factor).sum(dim=-1)
    p8 = round_to_e4m3(p_scaled) if quantize_p else p_scaled

    vb = v8.view(b, h, n_blocks, block_n, d)
    # (B, H, n_blocks, S, block_n) @ (B, H, n_blocks, block_n, D) -> (B, H, n_blocks, S, D)
    pv = p8.permute(0, 1, 3, 2, 4) @ vb
    weight = (row_factor * v_scale[:, :, None, :]).permute(0, 1, 3, 2)[..., None]  # (B, H, n_blocks, S, 1)
    numer = (pv * weight).sum(dim=2)
    return numer / denom[..., None]


def attention_float(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact softmax attention in `dtype` (float64 by default): the yardstick for SQNR."""
    d = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    w = torch.softmax((qf @ kf.transpose(-1, -2)) * softmax_scale, dim=-1)
    return w @ vf


def sqnr_db(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of `estimate` against `exact`, in dB."""
    exact = exact.double()
    err = estimate.double() - exact
    return float(10.0 * torch.log10(exact.pow(2).sum() / err.pow(2).sum().clamp_min(1e-300)))
