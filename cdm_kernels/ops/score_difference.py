"""The weighted score-difference losses (dm_loss, cfg_loss): one generic fused op.

Semantics: ``cdm_kernels.reference.score_difference``. With ``d = x0_a - x0_b =
sigma_teacher (b_v - a_v)`` (xt_teacher cancels), per sample

    norm = max(sum|x0_a - x0_s| / n + 1e-8, norm_clip_min)
    loss = scale^2 sum(d^2) / (norm^2 n)              (shift = scale d / norm, loss = mean shift^2)
    d loss / d student_v = s * k * d,  d loss / d xt = -k * d,   k = 2 scale / (norm n)

so the forward needs, per sample, only three sums -- sum|x0_a - x0_s|, sum d^2 and the
count of non-finite d -- plus the count of non-finite student x0 (which must make the loss
NaN, as in the reference). They are all collected in ONE launch that reads each of the five
inputs once:

* ``_forward_kernel``: grid (chunks, B); each program reduces one chunk of one sample and
  writes four fp32 partial sums (no float atomics: deterministic), then takes a ticket
  (``utils.is_last_program``); the program with the last ticket runs ``_finalize``: sums the
  partials per sample in a fixed order, applies the non-finite rule (a sample with a
  non-finite d or normaliser gets shift 0, i.e. loss 0 and k = 0; a non-finite student value
  makes loss and k NaN), writes the loss (reduced or per sample) and k (B floats: the only
  saved state besides references to a_v, b_v).

Backward: one elementwise launch reading a_v and b_v, writing the gradient of student_v
(and, only if it is needed, a second one for xt). Forward + backward: two launches.
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
    is_finite,
    is_last_program,
    load_sigma,
    loss_shape,
    ops_namespace,
    reduce_sizes,
    reset_ticket,
    round_bf16_needed,
    row_size,
    sigma_launch_args,
    split_sigma,
    ticket_counter,
    tl,
    to_output,
    triton,
)

NORM_EPS = 1e-8
SCHEMA = ("(Tensor student_v, Tensor a_v, Tensor b_v, Tensor xt, Tensor xt_teacher, Tensor? s_t, float s, "
          "Tensor? st_t, float st, float scale, float norm_clip_min, str reduction) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor grad_loss, Tensor coef, Tensor a_v, Tensor b_v, Tensor? s_t, float s, Tensor? st_t, "
                   "float st, str reduction, float alpha, float beta, ScalarType out_dtype) -> Tensor")

if HAS_TRITON:

    @triton.jit
    def _finalize(PART, LOSS, COEF, B, n_chunks, part_stride, n_float, scale, clip, red_scale,
                  REDUCTION, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        total = tl.zeros((BLOCK_B,), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            bmask = bs < B
            # 2-D tiles accumulated in the loop and reduced once after it: triton 3.6 (the GPU
            # machines' version) crashes in OptimizeThreadLocality on a loop whose per-iteration
            # 2-D reductions feed several accumulators (loopResult.hasOneUse()) once the tile
            # reaches 256 elements; 3.9 compiles both forms. `python -m cdm_kernels.compile_check`.
            t_abs = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            t_sq = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            t_bad = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            t_sbad = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            for c0 in range(0, n_chunks, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                m2 = bmask[:, None] & (cs < n_chunks)[None, :]
                idx = bs[:, None] * n_chunks + cs[None, :]
                # .cg: from L2, where the other programs' stores are (never a stale L1 line)
                t_abs += tl.load(PART + idx, mask=m2, other=0.0, cache_modifier=".cg")
                t_sq += tl.load(PART + part_stride + idx, mask=m2, other=0.0, cache_modifier=".cg")
                t_bad += tl.load(PART + 2 * part_stride + idx, mask=m2, other=0.0, cache_modifier=".cg")
                t_sbad += tl.load(PART + 3 * part_stride + idx, mask=m2, other=0.0, cache_modifier=".cg")
            s_abs = tl.sum(t_abs, axis=1)
            s_sq = tl.sum(t_sq, axis=1)
            n_bad = tl.sum(t_bad, axis=1)
            n_sbad = tl.sum(t_sbad, axis=1)
            norm = tl.maximum(s_abs / n_float + 1e-8, clip)
            ok = (n_bad == 0.0) & is_finite(s_abs)
            loss = tl.where(ok, (scale * scale) * s_sq / (norm * norm) / n_float, 0.0)
            coef = tl.where(ok, (2.0 * scale) / (norm * n_float), 0.0)
            student_nan = tl.where(n_sbad > 0.0, float("nan"), 0.0)
            loss += student_nan
            coef += student_nan
            tl.store(COEF + bs, coef, mask=bmask)
            if REDUCTION == 2:
                tl.store(LOSS + bs, loss, mask=bmask)
            else:
                total += tl.where(bmask, loss, 0.0)
        if REDUCTION != 2:
            tl.store(LOSS, tl.sum(total, axis=0) * red_scale)

    @triton.jit(do_not_specialize=["REDUCTION"])  # a runtime branch of the last program: no compile variants
    def _forward_kernel(SV, AV, BV, XT, XTT, PART, LOSS, COEF, COUNTER, S, ST, s_val, st_val, s_stride, st_stride,
                        sv_bs, av_bs, bv_bs, xt_bs, xtt_bs, N, CHUNK, n_chunks, B, n_float, scale, clip, red_scale,
                        REDUCTION, HAS_S: tl.constexpr, HAS_ST: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        c = tl.program_id(0)
        b = tl.program_id(1)
        s = load_sigma(S, s_val, s_stride, b, HAS_S)
        st = load_sigma(ST, st_val, st_stride, b, HAS_ST)
        b64 = b.to(tl.int64)
        acc_abs = tl.zeros((BLOCK,), tl.float32)
        acc_sq = tl.zeros((BLOCK,), tl.float32)
        acc_bad = tl.zeros((BLOCK,), tl.float32)
        acc_sbad = tl.zeros((BLOCK,), tl.float32)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, N)
        for off in range(start, end, BLOCK):
            i = off + tl.arange(0, BLOCK)
            mask = i < end
            sv = tl.load(SV + b64 * sv_bs + i, mask=mask, other=0.0).to(tl.float32)
            xt = tl.load(XT + b64 * xt_bs + i, mask=mask, other=0.0).to(tl.float32)
            av = tl.load(AV + b64 * av_bs + i, mask=mask, other=0.0).to(tl.float32)
            bv = tl.load(BV + b64 * bv_bs + i, mask=mask, other=0.0).to(tl.float32)
            xtt = tl.load(XTT + b64 * xtt_bs + i, mask=mask, other=0.0).to(tl.float32)
            x0s = xt - s * sv
            x0a = xtt - st * av
            d = st * (bv - av)
            acc_abs += tl.abs(x0a - x0s)
            acc_sq += d * d
            acc_bad += tl.where(is_finite(d), 0.0, 1.0)
            acc_sbad += tl.where(is_finite(x0s), 0.0, 1.0)
        part_stride = B * n_chunks
        out = PART + b64 * n_chunks + c
        tl.store(out, tl.sum(acc_abs, axis=0))
        tl.store(out + part_stride, tl.sum(acc_sq, axis=0))
        tl.store(out + 2 * part_stride, tl.sum(acc_bad, axis=0))
        tl.store(out + 3 * part_stride, tl.sum(acc_sbad, axis=0))
        if is_last_program(COUNTER, part_stride):
            _finalize(PART, LOSS, COEF, B, n_chunks, part_stride, n_float, scale, clip, red_scale,
                      REDUCTION, BLOCK_B, BLOCK_C)
            reset_ticket(COUNTER)

    @triton.jit
    def _backward_kernel(G, COEF, AV, BV, OUT, S, ST, s_val, st_val, s_stride, st_stride, g_stride, g_scale,
                         av_bs, bv_bs, N, alpha, beta,
                         HAS_S: tl.constexpr, HAS_ST: tl.constexpr, ROUND_BF16: tl.constexpr,
                         BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        mask = i < N
        s = load_sigma(S, s_val, s_stride, b, HAS_S)
        st = load_sigma(ST, st_val, st_stride, b, HAS_ST)
        k = tl.load(COEF + b)
        g = tl.load(G + b * g_stride).to(tl.float32) * g_scale
        factor = (alpha + beta * s) * k * g
        b64 = b.to(tl.int64)
        av = tl.load(AV + b64 * av_bs + i, mask=mask, other=0.0).to(tl.float32)
        bv = tl.load(BV + b64 * bv_bs + i, mask=mask, other=0.0).to(tl.float32)
        grad = tl.where(k == 0.0, 0.0, factor * (st * (bv - av)))
        tl.store(OUT + b64 * N + i, to_output(grad, ROUND_BF16).to(OUT.dtype.element_ty), mask=mask)


def _forward_triton(student_v, a_v, b_v, xt, xt_teacher, s_t, s, st_t, st, scale, norm_clip_min, reduction,
                    cached_counter=False):
    batch = student_v.shape[0]
    device = student_v.device
    n = row_size(student_v)
    loss = student_v.new_empty(loss_shape(batch, reduction), dtype=torch.float32)
    coef = student_v.new_empty((batch,), dtype=torch.float32)
    if n == 0:  # no program to launch (and none to finalize): NaN, as the reference's mean over nothing
        return loss.fill_(float("nan")), coef.fill_(float("nan"))
    block, chunk, n_chunks = reduce_sizes(n, batch, device)
    part = student_v.new_empty((4, batch, n_chunks), dtype=torch.float32)
    sv, sv_bs = as_rows(student_v)
    av, av_bs = as_rows(a_v)
    bv, bv_bs = as_rows(b_v)
    x, x_bs = as_rows(xt)
    xtt, xtt_bs = as_rows(xt_teacher)
    S, svv, ss, hs = sigma_launch_args(s_t, s, part)
    ST, stv, sts, hst = sigma_launch_args(st_t, st, part)
    block_b, block_c = finalize_block_sizes(batch, n_chunks)
    with lincomb._device_guard(student_v):
        _forward_kernel[(n_chunks, batch)](
            sv, av, bv, x, xtt, part, loss, coef, ticket_counter(device, cached_counter), S, ST, svv, stv, ss, sts,
            sv_bs, av_bs, bv_bs, x_bs, xtt_bs, n, chunk, n_chunks, batch, float(n), float(scale),
            float(norm_clip_min), 1.0 / batch if reduction == "mean" else 1.0,
            REDUCTIONS[reduction], HAS_S=hs, HAS_ST=hst, BLOCK=block, BLOCK_B=block_b, BLOCK_C=block_c)
    return loss, coef


def _forward_fake(student_v, a_v, b_v, xt, xt_teacher, s_t, s, st_t, st, scale, norm_clip_min, reduction):
    batch = student_v.shape[0]
    return (torch.empty(loss_shape(batch, reduction), dtype=torch.float32, device=student_v.device),
            torch.empty((batch,), dtype=torch.float32, device=student_v.device))


def _backward_triton(grad_loss, coef, a_v, b_v, s_t, s, st_t, st, reduction, alpha, beta, out_dtype):
    out = torch.empty_like(a_v, dtype=out_dtype, memory_format=torch.contiguous_format)
    n = row_size(a_v)
    if out.numel() == 0:
        return out
    batch = a_v.shape[0]
    ar, a_bs = as_rows(a_v)
    br, b_bs = as_rows(b_v)
    S, sv, ss, hs = sigma_launch_args(s_t, s, out)
    ST, stv, sts, hst = sigma_launch_args(st_t, st, out)
    g_stride = grad_loss.stride(0) if grad_loss.dim() > 0 else 0
    g_scale = 1.0 / batch if reduction == "mean" else 1.0
    block = elementwise_block(n)
    with lincomb._device_guard(a_v):
        _backward_kernel[(cdiv(n, block), batch)](
            grad_loss, coef, ar, br, out, S, ST, sv, stv, ss, sts, g_stride, g_scale, a_bs, b_bs, n,
            float(alpha), float(beta), HAS_S=hs, HAS_ST=hst, ROUND_BF16=round_bf16_needed(out_dtype), BLOCK=block)
    return out


def _backward_fake(grad_loss, coef, a_v, b_v, s_t, s, st_t, st, reduction, alpha, beta, out_dtype):
    return torch.empty(a_v.shape, dtype=out_dtype, device=a_v.device)


def _setup_context(ctx, inputs, output):
    student_v, a_v, b_v, xt, xt_teacher, s_t, s, st_t, st, scale, norm_clip_min, reduction = inputs
    loss, coef = output
    ctx.mark_non_differentiable(coef)
    ctx.save_for_backward(coef, a_v, b_v, s_t, st_t)
    ctx.args = (s, st, reduction, student_v.dtype, xt.dtype)


def _make_backward(ns: str):
    def backward(ctx, grad_loss, grad_coef):
        op = ops_namespace(ns).score_difference_backward
        coef, a_v, b_v, s_t, st_t = ctx.saved_tensors
        s, st, reduction, v_dtype, xt_dtype = ctx.args
        grad_v = grad_xt = None
        if ctx.needs_input_grad[0]:
            grad_v = op(grad_loss, coef, a_v, b_v, s_t, s, st_t, st, reduction, 0.0, 1.0, v_dtype)
        if ctx.needs_input_grad[3]:
            grad_xt = op(grad_loss, coef, a_v, b_v, s_t, s, st_t, st, reduction, -1.0, 0.0, xt_dtype)
        return (grad_v, None, None, grad_xt) + (None,) * 8

    return backward


# The backward op first: the forward's autograd formula calls it.
score_difference_backward_op = define_op("score_difference_backward", BACKWARD_SCHEMA, _backward_triton,
                                         _backward_fake)
score_difference_op = define_op("score_difference", SCHEMA, _forward_triton, _forward_fake, _setup_context,
                                _make_backward, grad_args=(0, 3),
                                eager_impl=functools.partial(_forward_triton, cached_counter=True))


def make_public(ns: str):
    from .. import reference as ref

    ops = ops_namespace(ns)
    fast = ops_namespace(EAGER) if ns == NS_TRITON else None  # see euler.make_public

    def _run(student_v, a_v, b_v, xt, xt_teacher, sigma, sigma_teacher, scale, norm_clip_min, reduction):
        s_t, s = split_sigma(sigma)
        st_t, st = split_sigma(sigma_teacher)
        if fast is not None and eager_path(student_v):
            # grad_args=(0, 3): the autograd.Function gives the teacher inputs no gradient, nothing to detach.
            return fast.score_difference(student_v, a_v, b_v, xt, xt_teacher, s_t, s, st_t, st, scale,
                                         norm_clip_min, reduction)[0]
        return ops.score_difference(student_v, a_v.detach(), b_v.detach(), xt, xt_teacher.detach(), s_t, s, st_t,
                                    st, scale, norm_clip_min, reduction)[0]

    def dm_loss(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher, *, norm_clip_min=0.1,
                reduction="mean"):
        if F64 in (student_v.dtype, real_v.dtype, fake_v.dtype, xt.dtype, xt_teacher.dtype):
            return ref.dm_loss(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher,
                               norm_clip_min=norm_clip_min, reduction=reduction)
        return _run(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher, 1.0, float(norm_clip_min),
                    reduction)

    def cfg_loss(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher, *, guidance_scale,
                 norm_clip_min=0.1, reduction="mean"):
        if F64 in (student_v.dtype, cond_v.dtype, uncond_v.dtype, xt.dtype, xt_teacher.dtype):
            return ref.cfg_loss(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher,
                                guidance_scale=guidance_scale, norm_clip_min=norm_clip_min, reduction=reduction)
        return _run(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher, float(guidance_scale),
                    float(norm_clip_min), reduction)

    return {"dm_loss": dm_loss, "cfg_loss": cfg_loss}
