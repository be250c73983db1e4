"""Sigma-weighted linear combination of two rows: the one elementwise kernel behind
euler_extrapolate, renoise (given or seeded noise) and the backward passes of the
Euler and re-noising ops.

    out[b, i] = (c0 + c1 s1[b] + c2 s2[b]) g1[b, i] + (d0 + d1 s1[b] + d2 s2[b]) g2[b, i]

where g2 is a tensor, seeded Philox noise (``g2`` absent and ``seed >= 0``: element j of
the logical layout is ``tl.randn(seed, offset + j)``), or absent (``seed < 0``). One read
of each input, one write, fp32 arithmetic.
"""

from __future__ import annotations

import contextlib

import torch

from .utils import (
    HAS_TRITON,
    as_rows,
    cdiv,
    define_op,
    elementwise_block,
    load_sigma,
    ops_namespace,
    round_bf16_needed,
    row_size,
    sigma_launch_args,
    tl,
    to_output,
    triton,
)

SCHEMA = ("(Tensor g1, Tensor? g2, Tensor? s1_t, float s1, Tensor? s2_t, float s2, float c0, float c1, float c2, "
          "float d0, float d1, float d2, int seed, int offset, ScalarType out_dtype) -> Tensor")

if HAS_TRITON:

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _lincomb_kernel(G1, G2, OUT, S1, S2, s1_val, s2_val, s1_stride, s2_stride, g1_bstride, g2_bstride, N,
                        c0, c1, c2, d0, d1, d2, seed, offset,
                        HAS_S1: tl.constexpr, HAS_S2: tl.constexpr, G2_MODE: tl.constexpr,
                        ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        s1 = load_sigma(S1, s1_val, s1_stride, b, HAS_S1)
        s2 = load_sigma(S2, s2_val, s2_stride, b, HAS_S2)
        ca = c0 + c1 * s1 + c2 * s2
        b64 = b.to(tl.int64)
        g1 = tl.load(G1 + b64 * g1_bstride + i, mask=mask, other=0.0).to(tl.float32)
        out = ca * g1
        if G2_MODE == 1:
            g2 = tl.load(G2 + b64 * g2_bstride + i, mask=mask, other=0.0).to(tl.float32)
            out += (d0 + d1 * s1 + d2 * s2) * g2
        if G2_MODE == 2:
            eps = tl.randn(seed, offset + b * N + i)
            out += (d0 + d1 * s1 + d2 * s2) * eps
        out = to_output(out, ROUND_BF16)
        tl.store(OUT + b64 * N + i, out.to(OUT.dtype.element_ty), mask=mask)


_NO_GUARD = contextlib.nullcontext()


def _device_guard(t: torch.Tensor):
    # Launch on the tensor's device; switching devices costs a few microseconds, so only when it differs.
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(t.device)


def _lincomb_triton(g1, g2, s1_t, s1, s2_t, s2, c0, c1, c2, d0, d1, d2, seed, offset, out_dtype):
    # empty_like: ~1 us cheaper than torch.empty(shape, dtype=, device=); contiguous either way
    out = torch.empty_like(g1, dtype=out_dtype, memory_format=torch.contiguous_format)
    n = row_size(g1)
    if out.numel() == 0:
        return out
    g1r, g1s = as_rows(g1)
    if g2 is not None:
        g2r, g2s = as_rows(g2)
        mode = 1
    else:
        g2r, g2s = g1r, 0
        mode = 2 if seed >= 0 else 0
    S1, s1v, s1s, h1 = sigma_launch_args(s1_t, s1, out)
    S2, s2v, s2s, h2 = sigma_launch_args(s2_t, s2, out)
    block = elementwise_block(n)
    grid = (cdiv(n, block), g1.shape[0])
    with _device_guard(g1):
        _lincomb_kernel[grid](g1r, g2r, out, S1, S2, s1v, s2v, s1s, s2s, g1s, g2s, n,
                              c0, c1, c2, d0, d1, d2, max(int(seed), 0), int(offset),
                              HAS_S1=h1, HAS_S2=h2, G2_MODE=mode, ROUND_BF16=round_bf16_needed(out_dtype),
                              BLOCK=block)
    return out


def _fake(g1, g2, s1_t, s1, s2_t, s2, c0, c1, c2, d0, d1, d2, seed, offset, out_dtype):
    return torch.empty(g1.shape, dtype=out_dtype, device=g1.device)


def _setup_context(ctx, inputs, output):
    g1, g2, s1_t, s1, s2_t, s2, c0, c1, c2, d0, d1, d2, seed, offset, out_dtype = inputs
    ctx.save_for_backward(s1_t, s2_t)
    ctx.floats = (s1, s2, c0, c1, c2, d0, d1, d2)
    ctx.dtypes = (g1.dtype, g2.dtype if g2 is not None else None)


def _make_backward(ns: str):
    def backward(ctx, grad):
        op = ops_namespace(ns).sigma_lincomb
        s1_t, s2_t = ctx.saved_tensors
        s1, s2, c0, c1, c2, d0, d1, d2 = ctx.floats
        g1_dtype, g2_dtype = ctx.dtypes
        grad_g1 = grad_g2 = None
        if ctx.needs_input_grad[0]:
            grad_g1 = op(grad, None, s1_t, s1, s2_t, s2, c0, c1, c2, 0.0, 0.0, 0.0, -1, 0, g1_dtype)
        if g2_dtype is not None and ctx.needs_input_grad[1]:
            grad_g2 = op(grad, None, s1_t, s1, s2_t, s2, d0, d1, d2, 0.0, 0.0, 0.0, -1, 0, g2_dtype)
        return (grad_g1, grad_g2) + (None,) * 13

    return backward


sigma_lincomb = define_op("sigma_lincomb", SCHEMA, _lincomb_triton, _fake, _setup_context, _make_backward,
                          grad_args=(0, 1))
