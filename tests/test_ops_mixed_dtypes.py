"""Mixed input dtypes, as bf16 autocast produces them (bf16 model outputs, fp32 latents).

A deliberate widening of docs/design.md's "dtype mismatch raises": every op computes in fp32 from
whatever fp32/bf16/fp16 inputs it gets, so a mix is well defined, and rejecting it would make
callers pay a full-size cast per tensor. Each backend must equal the reference on the same mix.
"""

from __future__ import annotations

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref

from .test_ops_common import BACKENDS, DEVICE, make


def _mixed(seed):
    shape = (3, 4, 5, 7)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
    return [make(shape, dt, seed=seed + i) for i, dt in enumerate(dtypes)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_with_mixed_dtypes_equal_the_reference(backend):
    sv, a, b, xt, xtt = _mixed(0)
    g = torch.Generator().manual_seed(9)
    s, st = torch.rand(3, generator=g).to(DEVICE), torch.rand(3, generator=g).to(DEVICE)
    for op, kw in (("dm_loss", {}), ("cfg_loss", {"guidance_scale": 3.0})):
        p_ref, p = sv.clone().requires_grad_(True), sv.clone().requires_grad_(True)
        want = getattr(ref, op)(p_ref, a, b, xt, xtt, s, st, **kw)
        with ck.use_backend(backend):
            got = getattr(ck, op)(p, a, b, xt, xtt, s, st, **kw)
        want.backward()
        got.backward()
        assert got.dtype == torch.float32 and torch.isfinite(got)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-9)
    with ck.use_backend(backend):
        fm = ck.flow_matching_loss(a, xt, seed=4)  # bf16 prediction, bf16 target
        ee = ck.euler_extrapolate(xtt, b, s, st)  # fp32 x, fp16 v
    torch.testing.assert_close(fm, ref.flow_matching_loss(a, xt, seed=4), rtol=1e-5, atol=1e-6)
    want_ee = ref.euler_extrapolate(xtt, b, s, st)
    assert ee.dtype == want_ee.dtype
    torch.testing.assert_close(ee, want_ee, rtol=1e-6, atol=1e-6)
