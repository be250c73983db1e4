"""FP8 attention forward: public entry point, op registration and dispatch.

The Triton kernels live in ``_kernels.py``, imported on first use (so ``import cdm_kernels``
never imports triton); the quantisation scheme is specified by
``reference.fp8_attention_reference`` and the tests hold the kernel to it and both to float32
attention by SQNR.

Dispatch (``path`` resolved inside the op, so torch.compile sees one opaque custom op):
CUDA sm_89+ (Ada, Hopper, Blackwell): Triton FP8 kernel. CUDA sm_80 to sm_88 (A100, A10/RTX 30xx:
INT8 but no FP8 tensor cores): the INT8-QK kernel (``int8_attention.py``; head dims 64 and 128).
Older GPUs and other head dims: SDPA in the input dtype (flash backend for bf16/fp16). CPU: the
Triton FP8 kernel under ``TRITON_INTERPRET=1``, else SDPA. Each choice is logged once.
``path="int8"`` selects the INT8-QK kernel on any GPU from sm_80 up (and in the interpreter); the
optional backends "fa3" and "te" run only when asked for by name.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("cdm_kernels")

HAS_TRITON = importlib.util.find_spec("triton") is not None
SUPPORTED_HEAD_DIMS = (32, 64, 128)
PATHS = ("auto", "triton", "int8", "sdpa", "fa3", "te")

_logged: set[str] = set()


def _log_once(key: str, msg: str, *args, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _output_like(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, H, S, D) view of (B, S, H, D) memory: what the diffusers processors reshape for free."""
    b, h, s, d = q.shape
    return torch.empty((b, s, h, d), dtype=dtype or q.dtype, device=q.device).transpose(1, 2)


def config_override(env_var: str) -> dict | None:
    """A launch config from `env_var` = "BLOCK_M,BLOCK_N,num_warps,num_stages" (to tune on a new GPU), or None."""
    import os

    env = os.environ.get(env_var)
    if not env:
        return None
    bm, bn, warps, stages = (int(t) for t in env.split(","))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def kernel_config(head_dim: int) -> dict:
    """Block sizes and launch parameters of the Triton path (see ``_kernels.kernel_config``)."""
    from ._kernels import kernel_config as _cfg

    return _cfg(head_dim)


def _sdpa(q, k, v, softmax_scale: float) -> torch.Tensor:
    out = _output_like(q)
    out.copy_(F.scaled_dot_product_attention(q, k, v, scale=softmax_scale))
    return out


def native_fp8_available(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores that Triton's tl.dot can use (sm_89 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def cuda_auto_path(capability: tuple[int, int], head_dim: int) -> str:
    """What path="auto" runs on a CUDA GPU of this compute capability (with triton installed)."""
    from .int8_attention import INT8_MIN_CAPABILITY, SUPPORTED_INT8_HEAD_DIMS

    cap = tuple(capability)
    if cap >= (8, 9):
        return "triton" if head_dim in SUPPORTED_HEAD_DIMS else "sdpa"
    if cap >= INT8_MIN_CAPABILITY and head_dim in SUPPORTED_INT8_HEAD_DIMS:
        return "int8"
    return "sdpa"


def _resolve_path(q: torch.Tensor, path: str) -> str:
    if path != "auto":
        return path
    if not HAS_TRITON:
        _log_once("no-triton", "cdm_kernels.fp8_attention: triton not installed; using SDPA in %s", q.dtype)
        return "sdpa"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        _log_once(f"d{q.shape[-1]}", "cdm_kernels.fp8_attention: head dim %d not in %s; using SDPA",
                  q.shape[-1], SUPPORTED_HEAD_DIMS)
        return "sdpa"
    if q.device.type == "cuda" and not _interpret():
        cap = torch.cuda.get_device_capability(q.device)
        chosen = cuda_auto_path(cap, q.shape[-1])
        what = {"triton": "Triton FP8 kernel", "int8": "Triton INT8-QK kernel (no FP8 tensor cores)",
                "sdpa": f"SDPA in {q.dtype} (no 8-bit kernel for head dim {q.shape[-1]} here)"}[chosen]
        _log_once(f"gpu-{chosen}-{q.shape[-1]}", "cdm_kernels.fp8_attention: %s on %s (sm_%d%d)", what,
                  torch.cuda.get_device_name(q.device), *cap)
        return chosen
    if _interpret():
        _log_once("interp", "cdm_kernels.fp8_attention: Triton FP8 kernel through the interpreter (TRITON_INTERPRET=1)")
        return "triton"
    _log_once("sdpa-cpu", "cdm_kernels.fp8_attention: no FP8 path on %s; using SDPA in %s", q.device.type, q.dtype)
    return "sdpa"


@torch.library.custom_op("cdm_kernels::fp8_attention", mutates_args=())
def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                      path: str) -> torch.Tensor:
    path = _resolve_path(q, path)
    if path == "triton":
        from ._kernels import triton_fp8_attention

        return triton_fp8_attention(q, k, v, softmax_scale)
    if path == "int8":
        from ._int8_kernels import triton_int8_attention

        return triton_int8_attention(q, k, v, softmax_scale)
    if path == "sdpa":
        return _sdpa(q, k, v, softmax_scale)
    from . import _backends

    out = _output_like(q)
    out.copy_(_backends.run(path, q, k, v, softmax_scale))
    return out


