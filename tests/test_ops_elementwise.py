"""Fused elementwise ops (euler_extrapolate, euler_step, renoise, predict_x0_renoise) on every
backend against the reference and float64: dtypes, 1-D..5-D odd shapes, sigma forms,
non-contiguous inputs, seeded noise, gradients."""

from __future__ import annotations

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref
from cdm_kernels.reference.philox import philox_randn
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

SIGMA_KINDS = ["float", "0d", "one", "batch", "batch_nd"]


def _given_noise(t, r):
    return (t[0], r[0], t[1])  # renoise(x0, sigma, noise)


def _grads(fn, inputs, grad_outs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grad_outs)
    return outs, [leaf.grad for leaf in leaves]


def _check_op(backend, name, tensors, rest, dtype, grad_seed=7, build=lambda t, r: (*t, *r), **kwargs):
    """Forward outputs and input gradients of `name` vs reference (same dtype) and float64.

    `tensors` get gradients, `rest` (sigmas) do not; build(tensors, rest) orders the arguments.
    """
    fused = lambda *t: run(backend, name, *build(t, rest), **kwargs)
    same = lambda *t: getattr(ref, name)(*build(t, rest), **kwargs)
    f64 = lambda *t: getattr(ref, name)(*build(t, [to64(r) for r in rest]), **kwargs)
    n_out = 2 if name == "euler_step" else 1
    grad_outs = [make(tensors[0].shape, dtype, seed=grad_seed + i) for i in range(n_out)]
    got, got_g = _grads(fused, tensors, grad_outs)
    want, want_g = _grads(same, tensors, grad_outs)
    want64, want64_g = _grads(f64, [t.double() for t in tensors], [g.double() for g in grad_outs])
    for i, (a, b, c) in enumerate(zip(got, want, want64)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        assert_close_to_f64(a, b, c, dtype, what=f"{name} output {i}")
    for i, (a, b, c) in enumerate(zip(got_g, want_g, want64_g)):
        assert a is not None and a.dtype == tensors[i].dtype
        assert_close_to_f64(a, b, c, dtype, what=f"{name} grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_euler_ops_match_float64(backend, shape, dtype):
    kind = SIGMA_KINDS[len(shape) % len(SIGMA_KINDS)]
    x, v = make(shape, dtype, seed=1), make(shape, dtype, seed=2)
    sf = make_sigma(kind, shape[0], len(shape), seed=3)
    st = make_sigma("batch", shape[0], len(shape), seed=4, low=0.0, high=0.5)
    _check_op(backend, "euler_extrapolate", [x, v], [sf, st], dtype)
    _check_op(backend, "euler_step", [x, v], [sf, st], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_renoise_ops_match_float64(backend, shape, dtype):
    kind = SIGMA_KINDS[(len(shape) + 2) % len(SIGMA_KINDS)]
    x0, noise, v = make(shape, dtype, seed=5), make(shape, dtype, seed=6), make(shape, dtype, seed=8)
    s = make_sigma(kind, shape[0], len(shape), seed=9)
    st = make_sigma("batch_nd", shape[0], len(shape), seed=10)
    _check_op(backend, "renoise", [x0, noise], [s], dtype, build=_given_noise)  # gradient into x0 and noise
    _check_op(backend, "renoise", [x0], [s], dtype, seed=11, offset=3)  # seeded: gradient into x0 only
    for kw in ({"noise": noise}, {"seed": 12, "offset": 5}):
        got = run(backend, "predict_x0_renoise", x0, v, s, st, **kw)
        want = ref.predict_x0_renoise(x0, v, s, st, **kw)
        kw64 = {k: to64(val) for k, val in kw.items()}
        want64 = ref.predict_x0_renoise(x0.double(), v.double(), to64(s), to64(st), **kw64)
        for a, b, c in zip(got, want, want64):
            assert a.dtype == dtype and not a.requires_grad
            assert_close_to_f64(a, b, c, dtype, what=f"predict_x0_renoise {kw.keys()}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", SIGMA_KINDS)
def test_every_sigma_form(backend, kind):
    shape = (3, 2, 5, 3)
    x, v = make(shape, seed=1), make(shape, seed=2)
    sf = make_sigma(kind, 3, 4, seed=3)
    st = make_sigma(kind, 3, 4, seed=4, low=0.0, high=0.3)
    _check_op(backend, "euler_step", [x, v], [sf, st], torch.float32)
    _check_op(backend, "renoise", [x, v], [st], torch.float32, build=_given_noise)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_tensor_of_another_dtype_and_strided(backend):
    x, v = make((4, 3, 5)), make((4, 3, 5), seed=1)
    sig64 = torch.rand(8, dtype=torch.float64, device=DEVICE)[::2]  # strided, float64
    sig_bf16 = torch.rand(4, device=DEVICE).to(torch.bfloat16)
    got = run(backend, "euler_extrapolate", x, v, sig64, sig_bf16)
    torch.testing.assert_close(got, ref.euler_extrapolate(x, v, sig64, sig_bf16), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base = make((6, 3, 7, 5), seed=1)
    v_base = make((6, 3, 5, 7), seed=2)
    x = base[::2]  # batch stride only: read in place
    v = v_base[1::2].transpose(-1, -2)  # per-sample part not contiguous: copied
    assert not x.is_contiguous() and not v.is_contiguous()
    s = make_sigma("batch", 3, 4, seed=3)
    _check_op(backend, "euler_step", [x, v], [s, 0.1], torch.float32)
    _check_op(backend, "renoise", [v, x], [s], torch.float32, build=_given_noise)
    _check_op(backend, "renoise", [v], [s], torch.float32, seed=3)
    got = run(backend, "predict_x0_renoise", x, v, s, 0.5, v)
    want = ref.predict_x0_renoise(x, v, s, 0.5, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_noise_is_the_reference_philox_stream(backend):
    shape = (3, 4, 33)
    zeros = torch.zeros(shape, device=DEVICE)
    got = run(backend, "renoise", zeros, 1.0, seed=2**40 + 17, offset=11)
    want = philox_randn(shape, 2**40 + 17, 11).to(DEVICE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # element j is keyed by offset + j: shifting the offset shifts the stream
    shifted = run(backend, "renoise", zeros, 1.0, seed=2**40 + 17, offset=11 + 4 * 33)
    torch.testing.assert_close(shifted.flatten()[: 2 * 4 * 33], got.flatten()[4 * 33:], rtol=0, atol=0)
    again = run(backend, "renoise", zeros, 1.0, seed=2**40 + 17, offset=11)
    assert torch.equal(got, again)
    other = run(backend, "renoise", zeros, 1.0, seed=2**40 + 18, offset=11)
    assert not torch.allclose(got, other)
    # the same stream feeds predict_x0_renoise (xt_teacher at sigma_teacher = 1 is the noise)
    _, xtt = run(backend, "predict_x0_renoise", zeros, zeros, 0.5, 1.0, seed=2**40 + 17, offset=11)
    assert torch.equal(xtt, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_x0_renoise_outputs_are_detached(backend):
    xt, v = make((2, 9)), make((2, 9), seed=1).requires_grad_(True)
    x0, xtt = run(backend, "predict_x0_renoise", xt, v, 0.5, 0.3, seed=1)
    assert not x0.requires_grad and not xtt.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_value_error_naming_them(backend):
    x = make((2, 5))
    with ck.use_backend(backend):
        with pytest.raises(ValueError, match="v"):
            ck.euler_extrapolate(x, make((2, 6)), 0.1, 0.2)
        with pytest.raises(ValueError, match="sigma_from"):
            ck.euler_step(x, x, torch.ones(3, device=DEVICE), 0.2)
        with pytest.raises(ValueError, match="seed"):
            ck.renoise(x, 0.5, seed=-1)
        with pytest.raises(ValueError, match="noise"):
            ck.renoise(x, 0.5)
        with pytest.raises(ValueError, match="x0"):
            ck.renoise(x.to(torch.int32), 0.5, seed=1)
