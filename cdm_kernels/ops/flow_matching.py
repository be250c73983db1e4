"""The fake teacher's flow-matching loss, fused: per sample mean((pred_v - (noise - x0))^2).

Forward: one launch (grid (chunks, B)): each program writes its chunk's partial sum, and the
program that finishes last (``utils.is_last_program``) reduces them per sample in a fixed order
and applies the reduction (deterministic: no float atomics).
Backward: one pass reading pred_v and x0 and writing 2 (pred_v - noise + x0) / n * g.
With a seed the noise is drawn in the kernel (``tl.randn(seed, offset + j)``, the
generator ``renoise(..., seed=seed, offset=offset)`` used to build the model input) and
*regenerated* in the backward: it is never stored. Saved state: references to the
inputs only (no full-size temporaries).
"""

from __future__ import annotations

import functools

import torch

from . import lincomb
from .utils import (
    EAGER,
    F64,
    HAS_TRITON,
    NS_TRITON,
    REDUCTIONS,
    as_rows,
    cdiv,
    define_op,
    eager_path,
    elementwise_block,
    finalize_block_sizes,
    is_last_program,
    loss_shape,
    ops_namespace,
    reduce_sizes,
    reset_ticket,
    round_bf16_needed,
    row_size,
    ticket_counter,
    tl,
    to_output,
    triton,
)

SCHEMA = "(Tensor pred_v, Tensor x0, Tensor? noise, int seed, int offset, str reduction) -> Tensor"
BACKWARD_SCHEMA = ("(Tensor grad_loss, Tensor pred_v, Tensor x0, Tensor? noise, int seed, int offset, "
                   "str reduction) -> Tensor")

