"""Kernel launches per call of the fused ops, and the eager fast path (issue 25).

Launches are counted with `cdm_kernels.ops.utils.record_launches` (kernels run, through the interpreter).
Expected counts follow the design: an elementwise op reads its inputs once in one kernel; a loss forward is
one launch (partial sums, finalized by the program that finishes last); its backward one elementwise pass per
input that needs a gradient: forward + backward is two launches. The fast path (public function ->
implementation, skipping the torch.library dispatcher in plain eager code) must give bitwise the same results
and gradients as the custom op, which every dispatch mode, fake tensor and compiled graph still gets.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cdm_kernels as ck
from cdm_kernels import reference as ref
from cdm_kernels.ops.utils import eager_path, record_launches


class _SeenOps(TorchDispatchMode):
    """Records the overloads dispatched (and so, being a mode, turns the fast path off)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs(shape=(3, 5, 7), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(shape, generator=g).to(dtype) for _ in range(5)]
    s, st = torch.rand(shape[0], generator=g) * 0.9 + 0.05, torch.rand(shape[0], generator=g) * 0.9 + 0.05
    return t, s, st


ELEMENTWISE = {
    "euler_extrapolate": lambda m, t, s, st: m.euler_extrapolate(t[0], t[1], s, st),
    "euler_step": lambda m, t, s, st: m.euler_step(t[0], t[1], s, st),
    "renoise": lambda m, t, s, st: m.renoise(t[0], st, t[1]),
    "renoise_seeded": lambda m, t, s, st: m.renoise(t[0], st, seed=3),
    "predict_x0_renoise": lambda m, t, s, st: m.predict_x0_renoise(t[0], t[1], s, st, seed=3),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_ops_launch_once(name):
    t, s, st = _inputs()
    with ck.use_backend("triton"), record_launches() as log:
        out = ELEMENTWISE[name](ck, t, s, st)
    assert len(log) == 1, log
    expected = ELEMENTWISE[name](ref, [x.double() for x in t], s.double(), st.double())
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    for o, e in zip(as_tuple(out), as_tuple(expected)):
        torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-6)


LOSSES = {
    "dm_loss": lambda m, v, t, s, st, xt=None: m.dm_loss(v, t[1], t[2], t[3] if xt is None else xt, t[4], s, st),
    "cfg_loss": lambda m, v, t, s, st, xt=None: m.cfg_loss(v, t[1], t[2], t[3] if xt is None else xt, t[4], s, st,
                                                          guidance_scale=7.0),
    "flow_matching_loss": lambda m, v, t, s, st, xt=None: m.flow_matching_loss(v, t[1], seed=5),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_launches_forward_and_backward(name):
    t, s, st = _inputs(seed=1)
    v = t[0].clone().requires_grad_(True)
    with ck.use_backend("triton"), record_launches() as log:
        with torch.no_grad():
            LOSSES[name](ck, t[0], t, s, st)
        forward = len(log)
        log.clear()
        LOSSES[name](ck, v, t, s, st).backward()
        total = len(log)
    assert forward == 1, log  # partial sums, finalized by the last program
    assert total == 2, log  # + one gradient pass
    v64 = t[0].double().requires_grad_(True)
    LOSSES[name](ref, v64, [x.double() for x in t], s.double(), st.double()).backward()
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-4, atol=1e-9)


def test_score_difference_gradient_into_xt_is_one_more_launch():
    t, s, st = _inputs(seed=2)
    v, xt = t[0].clone().requires_grad_(True), t[3].clone().requires_grad_(True)
    with ck.use_backend("triton"), record_launches() as log:
        ck.dm_loss(v, t[1], t[2], xt, t[4], s, st).backward()
    assert len(log) == 3, log


@pytest.mark.parametrize("name", list(LOSSES))
def test_single_launch_forward_finalizes_once_and_leaves_its_ticket_counter_at_zero(name, monkeypatch):
    # GPU geometry on a small tensor: 4 chunks x 3 samples = 12 programs share one ticket counter; only the
    # last one may finalize, after every partial is stored (the interpreter runs programs in grid order, so
    # a finalize by an earlier program would miss partial sums and change the loss), and it resets the counter
    # for the next call on the stream.
    import math

    from cdm_kernels.ops import flow_matching as fm
    from cdm_kernels.ops import score_difference as sd
    from cdm_kernels.ops import utils

    for mod in (sd, fm):
        monkeypatch.setattr(mod, "reduce_sizes", lambda n, *a, **k: (16, 64, math.ceil(n / 64)))
    t, s, st = _inputs(shape=(3, 5, 50), seed=4)
    for call in range(3):
        with ck.use_backend("triton"):
            got = LOSSES[name](ck, t[0], t, s, st)
        want = LOSSES[name](ref, t[0].double(), [x.double() for x in t], s.double(), st.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        assert utils.ticket_counter(t[0].device, cached=True).item() == 0, call
        t = [x.flip(0).contiguous() for x in t]  # fresh values each call


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_the_custom_op(name, dtype):
    # Same kernels either way: results and gradients must be bitwise equal. The dispatch mode forces the op path
    # and shows that it was taken (the custom op's overload is dispatched); without it nothing is dispatched
    # under that name.
    t, s, st = _inputs(shape=(2, 3, 9), dtype=dtype, seed=3)
    xt = t[3].clone().requires_grad_(name != "flow_matching_loss")
    results = []
    for forced in (False, True):
        v = t[0].clone().requires_grad_(True)
        seen = _SeenOps()
        with ck.use_backend("triton"):
            if forced:
                with seen:
                    loss = LOSSES[name](ck, v, t, s, st, xt)
            else:
                loss = LOSSES[name](ck, v, t, s, st, xt)
            loss.backward()
        custom = [op for op in seen.ops if op.startswith("cdm_kernels.")]
        assert bool(custom) == forced, seen.ops
        # which autograd node was recorded tells the paths apart: the eager twin's Function or the custom op's
        node = type(loss.grad_fn).__name__
        assert ("GeneratedBackwardFor_cdm_kernels" in node) == forced and ("_eagerBackward" in node) != forced, node
        results.append((loss.detach(), v.grad, None if xt.grad is None else xt.grad.clone()))
        xt.grad = None
    (l0, g0, x0), (l1, g1, x1) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert (x0 is None and x1 is None) or torch.equal(x0, x1)


def test_eager_path_only_for_plain_eager_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3)
    assert eager_path(x)
    with _SeenOps():
        assert not eager_path(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not eager_path(fake)
    assert not eager_path(torch.nn.Parameter(x))  # any subclass takes the custom op