@_fp8_attention_op.register_fake
def _(q, k, v, softmax_scale, path):
    return _output_like(q)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d (B, H, S, D) tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name} must be bf16, fp16 or fp32, got {t.dtype}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape (self-attention, no GQA), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] == 0:
        raise ValueError("q must hold at least one token (S >= 1)")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "triton" and q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {q.shape[-1]} not supported by the Triton FP8 kernel {SUPPORTED_HEAD_DIMS}")
    if path == "triton":
        check_triton_path_device(q.device)
    if path == "int8":
        from .int8_attention import check_int8_head_dim, check_int8_path_device

        check_int8_head_dim(q.shape[-1])
        check_int8_path_device(q.device)


def check_triton_path_device(device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """path="triton" on a GPU needs FP8 tensor cores (sm_89+); say which path to use instead of letting
    Triton fail to compile the e4m3 MMAs (a raw CompilationError on sm_80)."""
    if device.type != "cuda" or _interpret():
        return
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(
            f"path='triton': the FP8 attention kernel needs FP8 tensor cores (sm_89 or newer: L4/L40/RTX 4090, "
            f"H100/H200), but {device} is sm_{cap[0]}{cap[1]}. Use path='auto' (there: the INT8-QK kernel from "
            f"sm_80 up for head dims 64/128, else SDPA in the input dtype), path='int8', path='sdpa', or "
            f"path='fa3'/'te' where installed.")


def _require_no_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            f"{name} is forward-only (no backward), but an input requires grad under grad mode. Call it "
            "under torch.no_grad()/torch.inference_mode(), or use patch_attention(mode='fp8_no_grad'), which "
            "falls back to SDPA whenever gradients are needed."
        )


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    path: str = "auto",
) -> torch.Tensor:
    """Non-causal, unmasked softmax attention with FP8 (e4m3) inputs and fp32 accumulation.

    q, k, v: (B, H, S, D) bf16/fp16/fp32 (the SDPA layout, any strides). Returns (B, H, S, D) in
    the input dtype, laid out in memory as (B, S, H, D) so that ``out.transpose(1, 2)`` is
    contiguous. ``softmax_scale`` defaults to ``1 / sqrt(D)``.

    Forward-only: raises RuntimeError for inputs that require grad while grad mode is on.
    ``path``: "auto" (see module doc), or force "triton" (FP8, sm_89+), "int8" (INT8-QK, sm_80+, head
    dims 64/128), "sdpa", "fa3" (flash_attn_interface FP8) or "te" (Transformer Engine FP8 DPA); the
    last two only when installed.
    """
    _require_no_grad(q, k, v, "fp8_attention")
    _check(q, k, v, path)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    return _fp8_attention_op(q, k, v, float(softmax_scale), path)


__all__ = ["fp8_attention", "kernel_config", "native_fp8_available", "check_triton_path_device",
           "cuda_auto_path", "SUPPORTED_HEAD_DIMS"]
