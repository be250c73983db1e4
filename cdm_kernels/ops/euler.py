"""Euler moves along a flow-matching velocity: ``euler_extrapolate`` (one output, served by
the generic sigma_lincomb kernel) and the rollout's fused ``euler_step`` (reads x and v
once, writes both x_next = x + (s_to - s_from) v and x0 = x - s_from v).

Gradients flow into x and v (never into the sigmas); the backward passes are
sigma_lincomb launches, so nothing full-size is saved for autograd.
"""

from __future__ import annotations

import torch

from . import lincomb  # noqa: F401  (defines sigma_lincomb before the backward below uses it)
from .utils import (
    EAGER,
    F64,
    HAS_TRITON,
    NS_TRITON,
    as_rows,
    cdiv,
    define_op,
    eager_path,
    elementwise_block,
    load_sigma,
    ops_namespace,
    round_bf16_needed,
    row_size,
    sigma_launch_args,
    split_sigma,
    tl,
    to_output,
    triton,
)

STEP_SCHEMA = "(Tensor x, Tensor v, Tensor? sf_t, float sf, Tensor? st_t, float st) -> (Tensor, Tensor)"

if HAS_TRITON:

    @triton.jit
    def _euler_step_kernel(X, V, XN, X0, SF, ST, sf_val, st_val, sf_stride, st_stride, x_bstride, v_bstride, N,
                           HAS_SF: tl.constexpr, HAS_ST: tl.constexpr, ROUND_BF16: tl.constexpr,
                           BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        sf = load_sigma(SF, sf_val, sf_stride, b, HAS_SF)
        st = load_sigma(ST, st_val, st_stride, b, HAS_ST)
        b64 = b.to(tl.int64)
        x = tl.load(X + b64 * x_bstride + i, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + b64 * v_bstride + i, mask=mask, other=0.0).to(tl.float32)
        x_next = to_output(x + (st - sf) * v, ROUND_BF16)
        x0 = to_output(x - sf * v, ROUND_BF16)
        tl.store(XN + b64 * N + i, x_next.to(XN.dtype.element_ty), mask=mask)
        tl.store(X0 + b64 * N + i, x0.to(X0.dtype.element_ty), mask=mask)


def _step_triton(x, v, sf_t, sf, st_t, st):
    # empty_like: ~1 us cheaper per allocation than torch.empty(shape, dtype=, device=); contiguous either way
    x_next = torch.empty_like(x, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = row_size(x)
    if x.numel() == 0:
        return x_next, x0
    xr, xs = as_rows(x)
    vr, vs = as_rows(v)
    SF, sfv, sfs, hf = sigma_launch_args(sf_t, sf, x_next)
    ST, stv, sts, ht = sigma_launch_args(st_t, st, x_next)
    block = elementwise_block(n)
    with lincomb._device_guard(x):
        _euler_step_kernel[(cdiv(n, block), x.shape[0])](
            xr, vr, x_next, x0, SF, ST, sfv, stv, sfs, sts, xs, vs, n, HAS_SF=hf, HAS_ST=ht,
            ROUND_BF16=round_bf16_needed(x.dtype), BLOCK=block)
    return x_next, x0


def _step_fake(x, v, sf_t, sf, st_t, st):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _step_setup_context(ctx, inputs, output):
    x, v, sf_t, sf, st_t, st = inputs
    ctx.save_for_backward(sf_t, st_t)
    ctx.floats = (sf, st)
    ctx.dtypes = (x.dtype, v.dtype)


def _make_step_backward(ns: str):
    def backward(ctx, grad_next, grad_x0):
        lin = ops_namespace(ns).sigma_lincomb
        sf_t, st_t = ctx.saved_tensors
        sf, st = ctx.floats
        x_dtype, v_dtype = ctx.dtypes
        if grad_next is None:
            grad_next = torch.zeros_like(grad_x0)
        if grad_x0 is None:
            grad_x0 = torch.zeros_like(grad_next)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = lin(grad_next, grad_x0, sf_t, sf, st_t, st, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, -1, 0, x_dtype)
        if ctx.needs_input_grad[1]:
            # dv = (st - sf) g_next - sf g_x0
            grad_v = lin(grad_next, grad_x0, sf_t, sf, st_t, st, 0.0, -1.0, 1.0, 0.0, -1.0, 0.0, -1, 0, v_dtype)
        return grad_x, grad_v, None, None, None, None

    return backward


euler_step_op = define_op("euler_step", STEP_SCHEMA, _step_triton, _step_fake, _step_setup_context,
                          _make_step_backward, grad_args=(0, 1))


def make_public(ns: str):
    """The public-signature functions of this file for ops namespace ``ns``."""
    from .. import reference as ref

    ops = ops_namespace(ns)
    # Triton ops skip the dispatcher in plain eager code (utils.eager_path); the C++ ops are dispatched.
    fast = ops_namespace(EAGER) if ns == NS_TRITON else None

    def euler_extrapolate(x, v, sigma_from, sigma_to):
        if x.dtype == F64 or v.dtype == F64:
            return ref.euler_extrapolate(x, v, sigma_from, sigma_to)
        sf_t, sf = split_sigma(sigma_from)
        st_t, st = split_sigma(sigma_to)
        # x + (st - sf) v
        o = fast if fast is not None and eager_path(x) else ops
        return o.sigma_lincomb(x, v, sf_t, sf, st_t, st, 1.0, 0.0, 0.0, 0.0, -1.0, 1.0, -1, 0, x.dtype)

    def euler_step(x, v, sigma_from, sigma_to):
        if x.dtype == F64 or v.dtype == F64:
            return ref.euler_step(x, v, sigma_from, sigma_to)
        sf_t, sf = split_sigma(sigma_from)
        st_t, st = split_sigma(sigma_to)
        o = fast if fast is not None and eager_path(x) else ops
        return o.euler_step(x, v, sf_t, sf, st_t, st)

    return {"euler_extrapolate": euler_extrapolate, "euler_step": euler_step}
