"""INT8-QK attention forward (SageAttention's smoothed-K scheme): public entry point and op registration.

For GPUs with INT8 but no FP8 tensor cores (A100 sm_80, A10/A40/RTX 30xx sm_86): QK^T as an
int8 MMA with int32 accumulate, PV in fp16/bf16. ``fp8_attention(path="auto")`` takes it on
those GPUs and ``fp8_attention(path="int8")`` selects it anywhere from sm_80 up; this module's
``int8_attention`` is the same kernel as an op of its own. The Triton kernels live in
``_int8_kernels.py`` (imported on first use); the rounding is specified by
``int8_reference.int8_attention_reference``.
"""

from __future__ import annotations

import math

import torch

from ._common import (  # noqa: F401  (re-exported: their old home)
    INT8_MIN_CAPABILITY,
    SUPPORTED_INT8_HEAD_DIMS,
    check_inputs,
    check_int8_head_dim,
    check_int8_path_device,
    output_like,
    require_no_grad,
)


def native_int8_available(device: torch.device, capability: tuple[int, int] | None = None) -> bool:
    """Whether `device` has the INT8 tensor-core MMA that the kernel's tl.dot compiles to (sm_80 and newer)."""
    if device.type != "cuda":
        return False
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    return cap >= INT8_MIN_CAPABILITY


@torch.library.custom_op("cdm_kernels::int8_attention", mutates_args=())
def _int8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    from ._int8_kernels import triton_int8_attention

    return triton_int8_attention(q, k, v, softmax_scale)


@_int8_attention_op.register_fake
def _(q, k, v, softmax_scale):
    return output_like(q)


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Non-causal, unmasked softmax attention with INT8 Q and K (per-block scales, K smoothed), PV in
    fp16 (fp16 inputs) or bf16 (bf16 and fp32 inputs), fp32 accumulation.

    q, k, v: (B, H, S, D) bf16/fp16/fp32, D in (64, 128), any strides. Returns (B, H, S, D) in the
    input dtype, laid out in memory as (B, S, H, D) (``out.transpose(1, 2)`` is contiguous), like
    ``fp8_attention``. ``softmax_scale`` defaults to ``1 / sqrt(D)``. Forward-only. Needs a CUDA GPU
    of sm_80 or newer, or CPU tensors under TRITON_INTERPRET=1.
    """
    require_no_grad(q, k, v, "int8_attention")
    check_inputs(q, k, v, "int8")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    return _int8_attention_op(q, k, v, float(softmax_scale))


def int8_kernel_config(head_dim: int) -> dict:
    """Block sizes and launch parameters of the INT8 path (see ``_int8_kernels.int8_kernel_config``)."""
    from ._int8_kernels import int8_kernel_config as _cfg

    return _cfg(head_dim)


__all__ = ["int8_attention", "int8_kernel_config", "native_int8_available", "check_int8_path_device",
           "SUPPORTED_INT8_HEAD_DIMS"]
