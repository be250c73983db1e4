"""Re-noising onto the flow-matching path: ``renoise`` (served by the generic sigma_lincomb
kernel, with given noise or seeded in-kernel Philox noise) and the fused
``predict_x0_renoise`` helper of the trainer (x0 = xt - sigma v, then
xt_teacher = (1 - sigma_teacher) x0 + sigma_teacher noise, in one pass, no gradient).

Seeded noise: element j of the sample-major logical layout is ``tl.randn(seed, offset + j)``,
the generator of ``cdm_kernels.reference.philox``; it is never stored.
"""

from __future__ import annotations

import torch

from . import lincomb
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

PREDICT_SCHEMA = ("(Tensor xt, Tensor v, Tensor? noise, Tensor? s_t, float s, Tensor? st_t, float st, int seed, "
                  "int offset) -> (Tensor, Tensor)")

if HAS_TRITON:

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _predict_renoise_kernel(XT, V, NOISE, X0, XTT, S, ST, s_val, st_val, s_stride, st_stride,
                                xt_bstride, v_bstride, n_bstride, N, seed, offset,
                                HAS_S: tl.constexpr, HAS_ST: tl.constexpr, HAS_NOISE: tl.constexpr,
                                ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        s = load_sigma(S, s_val, s_stride, b, HAS_S)
        st = load_sigma(ST, st_val, st_stride, b, HAS_ST)
        b64 = b.to(tl.int64)
        xt = tl.load(XT + b64 * xt_bstride + i, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + b64 * v_bstride + i, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:
            eps = tl.load(NOISE + b64 * n_bstride + i, mask=mask, other=0.0).to(tl.float32)
        else:
            eps = tl.randn(seed, offset + b * N + i)
        x0 = xt - s * v
        xtt = (1.0 - st) * x0 + st * eps
        tl.store(X0 + b64 * N + i, to_output(x0, ROUND_BF16).to(X0.dtype.element_ty), mask=mask)
        tl.store(XTT + b64 * N + i, to_output(xtt, ROUND_BF16).to(XTT.dtype.element_ty), mask=mask)


def _predict_triton(xt, v, noise, s_t, s, st_t, st, seed, offset):
    x0 = torch.empty_like(xt, memory_format=torch.contiguous_format)  # (cheaper than torch.empty(shape, ...))
    xtt = torch.empty_like(xt, memory_format=torch.contiguous_format)
    n = row_size(xt)
    if xt.numel() == 0:
        return x0, xtt
    xtr, xts = as_rows(xt)
    vr, vs = as_rows(v)
    nr, ns_ = as_rows(noise) if noise is not None else (xtr, 0)
    S, sv, ss, hs = sigma_launch_args(s_t, s, x0)
    ST, stv, sts, hst = sigma_launch_args(st_t, st, x0)
    block = elementwise_block(n)
    with lincomb._device_guard(xt):
        _predict_renoise_kernel[(cdiv(n, block), xt.shape[0])](
            xtr, vr, nr, x0, xtt, S, ST, sv, stv, ss, sts, xts, vs, ns_, n, max(int(seed), 0), int(offset),
            HAS_S=hs, HAS_ST=hst, HAS_NOISE=noise is not None, ROUND_BF16=round_bf16_needed(xt.dtype),
            BLOCK=block)
    return x0, xtt


def _predict_fake(xt, v, noise, s_t, s, st_t, st, seed, offset):
    return (torch.empty(xt.shape, dtype=xt.dtype, device=xt.device),
            torch.empty(xt.shape, dtype=xt.dtype, device=xt.device))


predict_x0_renoise_op = define_op("predict_x0_renoise", PREDICT_SCHEMA, _predict_triton, _predict_fake)


def make_public(ns: str):
    from .. import reference as ref

    ops = ops_namespace(ns)
    fast = ops_namespace(EAGER) if ns == NS_TRITON else None  # see euler.make_public

    def renoise(x0, sigma, noise=None, *, seed=None, offset=0):
        if x0.dtype == F64 or (noise is not None and noise.dtype == F64):
            return ref.renoise(x0, sigma, noise, seed=seed, offset=offset)
        s_t, s = split_sigma(sigma)
        # (1 - s) x0 + s noise
        o = fast if fast is not None and eager_path(x0) else ops
        return o.sigma_lincomb(x0, noise, s_t, s, None, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0, 0.0,
                               -1 if seed is None else int(seed), int(offset), x0.dtype)

    def predict_x0_renoise(xt, v, sigma, sigma_teacher, noise=None, *, seed=None, offset=0):
        if xt.dtype == F64 or v.dtype == F64 or (noise is not None and noise.dtype == F64):
            return ref.predict_x0_renoise(xt, v, sigma, sigma_teacher, noise, seed=seed, offset=offset)
        s_t, s = split_sigma(sigma)
        st_t, st = split_sigma(sigma_teacher)
        seed = -1 if seed is None else int(seed)
        if fast is not None and eager_path(xt):
            # The implementation, directly: no autograd node, so nothing to detach.
            return fast.predict_x0_renoise(xt, v, noise, s_t, s, st_t, st, seed, int(offset))
        return ops.predict_x0_renoise(xt.detach(), v.detach(), None if noise is None else noise.detach(), s_t, s,
                                      st_t, st, seed, int(offset))

    return {"renoise": renoise, "predict_x0_renoise": predict_x0_renoise}