if HAS_TRITON:

    @triton.jit
    def _residual(P, X0, NOISE, p_bs, x_bs, n_bs, b, b64, i, mask, N, seed, offset, HAS_NOISE: tl.constexpr):
        p = tl.load(P + b64 * p_bs + i, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + b64 * x_bs + i, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:
            eps = tl.load(NOISE + b64 * n_bs + i, mask=mask, other=0.0).to(tl.float32)
        else:
            eps = tl.randn(seed, offset + b * N + i)
        return tl.where(mask, p - (eps - x0), 0.0)

    @triton.jit
    def _finalize(PART, LOSS, B, n_chunks, n_float, red_scale,
                  REDUCTION, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        total = tl.zeros((BLOCK_B,), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            bmask = bs < B
            acc = tl.zeros((BLOCK_B,), tl.float32)
            for c0 in range(0, n_chunks, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                m2 = bmask[:, None] & (cs < n_chunks)[None, :]
                # .cg: from L2, where the other programs' stores are (never a stale L1 line)
                acc += tl.sum(tl.load(PART + bs[:, None] * n_chunks + cs[None, :], mask=m2, other=0.0,
                                      cache_modifier=".cg"), axis=1)
            loss = acc / n_float
            if REDUCTION == 2:
                tl.store(LOSS + bs, loss, mask=bmask)
            else:
                total += tl.where(bmask, loss, 0.0)
        if REDUCTION != 2:
            tl.store(LOSS, tl.sum(total, axis=0) * red_scale)

    @triton.jit(do_not_specialize=["seed", "offset", "REDUCTION"])
    def _forward_kernel(P, X0, NOISE, PART, LOSS, COUNTER, p_bs, x_bs, n_bs, N, CHUNK, n_chunks, B, n_float,
                        red_scale, seed, offset, REDUCTION, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        c = tl.program_id(0)
        b = tl.program_id(1)
        b64 = b.to(tl.int64)
        acc = tl.zeros((BLOCK,), tl.float32)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, N)
        for off in range(start, end, BLOCK):
            i = off + tl.arange(0, BLOCK)
            r = _residual(P, X0, NOISE, p_bs, x_bs, n_bs, b, b64, i, i < end, N, seed, offset, HAS_NOISE)
            acc += r * r
        tl.store(PART + b64 * n_chunks + c, tl.sum(acc, axis=0))
        if is_last_program(COUNTER, B * n_chunks):
            _finalize(PART, LOSS, B, n_chunks, n_float, red_scale, REDUCTION, BLOCK_B, BLOCK_C)
            reset_ticket(COUNTER)

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _backward_kernel(G, P, X0, NOISE, OUT, g_stride, g_scale, p_bs, x_bs, n_bs, N, seed, offset,
                         HAS_NOISE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        b64 = b.to(tl.int64)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        g = tl.load(G + b * g_stride).to(tl.float32) * g_scale
        r = _residual(P, X0, NOISE, p_bs, x_bs, n_bs, b, b64, i, mask, N, seed, offset, HAS_NOISE)
        grad = (2.0 * g / N) * r
        tl.store(OUT + b64 * N + i, to_output(grad, ROUND_BF16).to(OUT.dtype.element_ty), mask=mask)


def _forward_triton(pred_v, x0, noise, seed, offset, reduction, cached_counter=False):
    batch = pred_v.shape[0]
    n = row_size(pred_v)
    loss = pred_v.new_empty(loss_shape(batch, reduction), dtype=torch.float32)
    if n == 0:  # no program to launch (and none to finalize): NaN, as the reference's mean over nothing
        return loss.fill_(float("nan"))
    block, chunk, n_chunks = reduce_sizes(n, batch, pred_v.device)
    part = pred_v.new_empty((batch, n_chunks), dtype=torch.float32)
    pr, p_bs = as_rows(pred_v)
    xr, x_bs = as_rows(x0)
    nr, n_bs = as_rows(noise) if noise is not None else (pr, 0)
    block_b, block_c = finalize_block_sizes(batch, n_chunks)
    with lincomb._device_guard(pred_v):
        _forward_kernel[(n_chunks, batch)](
            pr, xr, nr, part, loss, ticket_counter(pred_v.device, cached_counter), p_bs, x_bs, n_bs, n, chunk,
            n_chunks, batch, float(n), 1.0 / batch if reduction == "mean" else 1.0, max(int(seed), 0), int(offset),
            REDUCTIONS[reduction], HAS_NOISE=noise is not None, BLOCK=block, BLOCK_B=block_b, BLOCK_C=block_c)
    return loss


def _forward_fake(pred_v, x0, noise, seed, offset, reduction):
    return torch.empty(loss_shape(pred_v.shape[0], reduction), dtype=torch.float32, device=pred_v.device)


def _backward_triton(grad_loss, pred_v, x0, noise, seed, offset, reduction):
    out = torch.empty_like(pred_v, memory_format=torch.contiguous_format)
    n = row_size(pred_v)
    if out.numel() == 0:
        return out
    batch = pred_v.shape[0]
    pr, p_bs = as_rows(pred_v)
    xr, x_bs = as_rows(x0)
    nr, n_bs = as_rows(noise) if noise is not None else (pr, 0)
    g_stride = grad_loss.stride(0) if grad_loss.dim() > 0 else 0
    block = elementwise_block(n)
    with lincomb._device_guard(pred_v):
        _backward_kernel[(cdiv(n, block), batch)](
            grad_loss, pr, xr, nr, out, g_stride, 1.0 / batch if reduction == "mean" else 1.0, p_bs, x_bs, n_bs, n,
            max(int(seed), 0), int(offset), HAS_NOISE=noise is not None, ROUND_BF16=round_bf16_needed(out.dtype),
            BLOCK=block)
    return out


def _backward_fake(grad_loss, pred_v, x0, noise, seed, offset, reduction):
    return torch.empty(pred_v.shape, dtype=pred_v.dtype, device=pred_v.device)


def _setup_context(ctx, inputs, output):
    pred_v, x0, noise, seed, offset, reduction = inputs
    ctx.save_for_backward(pred_v, x0, noise)
    ctx.args = (seed, offset, reduction)


def _make_backward(ns: str):
    def backward(ctx, grad_loss):
        pred_v, x0, noise = ctx.saved_tensors
        seed, offset, reduction = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = ops_namespace(ns).flow_matching_backward(grad_loss, pred_v, x0, noise, seed, offset, reduction)
        return grad, None, None, None, None, None

    return backward


flow_matching_backward_op = define_op("flow_matching_backward", BACKWARD_SCHEMA, _backward_triton, _backward_fake)
flow_matching_op = define_op("flow_matching", SCHEMA, _forward_triton, _forward_fake, _setup_context,
                             _make_backward, grad_args=(0,),
                             eager_impl=functools.partial(_forward_triton, cached_counter=True))


def make_public(ns: str):
    from .. import reference as ref

    ops = ops_namespace(ns)
    fast = ops_namespace(EAGER) if ns == NS_TRITON else None  # see euler.make_public

    def flow_matching_loss(pred_v, x0, noise=None, *, seed=None, offset=0, reduction="mean"):
        if pred_v.dtype == F64 or x0.dtype == F64 or (noise is not None and noise.dtype == F64):
            return ref.flow_matching_loss(pred_v, x0, noise, seed=seed, offset=offset, reduction=reduction)
        seed = -1 if seed is None else int(seed)
        if fast is not None and eager_path(pred_v):
            # grad_args=(0,): the autograd.Function returns no gradient for x0 / noise, nothing to detach.
            return fast.flow_matching(pred_v, x0, noise, seed, int(offset), reduction)
        return ops.flow_matching(pred_v, x0.detach(), None if noise is None else noise.detach(), seed, int(offset),
                                 reduction)

    return {"flow_matching_loss": flow_matching_loss}
