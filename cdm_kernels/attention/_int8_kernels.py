"""Triton kernels and launcher of the INT8-QK attention forward (imported on first use).

For GPUs with INT8 but no FP8 tensor cores (A100 sm_80, A10/RTX 30xx sm_86), and selectable
on sm_89/90. Two kernels per call:

1. ``_quantize_qk_int8_kernel`` (one launch): Q and K -> int8 with one scale per (batch, head,
   block of tokens). Q is pre-multiplied by ``softmax_scale * log2(e)``; K has its mean over
   tokens subtracted (computed by the launcher with ``torch.mean``, so every block of K is
   quantised in parallel and the twin sees the very same mean). V is not touched.
2. ``_int8_attention_fwd_kernel``: flash attention, ``tl.dot`` on int8 with int32 accumulate
   for QK^T (IMMA on sm_80), base-2 online softmax in float32, P rounded to fp16/bf16 and
   multiplied with V in that dtype (fp32 accumulate), V read straight from the caller's tensor.

Rounding is specified by ``int8_reference.int8_attention_reference``. Round half to even
onto the integers is done by adding and subtracting 1.5 * 2^23 after the clamp (exact for
|x| <= 2^22, the same on the GPU and in the interpreter, which lacks libdevice.rint); the
clamp between the multiply and the add keeps the compiler from contracting them into an FMA.

Interpreter quirks (docs/design.md facts), handled under the constexpr SOFT_ROUND: fp32 -> bf16
casts truncate there (round with integer bit operations first), and 16-bit ``tl.dot`` is not
trusted there (the operands, exact in fp32, are multiplied as fp32 with input_precision="ieee").
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import config_override
from ._common import output_like as _output_like
from .int8_reference import pv_dtype
from .reference import LOG2E

# triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _round_half_even(x):
    """float32 with |x| <= 2^22 -> the nearest integer (ties to even), still float32."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _to_bf16(x, SOFT_ROUND: tl.constexpr):
    """float32 -> bfloat16, round to nearest even (the interpreter's cast truncates)."""
    if SOFT_ROUND:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000 as int32
        # NaN/inf: leave the bits alone (the carry would turn a NaN payload into an infinity)
        bits = tl.where((bits & 0x7F800000) == 0x7F800000, bits, rounded)
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne")


@triton.jit
def _to_pv(x, PV_DTYPE: tl.constexpr, SOFT_ROUND: tl.constexpr):
    if PV_DTYPE == tl.bfloat16:
        return _to_bf16(x, SOFT_ROUND)
    else:
        return x.to(tl.float16)  # round to nearest even on the GPU and in the interpreter (numpy)


@triton.jit
def _quantize_int8_block_store(x, valid, dst_ptrs, scale_ptr):
    finite = tl.abs(x) < float("inf")  # false for NaN and +-inf
    n_bad = tl.sum(tl.sum(tl.where(valid & ~finite, 1, 0), axis=1), axis=0)
    x = tl.where(valid & finite, x, 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-30)
    inv = tl.math.div_rn(127.0, amax)
    x8 = _round_half_even(tl.minimum(tl.maximum(x * inv, -127.0), 127.0))
    tl.store(dst_ptrs, x8.to(tl.int8))
    # An integer cannot carry a NaN: a NaN scale makes the block's scores (and the output) NaN.
    scale = tl.where(n_bad > 0, float("nan"), tl.math.div_rn(amax, 127.0))
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_qk_int8_kernel(
    q_ptr, k_ptr, k_mean_ptr,
    s_qb, s_qh, s_qs, s_qd,
    s_kb, s_kh, s_ks, s_kd,
    q8_ptr, k8_ptr, q_scale_ptr, k_scale_ptr,
    S, H, q_mult, S_PAD_M, S_PAD_N, N_BLK_M, N_BLK_N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: long video sequences overflow int32
    which = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D)
    if which == 0:
        if pid < N_BLK_M:
            rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = (rows < S)[:, None]
            # rows x stride in 64 bits: a (B, S, H, D) view with long S passes 2**31 inside one head
            src = q_ptr + b * s_qb + h * s_qh + rows.to(tl.int64)[:, None] * s_qs + offs_d[None, :] * s_qd
            x = tl.load(src, mask=valid, other=0.0).to(tl.float32) * q_mult
            dst = q8_ptr + bh * S_PAD_M * D + rows[:, None] * D + offs_d[None, :]
            _quantize_int8_block_store(x, valid, dst, q_scale_ptr + bh * N_BLK_M + pid)
    else:
        if pid < N_BLK_N:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = (rows < S)[:, None]
            src = k_ptr + b * s_kb + h * s_kh + rows.to(tl.int64)[:, None] * s_ks + offs_d[None, :] * s_kd
            mean = tl.load(k_mean_ptr + bh * D + offs_d)
            x = tl.load(src, mask=valid, other=0.0).to(tl.float32) - mean[None, :]
            dst = k8_ptr + bh * S_PAD_N * D + rows[:, None] * D + offs_d[None, :]
            _quantize_int8_block_store(x, valid, dst, k_scale_ptr + bh * N_BLK_N + pid)


