"""The fused ops as compile-safe custom ops: torch.compile(fullgraph=True) with eager,
aot_eager and inductor, torch.library.opcheck on every op of every namespace, and the
GPU-only checks (CUDA-graph capture and replay, seeded-noise determinism, large shapes)."""

from __future__ import annotations

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref
from tests.test_ops_common import CPP_OK, DEVICE, TRITON_OK, make, make_sigma

ops = pytest.importorskip("cdm_kernels.ops")

NAMESPACES = [
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="triton cannot run here")),
    pytest.param("cpp", marks=pytest.mark.skipif(not CPP_OK or DEVICE != "cpu", reason="C++ extension not built")),
]


def _training_step(fns, x, v, real, fake, s, st):
    """Every public op once, the way the trainer strings them together; returns (loss, x_next)."""
    x_next, x0 = fns["euler_step"](x, v.detach(), s, 0.2)
    _, xt_teacher = fns["predict_x0_renoise"](x, v, s, st, seed=3, offset=1)
    x_off = fns["euler_extrapolate"](x, v.detach(), s, 0.5)
    loss = fns["dm_loss"](v, real, fake, x_off, xt_teacher, s, st)
    loss = loss + fns["cfg_loss"](v, real, fake, x, xt_teacher, s, 0.3, guidance_scale=7.0, reduction="sum")
    loss = loss + fns["flow_matching_loss"](v, x0, seed=5, reduction="mean")
    loss = loss + 1e-3 * fns["renoise"](x_off, st, real, seed=None).square().mean()
    return loss, x_next


def _function_sets():
    sets = []
    if TRITON_OK:
        sets.append(ops.TRITON)
    if CPP_OK and DEVICE == "cpu":
        sets.append(ops.CPP)
    return sets


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    sets = _function_sets()
    if not sets:
        pytest.skip("no accelerated backend here")

    def step(x, v, real, fake, s, st):
        outs = [_training_step(fns, x, v, real, fake, s, st) for fns in sets]
        return sum(o[0] for o in outs), torch.stack([o[1] for o in outs])

    shape = (2, 3, 5)
    x, real, fake = make(shape, seed=1), make(shape, seed=2), make(shape, seed=3)
    v = make(shape, seed=4).requires_grad_(True)
    s, st = make_sigma("batch", 2, 3, seed=5), make_sigma("batch_nd", 2, 3, seed=6)
    loss_eager, next_eager = step(x, v, real, fake, s, st)
    (grad_eager,) = torch.autograd.grad(loss_eager, v)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss, x_next = compiled(x, v, real, fake, s, st)
    (grad,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_next, next_eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-6, atol=1e-8)
    # and the eager accelerated result is the reference's
    loss_ref, _ = _training_step({n: getattr(ref, n) for n in ops.OP_NAMES}, x, v, real, fake, s, st)
    torch.testing.assert_close(loss_eager, loss_ref * len(sets), rtol=1e-5, atol=1e-6)


def _opcheck_cases(shape=(2, 3, 5)):
    """(op name, args) covering tensor and float sigmas, optional tensors and seeds."""
    b = shape[0]
    t = lambda seed, grad=False: make(shape, seed=seed).requires_grad_(grad)
    s_t = make_sigma("batch", b, len(shape), seed=1)
    st_t = make_sigma("batch_nd", b, len(shape), seed=2)
    f32 = torch.float32
    return [
        ("sigma_lincomb", (t(1, True), t(2, True), s_t, 0.0, None, 0.4, 1.0, -1.0, 0.0, 0.0, 1.0, 0.0, -1, 0, f32)),
        ("sigma_lincomb", (t(1, True), None, None, 0.3, st_t, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0, 0.0, 7, 2, f32)),
        ("euler_step", (t(3, True), t(4, True), s_t, 0.0, None, 0.1)),
        ("predict_x0_renoise", (t(5), t(6), None, s_t, 0.0, None, 0.6, 11, 0)),
        ("predict_x0_renoise", (t(5), t(6), t(7), None, 0.5, st_t, 0.0, -1, 0)),
        ("score_difference", (t(8, True), t(9), t(10), t(11, True), t(12), s_t, 0.0, None, 0.7, 7.0, 0.1, "mean")),
        ("score_difference", (t(8, True), t(9), t(10), t(11), t(12), None, 0.4, st_t, 0.0, 1.0, 0.1, "none")),
        ("score_difference_backward", (torch.tensor(1.5), torch.rand(b), t(9), t(10), s_t, 0.0, None, 0.3, "mean",
                                       0.0, 1.0, torch.bfloat16)),
        ("flow_matching", (t(13, True), t(14), t(15), -1, 0, "sum")),
        ("flow_matching", (t(13, True), t(14), None, 5, 3, "none")),
        ("flow_matching_backward", (torch.rand(b), t(13), t(14), None, 5, 3, "none")),
    ]


