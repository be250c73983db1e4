"""Optional third-party FP8 attention backends, detected at run time and never required.

- "fa3": FlashAttention-3's FP8 forward (``flash_attn_interface.flash_attn_func`` with
  float8_e4m3fn inputs and per-(batch, head) descales; Hopper only).
- "te": Transformer Engine's FP8 dot-product attention (``DotProductAttention`` under
  ``fp8_autocast`` with ``fp8_dpa=True``).

Neither can be installed on this project's CI or GPU machines (source-only or very large
wheels), so these adapters are exercised only where the package is present.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .reference import E4M3_MAX


def available() -> dict[str, bool]:
    """Which optional backends are importable here (no CUDA check)."""
    return {
        "fa3": importlib.util.find_spec("flash_attn_interface") is not None,
        "te": importlib.util.find_spec("transformer_engine") is not None,
    }


def _per_head_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, S, D) -> float8 (B, S, H, D) and descale (B, H) float32."""
    xf = x.float()
    amax = xf.abs().amax(dim=(2, 3)).clamp_min(1e-30)
    x8 = (xf * (E4M3_MAX / amax)[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8.transpose(1, 2).contiguous(), (amax / E4M3_MAX).contiguous()


def _fa3(q, k, v, softmax_scale: float) -> torch.Tensor:
    import flash_attn_interface

    k = k - k.float().mean(dim=2, keepdim=True).to(k.dtype)  # same smoothing as ours
    q8, qd = _per_head_fp8(q)
    k8, kd = _per_head_fp8(k)
    v8, vd = _per_head_fp8(v)
    res = flash_attn_interface.flash_attn_func(
        q8, k8, v8, softmax_scale=softmax_scale, causal=False, q_descale=qd, k_descale=kd, v_descale=vd
    )
    out = res[0] if isinstance(res, tuple) else res  # older releases also return the LSE
    return out.transpose(1, 2).to(q.dtype)


@functools.lru_cache(maxsize=8)
def _te_module(heads: int, head_dim: int, softmax_scale: float):
    from transformer_engine.pytorch import DotProductAttention

    return DotProductAttention(heads, head_dim, attn_mask_type="no_mask", qkv_format="bshd",
                               softmax_scale=softmax_scale)


def _te(q, k, v, softmax_scale: float) -> torch.Tensor:
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling

    b, h, s, d = q.shape
    mod = _te_module(h, d, softmax_scale)
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    with te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_dpa=True)):
        out = mod(qs, ks, vs)  # (B, S, H*D)
    return out.view(b, s, h, d).transpose(1, 2).to(q.dtype)


def run(path: str, q, k, v, softmax_scale: float) -> torch.Tensor:
    have = available()
    if path not in have:
        raise ValueError(f"unknown optional backend {path!r}")
    if not have[path]:
        raise RuntimeError(f"fp8_attention path {path!r} requested but its package is not installed")
    if q.device.type != "cuda":
        raise RuntimeError(f"fp8_attention path {path!r} needs CUDA tensors")
    return _fa3(q, k, v, softmax_scale) if path == "fa3" else _te(q, k, v, softmax_scale)
