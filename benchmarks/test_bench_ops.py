"""pytest-benchmark suite of the fused ops: one benchmark group per op (and pass), four providers.

Providers (the `provider` parameter): ``reference`` (eager PyTorch, cdm_kernels.reference),
``compile(reference)`` (torch.compile of the same function, inductor, compiled once per session),
``cpp`` (the C++ CPU extension, when built; CPU only) and ``triton`` (the fused kernels; CUDA only, never the
interpreter). A provider that cannot run here is skipped with the reason.

Every benchmark also checks its provider against float64: the output (and, for fwd+bwd, the gradient) must
be within a small multiple of the eager reference's own error in the same dtype, plus a few ulp (the rule of
tests/test_ops_common.py). So ``--benchmark-disable`` (each body runs once, no timing) is a correctness test,
which is how `make test` runs it.

    pytest benchmarks/ --benchmark-autosave                # time everything, save .benchmarks/<machine>/NNNN_*.json
    pytest benchmarks/ --benchmark-compare                 # ... and compare with the last saved run
    pytest benchmarks/ --benchmark-disable                 # correctness only (CI)
    pytest benchmarks/ -k "dm_loss and cpp" --bench-shape 8,16,64,64
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from cdm_kernels import reference as ref

ops = pytest.importorskip("cdm_kernels.ops")
from cdm_kernels.ops.utils import cpp_available  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
PROVIDERS = ["reference", "compile(reference)", "cpp", "triton"]
CORRECTNESS_SHAPE = (3, 5, 17, 19)


@dataclass(frozen=True)
class Case:
    op: str  # the cdm_kernels op (reference / ops.CPP / ops.TRITON name)
    backward: bool  # time forward + backward (gradient w.r.t. the first tensor input)
    seeded: bool  # noise drawn in-kernel from Philox (never read from memory)
    call: Callable[[Callable, dict], Any]  # call(fn, inputs) -> output
    reads: int  # minimal bytes, in tensors of the benchmark shape: inputs read once ...
    writes: int  # ... outputs written once (seeded noise is generated, not read)


CASES = {
    "euler_extrapolate": Case("euler_extrapolate", False, False, lambda f, t: f(t["a"], t["b"], t["s"], t["st"]), 2, 1),
    "euler_step": Case("euler_step", False, False, lambda f, t: f(t["a"], t["b"], t["s"], t["st"]), 2, 2),
    "renoise": Case("renoise", False, False, lambda f, t: f(t["a"], t["st"], t["b"]), 2, 1),
    "renoise (seeded)": Case("renoise", False, True, lambda f, t: f(t["a"], t["st"], seed=1), 1, 1),
    "predict_x0_renoise (seeded)": Case("predict_x0_renoise", False, True,
                                        lambda f, t: f(t["a"], t["b"], t["s"], t["st"], seed=1), 2, 2),
    "dm_loss fwd": Case("dm_loss", False, False,
                        lambda f, t: f(t["a"], t["b"], t["c"], t["d"], t["e"], t["s"], t["st"]), 5, 0),
    "dm_loss fwd+bwd": Case("dm_loss", True, False,
                            lambda f, t: f(t["a"], t["b"], t["c"], t["d"], t["e"], t["s"], t["st"]), 5, 1),
    "cfg_loss fwd+bwd": Case("cfg_loss", True, False,
                             lambda f, t: f(t["a"], t["b"], t["c"], t["d"], t["e"], t["s"], t["st"],
                                            guidance_scale=7.0), 5, 1),
    "flow_matching_loss fwd (seeded)": Case("flow_matching_loss", False, True, lambda f, t: f(t["a"], t["b"], seed=3),
                                            2, 0),
    "flow_matching_loss fwd+bwd (seeded)": Case("flow_matching_loss", True, True,
                                                lambda f, t: f(t["a"], t["b"], seed=3), 2, 1),
}


@pytest.fixture(scope="session")
def bench_config(request):
    shape_opt = request.config.getoption("--bench-shape")
    dtype_opt = request.config.getoption("--bench-dtype")
    if shape_opt:
        shape = tuple(int(s) for s in shape_opt.split(","))
    elif request.config.getoption("benchmark_disable"):
        shape = CORRECTNESS_SHAPE  # correctness only: small, and no dimension a multiple of a block size
    else:
        shape = (16, 16, 128, 128) if DEVICE == "cuda" else (4, 16, 64, 64)
    dtype = getattr(torch, dtype_opt) if dtype_opt else (torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    return shape, dtype


@pytest.fixture(scope="session")
def inputs(bench_config):
    """Five tensors a..e of the benchmark shape and two (B,) sigmas, fresh random values, on DEVICE."""
    shape, dtype = bench_config
    g = torch.Generator().manual_seed(2024)
    t = {k: torch.randn(shape, generator=g).to(device=DEVICE, dtype=dtype) for k in "abcde"}
    t["s"] = (torch.rand(shape[0], generator=g) * 0.9 + 0.05).to(DEVICE)
    t["st"] = (torch.rand(shape[0], generator=g) * 0.9 + 0.05).to(DEVICE)
    return t


@functools.cache
def _compiled(op: str):
    # Once per session: the fwd and fwd+bwd benchmarks of one op share it (dynamo keys on grad mode).
    return torch.compile(getattr(ref, op), dynamic=False)


def _provider_fn(provider: str, case: Case):
    if provider == "reference":
        return getattr(ref, case.op)
    if provider == "compile(reference)":
        if case.seeded and DEVICE == "cpu":
            # The traced Philox took inductor 25+ min (RESULTS_ops.md); now one opaque op, ~20 s per graph on a
            # loaded 2-core CPU: still four extra compiles, kept out of `make test`'s CPU run.
            pytest.skip("seeded compile(reference) on CPU: an inductor compile per graph, kept out of the CPU suite")
        return _compiled(case.op)
    if provider == "cpp":
        if DEVICE != "cpu" or not cpp_available():
            pytest.skip("the C++ extension runs CPU tensors only" if DEVICE != "cpu" else "C++ extension not built")
        return ops.CPP[case.op]
    if provider == "triton":
        if DEVICE != "cuda":
            pytest.skip("triton runs on CUDA only (the interpreter is not a benchmark)")
        return ops.TRITON[case.op]
    raise ValueError(provider)


def _run(fn, case: Case, inputs: dict):
    """The timed body: the op, plus its backward (gradient w.r.t. the first input) for fwd+bwd cases."""
    if not case.backward:
        return case.call(fn, inputs)
    leaf = inputs["a"].detach().requires_grad_(True)
    out = case.call(fn, {**inputs, "a": leaf})
    (grad,) = torch.autograd.grad(out, leaf)
    return out.detach(), grad


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_close_to_f64(got, same, ref64, dtype, what, k=4.0):
    """|got - ref64| <= k * |reference(same dtype) - ref64| + 4 ulp of dtype * max|ref64| (max norms); NaN fails."""
    got, same, ref64 = got.detach().double(), same.detach().double(), ref64.detach().double()
    assert got.shape == ref64.shape, (what, got.shape, ref64.shape)
    assert torch.isfinite(ref64).all(), f"{what}: the float64 reference is not finite (bad inputs)"
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    err = (got - ref64).abs().max().item()
    ref_err = (same - ref64).abs().max().item()
    # Relative to the values' own scale (gradients of a mean are ~1/numel: an absolute floor would hide errors).
    bound = k * ref_err + 4.0 * EPS[dtype] * max(ref64.abs().max().item(), 1e-30)
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g})"


_EXPECTED: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}


def _expected(label: str, case: Case, inputs: dict):
    """(eager reference in the benchmark dtype, float64 reference) of one case, computed once per session."""
    if label not in _EXPECTED:
        fn = getattr(ref, case.op)
        inputs64 = {k: v.double() for k, v in inputs.items()}
        _EXPECTED[label] = (_as_list(_run(fn, case, inputs)), _as_list(_run(fn, case, inputs64)))
    return _EXPECTED[label]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("label", list(CASES))
def test_op(request, label, provider, inputs, bench_config):
    case = CASES[label]
    fn = _provider_fn(provider, case)  # skips before the benchmark fixture exists (no "fixture unused" warning)
    benchmark = request.getfixturevalue("benchmark")
    shape, dtype = bench_config
    numel = inputs["a"].numel()
    benchmark.group = label
    benchmark.extra_info.update(op=case.op, shape=list(shape), dtype=str(dtype).removeprefix("torch."), device=DEVICE,
                                minimal_bytes=(case.reads + case.writes) * numel * inputs["a"].element_size())

    def body():
        out = _run(fn, case, inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # wall-clock timing: wait for the kernels
        return out

    if not benchmark.disabled:
        body()  # warm-up outside the timing: torch.compile compiles here, caches and allocators settle
    got = _as_list(benchmark(body))
    same, ref64 = _expected(label, case, inputs)
    assert len(got) == len(ref64)
    for i, (g, s, r) in enumerate(zip(got, same, ref64)):
        _assert_close_to_f64(g, s, r, dtype, f"{label} [{provider}] output {i}")

