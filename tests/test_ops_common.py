"""Shared helpers of the fused-op tests (tests/test_ops_*.py) and the checks that hold for
every backend: registration, backend selection, schema parity between the Triton and
C++ op namespaces.

Accuracy rule (docs/design.md): a fused result passes when its error against float64 is within
a small multiple of the reference implementation's own error in the same input dtype.
"""

from __future__ import annotations

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref

ops = pytest.importorskip("cdm_kernels.ops")
from cdm_kernels.ops import utils as ops_utils  # noqa: E402

TRITON_OK = ops_utils.triton_supports(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32)
CPP_OK = ops_utils.cpp_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here")),
    pytest.param("cpp", marks=pytest.mark.skipif(not CPP_OK or DEVICE != "cpu",
                                                 reason="C++ extension not built (or tensors on CUDA)")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-52}
# Sizes that are not multiples of any block, 1-D to 5-D.
SHAPES = [(3,), (2, 37), (3, 5, 7), (2, 3, 5, 7), (2, 3, 2, 5, 3)]


def make(shape, dtype=torch.float32, seed=0, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def make_sigma(kind, batch, ndim, seed=0, low=0.05, high=0.95, device=DEVICE):
    """Sigma in each accepted form: float, 0-d, (1,), (B,), (B, 1, ..., 1)."""
    g = torch.Generator().manual_seed(seed + 1000)
    values = torch.rand(batch, generator=g) * (high - low) + low
    if kind == "float":
        return float(values[0])
    if kind == "0d":
        return values[0].clone().to(device)
    if kind == "one":
        return values[:1].clone().to(device)
    if kind == "batch":
        return values.to(device)
    if kind == "batch_nd":
        return values.reshape((batch,) + (1,) * (ndim - 1)).to(device)
    raise ValueError(kind)


def to64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double()
    return x


def assert_close_to_f64(got, ref_same, ref64, dtype, k=4.0, what="value"):
    """|got - ref64| <= k * |ref_same - ref64| + a few ulp of dtype (elementwise max norms)."""
    got, ref_same, ref64 = got.detach().double(), ref_same.detach().double(), ref64.detach().double()
    assert got.shape == ref64.shape, (what, got.shape, ref64.shape)
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite pattern differs"
    if not finite.any():
        return
    err = (got - ref64)[finite].abs().max().item()
    ref_err = (ref_same - ref64)[finite].abs().max().item()
    scale = 1.0 + ref64[finite].abs().max().item()
    bound = k * ref_err + 4.0 * EPS[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g})"


def run(backend, fn_name, *args, **kwargs):
    with ck.use_backend(backend):
        return getattr(ck, fn_name)(*args, **kwargs)


def test_every_op_is_registered_for_triton_with_the_reference_signature():
    import inspect

    for name in ops.OP_NAMES:
        assert "triton" in ck.available_backends(name)
        want = inspect.signature(getattr(ref, name))
        got = inspect.signature(ops.TRITON[name])
        assert list(want.parameters) == list(got.parameters), name
        for p in want.parameters.values():
            assert got.parameters[p.name].kind == p.kind, (name, p.name)
            assert got.parameters[p.name].default == p.default, (name, p.name)


@pytest.mark.skipif(not CPP_OK, reason="C++ extension not built")
def test_cpp_ops_have_the_same_schemas_as_the_triton_ops():
    for name in ("sigma_lincomb", "euler_step", "predict_x0_renoise", "score_difference",
                 "score_difference_backward", "flow_matching", "flow_matching_backward"):
        s_triton = str(getattr(torch.ops.cdm_kernels, name).default._schema)
        s_cpp = str(getattr(torch.ops.cdm_kernels_cpp, name).default._schema)
        assert s_triton.replace("cdm_kernels::", "") == s_cpp.replace("cdm_kernels_cpp::", ""), name


def test_auto_never_picks_interpreted_triton_and_falls_back_to_reference_for_float64():
    from cdm_kernels.backend import resolve

    cpu = torch.device("cpu")
    with ck.use_backend("auto"):
        fn = resolve("dm_loss", cpu, torch.float32)
        assert fn is (ops.CPP["dm_loss"] if CPP_OK else ref.dm_loss)
    with ck.use_backend("triton"):
        if TRITON_OK and DEVICE == "cpu":
            assert resolve("dm_loss", cpu, torch.float32) is ops.TRITON["dm_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_run_the_reference_in_float64(backend):
    x, v = make((2, 5), torch.float64), make((2, 5), torch.float64, seed=1)
    out = run(backend, "euler_extrapolate", x, v, 0.3, 0.7)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x + 0.4 * v, rtol=0, atol=1e-15)
