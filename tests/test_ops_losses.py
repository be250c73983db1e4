"""Fused losses (dm_loss, cfg_loss, flow_matching_loss) on every backend against the reference
and float64 autograd: dtypes, odd 1-D..5-D shapes, reductions, sigma forms, non-contiguous
inputs, non-finite teachers and students, multi-chunk reductions, seeded noise."""

from __future__ import annotations

import math

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref
from tests.test_ops_common import (
    BACKENDS,
    DEVICE,
    DTYPES,
    SHAPES,
    assert_close_to_f64,
    make,
    make_sigma,
    run,
    to64,
)

REDUCTIONS = ["mean", "sum", "none"]


def _loss_and_grads(fn, tensors, grad_idx):
    leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(tensors)]
    loss = fn(leaves)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), [leaves[i].grad for i in grad_idx]


def _check_score_difference(backend, which, tensors, s, st, dtype, k=4.0, **kw):
    name = "dm_loss" if which == "dm" else "cfg_loss"
    if which == "cfg":
        kw.setdefault("guidance_scale", 7.0)
    fused = lambda t: run(backend, name, *t, s, st, **kw)
    same = lambda t: getattr(ref, name)(*t, s, st, **kw)
    f64 = lambda t: getattr(ref, name)(*t, to64(s), to64(st), **kw)
    grad_idx = (0, 3)  # student_v and xt
    got, got_g = _loss_and_grads(fused, tensors, grad_idx)
    want, want_g = _loss_and_grads(same, tensors, grad_idx)
    want64, want64_g = _loss_and_grads(f64, [t.double() for t in tensors], grad_idx)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # The loss is fp32 whatever the input dtype: judge it at fp32 precision.
    assert_close_to_f64(got, want, want64, torch.float32, k=k, what=f"{name} loss")
    for i, a, b, c in zip(grad_idx, got_g, want_g, want64_g):
        assert a.dtype == tensors[i].dtype and a.shape == tensors[i].shape
        assert_close_to_f64(a, b, c, dtype, k=k, what=f"{name} grad of input {i}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("which", ["dm", "cfg"])
def test_score_difference_losses_match_float64(backend, which, shape, dtype):
    reduction = REDUCTIONS[len(shape) % 3]
    kinds = ["float", "batch", "batch_nd", "0d", "one"]
    tensors = [make(shape, dtype, seed=i) for i in range(5)]
    s = make_sigma(kinds[len(shape) % 5], shape[0], len(shape), seed=1)
    st = make_sigma(kinds[(len(shape) + 1) % 5], shape[0], len(shape), seed=2)
    _check_score_difference(backend, which, tensors, s, st, dtype, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_score_difference_reductions_and_norm_clip(backend, reduction):
    shape = (3, 4, 9)
    tensors = [make(shape, seed=10 + i, scale=0.01 if i in (1, 2) else 1.0) for i in range(5)]
    # xt_teacher close to x0_s so that the normaliser is clipped for some samples
    tensors[4] = tensors[3] - 0.4 * tensors[0] + 0.01 * make(shape, seed=20)
    for clip in (0.1, 1e-4):
        _check_score_difference(backend, "dm", tensors, 0.4, 0.6, torch.float32, reduction=reduction,
                                norm_clip_min=clip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_difference_non_contiguous(backend):
    base = [make((6, 3, 5, 7), seed=i) for i in range(5)]
    tensors = [
        base[0][::2],  # batch stride 2: read in place
        make((6, 3, 7, 5), seed=5)[1::2].transpose(-1, -2),  # per-sample part transposed: copied
        make((3, 3, 5, 9), seed=6)[..., :7],  # inner slice
        base[3][::2],
        base[4][1::2],
    ]
    assert all(t.shape == (3, 3, 5, 7) for t in tensors) and not any(t.is_contiguous() for t in tensors)
    _check_score_difference(backend, "cfg", tensors, make_sigma("batch", 3, 4), 0.3, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_teacher_zeroes_only_that_samples_shift(backend):
    shape = (4, 3, 11)
    tensors = [make(shape, seed=30 + i) for i in range(5)]
    tensors[1][1, 0, 3] = float("nan")  # real teacher NaN in sample 1
    tensors[4][2, 2, 7] = float("inf")  # teacher input inf in sample 2 (x0_real and x0_fake both inf)
    tensors[2][3, 1, 1] = float("-inf")  # fake teacher -inf in sample 3
    got = _check_score_difference(backend, "dm", tensors, 0.5, 0.7, torch.float32, reduction="none")
    assert torch.isfinite(got).all()
    assert got[0] > 0 and (got[1:] == 0).all()
    student_v = tensors[0].clone().requires_grad_(True)
    with ck.use_backend(backend):
        loss = ck.dm_loss(student_v, *tensors[1:], 0.5, 0.7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student_v.grad).all()
    assert (student_v.grad[1:] == 0).all() and (student_v.grad[0] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_student_is_not_hidden(backend):
    shape = (3, 17)
    tensors = [make(shape, seed=40 + i) for i in range(5)]
    tensors[0][1, 4] = float("inf")
    student_v = tensors[0].clone().requires_grad_(True)
    with ck.use_backend(backend):
        per_sample = ck.dm_loss(student_v, *tensors[1:], 0.5, 0.7, reduction="none")
        loss = ck.dm_loss(student_v, *tensors[1:], 0.5, 0.7)
    want = ref.dm_loss(*tensors, 0.5, 0.7, reduction="none")
    assert torch.isfinite(per_sample[[0, 2]]).all() and not torch.isfinite(per_sample[1])
    assert not torch.isfinite(want[1])
    torch.testing.assert_close(per_sample[[0, 2]], want[[0, 2]], rtol=1e-5, atol=0)
    loss.backward()
    assert not torch.isfinite(loss)
    assert not torch.isfinite(student_v.grad[1]).all() and torch.isfinite(student_v.grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_difference_multi_chunk_reduction(backend, monkeypatch):
    """GPU-sized launch geometry on small tensors: several chunks per sample, several finalize tiles."""
    if backend == "triton":
        from cdm_kernels.ops import score_difference as sd

        monkeypatch.setattr(sd, "reduce_sizes", lambda n, *a, **k: (16, 32, math.ceil(n / 32)))
        monkeypatch.setattr(sd, "finalize_block_sizes", lambda b, c: (2, 2))
    # triton: 150 elements = 5 chunks of 32 (the last one partial), 5 samples in finalize tiles of 2;
    # cpp: 35000 elements = 3 chunks of 16384 (the last one partial)
    shape = (5, 3, 50) if backend == "triton" else (5, 5, 7000)
    tensors = [make(shape, seed=50 + i) for i in range(5)]
    tensors[1][3, 2, -1] = float("nan")  # in the last, partial chunk
    for reduction in REDUCTIONS:
        _check_score_difference(backend, "cfg", tensors, make_sigma("batch", 5, 3), 0.5, torch.float32,
                                reduction=reduction)


def _check_flow_matching(backend, pred, x0, noise, dtype, **kw):
    fused = lambda t: run(backend, "flow_matching_loss", *t, **kw)
    same = lambda t: ref.flow_matching_loss(*t, **kw)
    tensors = [pred, x0] + ([noise] if noise is not None else [])
    got, got_g = _loss_and_grads(fused, tensors, (0,))
    want, want_g = _loss_and_grads(same, tensors, (0,))
    want64, want64_g = _loss_and_grads(same, [t.double() for t in tensors], (0,))
    assert got.dtype == torch.float32
    assert_close_to_f64(got, want, want64, torch.float32, what="flow matching loss")
    assert got_g[0].dtype == dtype
    assert_close_to_f64(got_g[0], want_g[0], want64_g[0], dtype, what="flow matching grad")
    return got, got_g[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flow_matching_loss_matches_float64(backend, shape, dtype):
    reduction = REDUCTIONS[(len(shape) + 1) % 3]
    pred, x0, noise = make(shape, dtype, seed=1), make(shape, dtype, seed=2), make(shape, dtype, seed=3)
    _check_flow_matching(backend, pred, x0, noise, dtype, reduction=reduction)
    # seeded: the reference draws the same Philox stream (float64 truth: the fp32 stream in fp64)
    _check_flow_matching(backend, pred, x0, None, dtype, seed=123, offset=7, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_seeded_equals_given_renoise_noise(backend):
    shape = (3, 4, 13)
    pred, x0 = make(shape, seed=1), make(shape, seed=2)
    with ck.use_backend(backend):
        noise = ck.renoise(torch.zeros(shape, device=DEVICE), 1.0, seed=99, offset=4)
    loss_seeded, grad_seeded = _check_flow_matching(backend, pred, x0, None, torch.float32, seed=99, offset=4)
    loss_given, grad_given = _check_flow_matching(backend, pred, x0, noise, torch.float32)
    torch.testing.assert_close(loss_seeded, loss_given, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_seeded, grad_given, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_multi_chunk_and_non_contiguous(backend, monkeypatch):
    if backend == "triton":
        from cdm_kernels.ops import flow_matching as fm

        monkeypatch.setattr(fm, "reduce_sizes", lambda n, *a, **k: (16, 32, math.ceil(n / 32)))
        monkeypatch.setattr(fm, "finalize_block_sizes", lambda b, c: (2, 2))
    pred = make((10, 5, 23), seed=1)[::2]
    x0 = make((5, 23, 5), seed=2).transpose(1, 2)
    for reduction in REDUCTIONS:
        _check_flow_matching(backend, pred, x0, None, torch.float32, seed=5, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_reject_bad_arguments(backend):
    t = [make((2, 6), seed=i) for i in range(5)]
    with ck.use_backend(backend):
        with pytest.raises(ValueError, match="fake_v"):
            ck.dm_loss(t[0], t[1], make((2, 7)), t[3], t[4], 0.5, 0.5)
        with pytest.raises(ValueError, match="reduction"):
            ck.dm_loss(*t, 0.5, 0.5, reduction="avg")
        with pytest.raises(ValueError, match="norm_clip_min"):
            ck.dm_loss(*t, 0.5, 0.5, norm_clip_min=0.0)
        with pytest.raises(ValueError, match="sigma_teacher"):
            ck.cfg_loss(*t, 0.5, torch.ones(2, 6, device=DEVICE), guidance_scale=3.0)
        with pytest.raises(ValueError, match="guidance_scale"):
            ck.cfg_loss(*t, 0.5, 0.5, guidance_scale=float("nan"))
        with pytest.raises(ValueError, match="x0"):
            ck.flow_matching_loss(t[0], make((3, 6)), seed=1)
        with pytest.raises(ValueError, match="offset"):
            ck.flow_matching_loss(t[0], t[1], seed=1, offset=-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_of_samples_with_no_elements_are_nan_like_the_reference(backend):
    # (B, 0): a one-launch forward has no program to finalize; the loss must still be written (NaN, the
    # reference's mean over nothing), never left uninitialised, and the backward gives an empty gradient.
    t = [torch.randn(3, 0, device=DEVICE) for _ in range(5)]
    for reduction in REDUCTIONS:
        want = ref.dm_loss(*t, 0.5, 0.7, reduction=reduction)
        v = t[0].clone().requires_grad_(True)
        with ck.use_backend(backend):
            got = ck.dm_loss(v, *t[1:], 0.5, 0.7, reduction=reduction)
            fm = ck.flow_matching_loss(t[0], t[1], seed=3, reduction=reduction)
        assert got.shape == want.shape and torch.isnan(got).all() and torch.isnan(want).all()
        assert fm.shape == want.shape and torch.isnan(fm).all()
        got.sum().backward()
        assert v.grad.shape == v.shape