def _to_device(a):
    return a.to(DEVICE) if isinstance(a, torch.Tensor) else a


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(namespace, case):
    name, args = _opcheck_cases()[case]
    ns = "cdm_kernels" if namespace == "triton" else "cdm_kernels_cpp"
    op = getattr(getattr(torch.ops, ns), name).default
    args = tuple(_to_device(a) for a in args)
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_of_loss_forward_backward():
    shape = (4, 16, 32, 32)
    real, fake, x, xtt = (make(shape, torch.bfloat16, seed=i, device="cuda") for i in range(4))
    s = torch.rand(4, device="cuda")
    st = torch.rand(4, device="cuda")
    v = make(shape, torch.bfloat16, seed=9, device="cuda").requires_grad_(True)

    def fwd_bwd():
        loss = ck.dm_loss(v, real, fake, x, xtt, s, st) + ck.flow_matching_loss(v, x, seed=7)
        loss.backward()
        return loss

    with ck.use_backend("triton"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (kernel compilation) outside the capture
                v.grad = None
                fwd_bwd()
        torch.cuda.current_stream().wait_stream(stream)
        v.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = fwd_bwd()
        for trial in range(2):
            with torch.no_grad():
                real.copy_(make(shape, torch.bfloat16, seed=20 + trial, device="cuda"))
                s.copy_(torch.rand(4, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            leaf = v.detach().clone().requires_grad_(True)
            want = ref.dm_loss(leaf, real, fake, x, xtt, s, st) + ref.flow_matching_loss(leaf, x, seed=7)
            want.backward()
            torch.testing.assert_close(static_loss, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v.grad.float(), leaf.grad.float(), rtol=2e-2, atol=1e-6)


@pytest.mark.gpu
def test_seeded_noise_is_deterministic_across_runs_and_matches_the_reference():
    shape = (3, 16, 40, 40)
    x0 = torch.zeros(shape, device="cuda")
    with ck.use_backend("triton"):
        a = ck.renoise(x0, 1.0, seed=1234, offset=99)
        b = ck.renoise(x0, 1.0, seed=1234, offset=99)
        pv = make(shape, seed=1, device="cuda").requires_grad_(True)
        losses = [ck.flow_matching_loss(pv, x0, seed=1234, offset=99) for _ in range(2)]
    assert torch.equal(a, b)
    assert torch.equal(losses[0], losses[1])  # no atomics: bitwise reproducible
    want = ref.philox_randn(shape, 1234, 99, device="cuda")
    torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)  # the GPU's Box-Muller differs by a few ULP


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_large_shapes_on_gpu_match_float64(dtype):
    from tests.test_ops_common import assert_close_to_f64

    shape = (2, 16, 21, 30, 26)  # a video latent: several reduction chunks per sample
    t = [make(shape, dtype, seed=i, device="cuda") for i in range(5)]
    s, st = torch.rand(2, device="cuda"), torch.rand(2, device="cuda")
    for reduction in ("mean", "none"):
        leaves = [x.clone().requires_grad_(True) for x in (t[0], t[0], t[0].double())]
        with ck.use_backend("triton"):
            got = ck.cfg_loss(leaves[0], *t[1:], s, st, guidance_scale=4.5, reduction=reduction)
        same = ref.cfg_loss(leaves[1], *t[1:], s, st, guidance_scale=4.5, reduction=reduction)
        f64 = ref.cfg_loss(leaves[2], *[x.double() for x in t[1:]], s, st, guidance_scale=4.5, reduction=reduction)
        for loss in (got, same, f64):
            loss.sum().backward()
        assert_close_to_f64(got, same, f64, torch.float32, what="loss")
        assert_close_to_f64(leaves[0].grad, leaves[1].grad, leaves[2].grad, dtype, what="grad")


def test_seeded_reference_ops_compile_as_one_opaque_noise_op():
    """Traced, the reference Philox rounds were hundreds of int64 ops that inductor did not finish compiling (25+
    min on a CPU); under torch.compile the noise is one custom op, so the graph stays small. Same values and
    gradients as eager (aot_eager here; inductor on this graph took ~20 s on a loaded 2-core CPU, by hand)."""
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    x, pred = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, requires_grad=True)
    s, st = torch.rand(2), torch.rand(2)

    def seeded(a, p):
        _, xt = ck.predict_x0_renoise(a, p, s, st, seed=9, offset=2)
        return ck.renoise(a, s, seed=7, offset=3), xt, ck.flow_matching_loss(p, a, seed=5)

    with ck.use_backend("reference"):
        want = seeded(x, pred)
        want_grad = torch.autograd.grad(want[2] + want[1].sum(), pred)[0]
        torch.compile(seeded, backend=capture, fullgraph=True)(x, pred)
        got = torch.compile(seeded, backend="aot_eager", fullgraph=True)(x, pred)
        got_grad = torch.autograd.grad(got[2] + got[1].sum(), pred)[0]
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("philox_noise" in t for t in targets) == 3 and len(targets) < 60, targets
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
