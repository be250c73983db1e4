"""Which 8-bit attention path runs for ``fp8_attention(path="auto")``: resolved inside the op, per device and
head dim, each choice logged once. Pure decisions over device facts; no kernel imports (arrows: the ops call
this, this calls only ``_common``)."""

from __future__ import annotations

import importlib.util

import torch

from ._common import INT8_MIN_CAPABILITY, SUPPORTED_HEAD_DIMS, SUPPORTED_INT8_HEAD_DIMS, interpret, log_once

HAS_TRITON = importlib.util.find_spec("triton") is not None


def cuda_auto_path(capability: tuple[int, int], head_dim: int) -> str:
    """What path="auto" runs on a CUDA GPU of this compute capability (with triton installed)."""
    cap = tuple(capability)
    if cap >= (8, 9):
        return "triton" if head_dim in SUPPORTED_HEAD_DIMS else "sdpa"
    if cap >= INT8_MIN_CAPABILITY and head_dim in SUPPORTED_INT8_HEAD_DIMS:
        return "int8"
    return "sdpa"


def resolve_path(q: torch.Tensor, path: str) -> str:
    if path != "auto":
        return path
    if not HAS_TRITON:
        log_once("no-triton", "cdm_kernels.fp8_attention: triton not installed; using SDPA in %s", q.dtype)
        return "sdpa"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        log_once(f"d{q.shape[-1]}", "cdm_kernels.fp8_attention: head dim %d not in %s; using SDPA",
                 q.shape[-1], SUPPORTED_HEAD_DIMS)
        return "sdpa"
    if q.device.type == "cuda" and not interpret():
        cap = torch.cuda.get_device_capability(q.device)
        chosen = cuda_auto_path(cap, q.shape[-1])
        what = {"triton": "Triton FP8 kernel", "int8": "Triton INT8-QK kernel (no FP8 tensor cores)",
                "sdpa": f"SDPA in {q.dtype} (no 8-bit kernel for head dim {q.shape[-1]} here)"}[chosen]
        log_once(f"gpu-{chosen}-{q.shape[-1]}", "cdm_kernels.fp8_attention: %s on %s (sm_%d%d)", what,
                 torch.cuda.get_device_name(q.device), *cap)
        return chosen
    if interpret():
        log_once("interp", "cdm_kernels.fp8_attention: Triton FP8 kernel through the interpreter (TRITON_INTERPRET=1)")
        return "triton"
    log_once("sdpa-cpu", "cdm_kernels.fp8_attention: no FP8 path on %s; using SDPA in %s", q.device.type, q.dtype)
    return "sdpa"