@triton.jit
def _attend_int8_block(
    acc, m_i, l_i, q, q_scale, kt_ptrs, v_ptrs, k_scale, key_idx, S,
    MASK_KEYS: tl.constexpr, PV_DTYPE: tl.constexpr, SOFT_ROUND: tl.constexpr,
):
    kt = tl.load(kt_ptrs)  # (D, BLOCK_N) int8: K^T, contiguous along D
    s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
    if MASK_KEYS:
        s = tl.where((key_idx < S)[None, :], s, float("-inf"))
        v = tl.load(v_ptrs, mask=(key_idx < S)[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key block holds at least one real key
    alpha = tl.exp2(m_i - m_new)
    p = _to_pv(tl.exp2(s - m_new[:, None]), PV_DTYPE, SOFT_ROUND)
    if v.dtype != PV_DTYPE:  # fp32 inputs: V rounded to bf16 like P
        v = _to_pv(v.to(tl.float32), PV_DTYPE, SOFT_ROUND)
    if SOFT_ROUND:  # exact products of 16-bit values, fp32 sums: what the GPU's MMA computes
        pv = tl.dot(p.to(tl.float32), v.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    else:
        pv = tl.dot(p, v, out_dtype=tl.float32)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _int8_attention_fwd_kernel(
    q8_ptr, k8_ptr, q_scale_ptr, k_scale_ptr, v_ptr, o_ptr,
    s_vb, s_vh, s_vs, s_vd,
    s_ob, s_oh, s_os, s_od,
    S, H, S_PAD_M, S_PAD_N, N_BLK_M, N_BLK_N,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, PV_DTYPE: tl.constexpr, SOFT_ROUND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    # The int8 buffers are padded to whole blocks (zeros); V's tail block and the output are masked.
    q = tl.load(q8_ptr + bh * S_PAD_M * D + offs_m[:, None] * D + offs_d[None, :])
    q_scale = tl.load(q_scale_ptr + bh * N_BLK_M + pid_m)
    kt_base = k8_ptr + bh * S_PAD_N * D + offs_d[:, None]
    v_base = v_ptr + b * s_vb + h * s_vh + offs_d[None, :] * s_vd
    ks_base = k_scale_ptr + bh * N_BLK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    n_full = N_BLK_N if EVEN_N else N_BLK_N - 1
    for j in range(0, n_full):
        key_idx = j * BLOCK_N + offs_n
        acc, m_i, l_i = _attend_int8_block(
            acc, m_i, l_i, q, q_scale, kt_base + key_idx[None, :] * D, v_base + key_idx.to(tl.int64)[:, None] * s_vs,
            tl.load(ks_base + j), key_idx, S, False, PV_DTYPE, SOFT_ROUND,
        )
    if not EVEN_N:
        j = N_BLK_N - 1
        key_idx = j * BLOCK_N + offs_n
        acc, m_i, l_i = _attend_int8_block(
            acc, m_i, l_i, q, q_scale, kt_base + key_idx[None, :] * D, v_base + key_idx.to(tl.int64)[:, None] * s_vs,
            tl.load(ks_base + j), key_idx, S, True, PV_DTYPE, SOFT_ROUND,
        )
    out = acc / l_i[:, None]
    dst = o_ptr + b * s_ob + h * s_oh + offs_m.to(tl.int64)[:, None] * s_os + offs_d[None, :] * s_od
    tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(offs_m < S)[:, None])


def int8_kernel_config(head_dim: int) -> dict:
    """Block sizes and launch parameters (the twin needs the blocks: they are the quantisation blocks).

    Not autotuned (autotuning inside CUDA-graph capture or the interpreter misbehaves): override
    with CDM_INT8_ATTN_CONFIG="BLOCK_M,BLOCK_N,num_warps,num_stages" to tune on a new GPU.
    """
    override = config_override("CDM_INT8_ATTN_CONFIG")
    if override is not None:
        return override
    if head_dim <= 64:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def quantize_qk_int8(q, k, softmax_scale: float, block_m: int, block_n: int) -> tuple[torch.Tensor, ...]:
    """Launch the quantisation kernel: (q8 (BH, S_pad_m, D), k8 (BH, S_pad_n, D), q_scale, k_scale)."""
    b, h, s, d = q.shape
    bh = b * h
    n_blk_m, n_blk_n = triton.cdiv(s, block_m), triton.cdiv(s, block_n)
    dev = q.device
    q8 = torch.empty((bh, n_blk_m * block_m, d), dtype=torch.int8, device=dev)
    k8 = torch.empty((bh, n_blk_n * block_n, d), dtype=torch.int8, device=dev)
    q_scale = torch.empty((bh, n_blk_m), dtype=torch.float32, device=dev)
    k_scale = torch.empty((bh, n_blk_n), dtype=torch.float32, device=dev)
    k_mean = torch.mean(k, dim=2, dtype=torch.float32)  # (B, H, D), contiguous: the twin makes this same call
    _quantize_qk_int8_kernel[(max(n_blk_m, n_blk_n), bh, 2)](
        q, k, k_mean, *q.stride(), *k.stride(),
        q8, k8, q_scale, k_scale,
        s, h, float(softmax_scale * LOG2E), n_blk_m * block_m, n_blk_n * block_n, n_blk_m, n_blk_n,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )
    return q8, k8, q_scale, k_scale


def triton_int8_attention(q, k, v, softmax_scale: float, config: dict | None = None, *,
                          soft_round: bool | None = None) -> torch.Tensor:
    """soft_round: the interpreter's workarounds (see module doc); default: on CPU tensors or under
    the interpreter. The compile check passes False for CPU stand-ins of GPU tensors."""
    cfg = config or int8_kernel_config(q.shape[-1])
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    b, h, s, d = q.shape
    q8, k8, q_scale, k_scale = quantize_qk_int8(q, k, softmax_scale, bm, bn)
    n_blk_m, n_blk_n = q_scale.shape[1], k_scale.shape[1]
    soft = (INTERPRET or q.device.type != "cuda") if soft_round is None else soft_round
    out = _output_like(q)
    # The interpreter's fp32 -> bf16 cast truncates: keep fp32 there and let torch round.
    o = _output_like(q, torch.float32) if (soft and q.dtype != torch.float32) else out
    _int8_attention_fwd_kernel[(n_blk_m, b * h)](
        q8, k8, q_scale, k_scale, v, o, *v.stride(), *o.stride(),
        s, h, n_blk_m * bm, n_blk_n * bn, n_blk_m, n_blk_n,
        D=d, BLOCK_M=bm, BLOCK_N=bn, EVEN_N=(s % bn == 0), PV_DTYPE=_TL_DTYPES[pv_dtype(q.dtype)],
        SOFT_ROUND=soft, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if o is not out:
        out.copy_(o)
    return out


def aot_compile(capability: int = 80, head_dim: int = 64, dtype: str = "bf16", even_n: bool = False) -> dict:
    """Compile both kernels for a CUDA target without a GPU (needs triton's bundled ptxas).

    Returns {"quantize": {"ptx", "cubin"}, "attention": {"ptx", "cubin"}}. Only outside the
    interpreter (TRITON_INTERPRET=0 when this module was imported). `python -m
    cdm_kernels.attention.int8_sass` disassembles the cubins and counts the IMMA instructions.
    """
    if INTERPRET:
        raise RuntimeError("aot_compile needs TRITON_INTERPRET=0 when cdm_kernels.attention._int8_kernels is "
                           "imported")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = int8_kernel_config(head_dim)
    target = GPUTarget("cuda", capability, 32)
    pv = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.bfloat16}[dtype]

    def build(fn, ptr_types: dict, scalars: dict, consts: dict, options: dict) -> dict:
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ptr_types:
                sig[name] = ptr_types[name]
            else:
                sig[name] = scalars.get(name, "i32")
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        asm = triton.compile(src, target=target, options=options).asm
        return {"ptx": asm["ptx"], "cubin": asm["cubin"]}

    i8 = {n: "*i8" for n in ("q8_ptr", "k8_ptr")}
    f32 = {n: "*fp32" for n in ("q_scale_ptr", "k_scale_ptr", "k_mean_ptr")}
    blocks = {"D": head_dim, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
    quant = build(_quantize_qk_int8_kernel, {**{n: f"*{dtype}" for n in ("q_ptr", "k_ptr")}, **i8, **f32},
                  {"q_mult": "fp32"}, blocks, {"num_warps": 4})
    attn = build(_int8_attention_fwd_kernel, {**i8, **f32, "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}"}, {},
                 {**blocks, "EVEN_N": even_n, "PV_DTYPE": pv, "SOFT_ROUND": False},
                 {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return {"quantize": quant, "attention": attn}
