"""The one-launch loss forwards on a GPU (issue 25): what the interpreter cannot show.

A loss forward is one launch whose last program (the one drawing the last ticket from an int32 counter) sums
every program's partials. The interpreter runs programs one after another, so it can never show a
memory-ordering bug (a finalize reading a partial before it is visible) or a counter shared by work that
overlaps. These tests run the real kernels: many programs per launch, fresh inputs every call, CUDA-graph
capture and replay, and two streams at once; each result is compared with the two-step computation in
plain PyTorch (float64). GPU only; each runs in a child process under a hard timeout (tests/isolation.py).
"""

from __future__ import annotations

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref

SD3_LATENT = (16, 128, 128)  # 262,144 elements per sample: ~4 chunks per SM on an H100 at batch 4


def _inputs(batch, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    t = [torch.randn((batch, *SD3_LATENT), generator=g, device=device, dtype=torch.bfloat16) for _ in range(5)]
    s = torch.rand(batch, generator=g, device=device) * 0.9 + 0.05
    st = torch.rand(batch, generator=g, device=device) * 0.9 + 0.05
    return t, s, st


def _dm(mod, t, s, st, reduction="none"):
    return mod.dm_loss(*t, s, st, reduction=reduction)


def _want(t, s, st, reduction="none"):
    return ref.dm_loss(*[x.double() for x in t], s.double(), st.double(), reduction=reduction)


@pytest.mark.gpu(timeout_s=120)
def test_gpu_one_launch_forward_equals_the_reference_call_after_call():
    dev = torch.device("cuda")
    with ck.use_backend("triton"):
        for call in range(40):  # fresh values every call: a stale partial would show as a wrong loss
            t, s, st = _inputs(4, call, dev)
            got = _dm(ck, t, s, st)
            torch.testing.assert_close(got.double(), _want(t, s, st), rtol=2e-4, atol=1e-6)
            pred, x0 = t[0], t[1]
            fm = ck.flow_matching_loss(pred, x0, seed=call, reduction="none")
            noise = ck.renoise(torch.zeros_like(pred), 1.0, seed=call)
            fm_want = ref.flow_matching_loss(pred.double(), x0.double(), noise.double(), reduction="none")
            torch.testing.assert_close(fm.double(), fm_want, rtol=2e-4, atol=1e-6)
    from cdm_kernels.ops.utils import ticket_counter

    assert ticket_counter(dev, cached=True).item() == 0  # the eager path's counter, reset by every launch


@pytest.mark.gpu(timeout_s=120)
def test_gpu_one_launch_forward_in_a_cuda_graph_replays_with_new_inputs():
    dev = torch.device("cuda")
    t, s, st = _inputs(4, 0, dev)
    static = [x.clone() for x in t]
    with ck.use_backend("triton"):
        _dm(ck, static, s, st)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _dm(ck, static, s, st)
        for seed in range(1, 6):
            fresh, _, _ = _inputs(4, seed, dev)
            for dst, src in zip(static, fresh):
                dst.copy_(src)
            graph.replay()
            torch.testing.assert_close(out.double(), _want(fresh, s, st), rtol=2e-4, atol=1e-6)
            eager = _dm(ck, fresh, s, st)  # eager calls between replays share nothing with the graph
            torch.testing.assert_close(eager, out, rtol=0, atol=0)


@pytest.mark.gpu(timeout_s=120)
def test_gpu_one_launch_forwards_on_two_streams_at_once():
    dev = torch.device("cuda")
    a_in, b_in = _inputs(4, 1, dev), _inputs(2, 2, dev)
    want_a, want_b = _want(*a_in), _want(*b_in)
    side = torch.cuda.Stream(dev)
    main = torch.cuda.current_stream(dev)
    with ck.use_backend("triton"):
        for _ in range(20):
            side.wait_stream(main)
            with torch.cuda.stream(side):
                b = _dm(ck, *b_in)
            a = _dm(ck, *a_in)
            main.wait_stream(side)
            torch.testing.assert_close(a.double(), want_a, rtol=2e-4, atol=1e-6)
            torch.testing.assert_close(b.double(), want_b, rtol=2e-4, atol=1e-6)


@pytest.mark.gpu(timeout_s=300)
def test_gpu_losses_under_torch_compile_with_cuda_graph_trees():
    # mode="reduce-overhead": inductor's warm-up runs inside the CUDA-graph memory pool, then records and replays.
    # The custom op (what compiled code calls) takes a fresh counter per call, never the eager path's cached one
    # (a long-lived tensor allocated in that pool would trip the tree's memory checks, or be overwritten).
    dev = torch.device("cuda")

    def losses(t, s, st):
        return (ck.dm_loss(*t, s, st, reduction="none"),
                ck.flow_matching_loss(t[0], t[1], seed=7, reduction="none"))

    compiled = torch.compile(losses, mode="reduce-overhead", fullgraph=True)
    with ck.use_backend("triton"):
        for seed in range(5):  # warm-up, recording, then replays with fresh inputs
            t, s, st = _inputs(4, seed, dev)
            dm, fm = compiled(t, s, st)
            torch.testing.assert_close(dm.double(), _want(t, s, st), rtol=2e-4, atol=1e-6)
            noise = ck.renoise(torch.zeros_like(t[0]), 1.0, seed=7)
            fm_want = ref.flow_matching_loss(t[0].double(), t[1].double(), noise.double(), reduction="none")
            torch.testing.assert_close(fm.double(), fm_want, rtol=2e-4, atol=1e-6)
