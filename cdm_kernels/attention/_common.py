"""Helpers shared by the 8-bit attention ops, their kernels and the dispatch: constants, logging, output layout,
launch-config overrides and argument checks.

Imports nothing else of the package, so every other module of ``cdm_kernels/attention`` can import it and the
arrows run one way: public ops -> dispatch -> here, kernels -> here (tests/test_layout.py checks it).
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("cdm_kernels")

SUPPORTED_HEAD_DIMS = (32, 64, 128)  # the Triton FP8 kernel
SUPPORTED_INT8_HEAD_DIMS = (64, 128)  # the Triton INT8-QK kernel
INT8_MIN_CAPABILITY = (8, 0)  # int8 mma.sync m16n8k32 (IMMA): Ampere and newer
PATHS = ("auto", "triton", "int8", "sdpa", "fa3", "te")

_logged: set[str] = set()


def log_once(key: str, msg: str, *args, level: int = logging.INFO) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def output_like(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, H, S, D) view of (B, S, H, D) memory: what the diffusers processors reshape for free."""
    b, h, s, d = q.shape
    return torch.empty((b, s, h, d), dtype=dtype or q.dtype, device=q.device).transpose(1, 2)


def config_override(env_var: str) -> dict | None:
    """A launch config from `env_var` = "BLOCK_M,BLOCK_N,num_warps,num_stages" (to tune on a new GPU), or None."""
    env = os.environ.get(env_var)
    if not env:
        return None
    bm, bn, warps, stages = (int(t) for t in env.split(","))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def check_triton_path_device(device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """path="triton" on a GPU needs FP8 tensor cores (sm_89+); say which path to use instead of letting
    Triton fail to compile the e4m3 MMAs (a raw CompilationError on sm_80)."""
    if device.type != "cuda" or interpret():
        return
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(
            f"path='triton': the FP8 attention kernel needs FP8 tensor cores (sm_89 or newer: L4/L40/RTX 4090, "
            f"H100/H200), but {device} is sm_{cap[0]}{cap[1]}. Use path='auto' (there: the INT8-QK kernel from "
            f"sm_80 up for head dims 64/128, else SDPA in the input dtype), path='int8', path='sdpa', or "
            f"path='fa3'/'te' where installed.")


def check_int8_path_device(device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """path="int8" on a GPU older than Ampere: say which path to use instead of a compiler error."""
    if device.type != "cuda" or interpret():
        return
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < INT8_MIN_CAPABILITY:
        raise ValueError(
            f"path='int8': the INT8-QK attention kernel needs Ampere or newer (sm_80+), but {device} is "
            f"sm_{cap[0]}{cap[1]}. Use path='auto' (it takes SDPA in the input dtype there) or path='sdpa'.")


def check_int8_head_dim(head_dim: int) -> None:
    if head_dim not in SUPPORTED_INT8_HEAD_DIMS:
        raise ValueError(f"q: head dim {head_dim} not supported by the INT8-QK attention kernel "
                         f"{SUPPORTED_INT8_HEAD_DIMS}")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, path: str) -> None:
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
        check_int8_head_dim(q.shape[-1])
        check_int8_path_device(q.device)


def require_no_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            f"{name} is forward-only (no backward), but an input requires grad under grad mode. Call it "
            "under torch.no_grad()/torch.inference_mode(), or use patch_attention(mode='fp8_no_grad'), which "
            "falls back to SDPA whenever gradients are needed."
        )
