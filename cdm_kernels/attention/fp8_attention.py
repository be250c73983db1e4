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

import math

import torch
import torch.nn.functional as F

# Shared helpers and the dispatch live in their own modules (arrows one way: this -> dispatch -> _common; the
# kernels import only _common). The old private names stay importable from here.
from ._common import PATHS, SUPPORTED_HEAD_DIMS, check_triton_path_device, config_override  # noqa: F401
from ._common import check_inputs as _check
from ._common import interpret as _interpret  # noqa: F401
from ._common import output_like as _output_like
from ._common import require_no_grad as _require_no_grad
from .dispatch import HAS_TRITON, cuda_auto_path  # noqa: F401
from .dispatch import resolve_path as _resolve_path


def kernel_config(head_dim: int, capability: tuple[int, int] | None = None) -> dict:
    """Block sizes and launch parameters of the Triton path on a GPU of `capability` (None: the interpreter's
    and the CPU's; see ``_kernels.kernel_config``)."""
    from ._kernels import kernel_config as _cfg

    return _cfg(head_dim, capability)


def reference_blocks(head_dim: int, capability: tuple[int, int] | None = None) -> dict:
    """``fp8_attention_reference``'s block_m / block_n for the kernel's launch on such a GPU (its twin)."""
    cfg = kernel_config(head_dim, capability)
    return {"block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"]}


def _sdpa(q, k, v, softmax_scale: float) -> torch.Tensor:
    out = _output_like(q)
    out.copy_(F.scaled_dot_product_attention(q, k, v, scale=softmax_scale))
    return out


def native_fp8_available(device: torch.device) -> bool:
    """Whether `device` has FP8 tensor cores that Triton's tl.dot can use (sm_89 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


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


__all__ = ["fp8_attention", "kernel_config", "reference_blocks", "native_fp8_available", "check_triton_path_device",
           "cuda_auto_path", "SUPPORTED_HEAD_DIMS"]
