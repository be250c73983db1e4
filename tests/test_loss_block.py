"""The student step's loss block (CA + DM + CDM after the model forwards) as one compiled region (issue 25).

CPU: the region compiles as ONE graph (fullgraph, no break) holding the three fused losses, launches exactly
the kernels the eager block launches, and gives the same losses and gradients; the eager reference block
dispatches far more ops than the fused block launches kernels. The trainer switch changes nothing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cdm_kernels as ck
from cdm_kernels.ops.utils import record_launches
from cdm_train import steps

from .helpers import one_iteration, tiny_config

KW = dict(guidance_scale=7.0, norm_clip_min=0.1, ca_weight=1.0, dm_weight=0.5, cdm_weight=0.25)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _inputs(seed=0, shape=(3, 4, 6, 5)):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(shape, generator=g)  # noqa: E731
    s = lambda: torch.rand(shape[0], generator=g) * 0.9 + 0.05  # noqa: E731
    v = r().requires_grad_(True)  # the shared CA/DM student forward
    v_p = r().requires_grad_(True)  # the student at the off-trajectory point
    x_i, x_p = r(), r()
    s_i, s_p = s(), s()
    args = (v, r(), r(), x_i, r(), s_i, s(), v, r(), r(), r(), s(), v_p, r(), r(), x_p, r(), s_p, s())
    return args, (v, v_p)


def _run(block, args, leaves):
    ca, dm, cdm, total = block(*args, **KW)
    total.backward()
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return torch.stack([ca, dm, cdm, total]).detach(), grads


def test_loss_block_is_one_compiled_region_with_the_same_launches_losses_and_gradients():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    args, leaves = _inputs()
    compiled = torch.compile(steps.loss_block, backend=counting, fullgraph=True, dynamic=False)
    with ck.use_backend("triton"):
        with record_launches() as eager_log:
            eager_losses, eager_grads = _run(steps.loss_block, args, leaves)
        with record_launches() as compiled_log:
            losses, grads = _run(compiled, args, leaves)
    assert len(graphs) == 1  # one region: no graph break, no recompile
    fused_calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "score_difference" in str(n.target)]
    assert len(fused_calls) == 3  # CA, DM and CDM inside the region
    # 3 losses x one forward launch (partials finalized by the last program), one student-gradient pass each
    assert sorted(compiled_log) == sorted(eager_log) and len(eager_log) == 6
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=0)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)
    # Against the eager reference block (plain PyTorch): same values; many more ops than fused launches.
    with ck.use_backend("reference"), _CountOps() as ops:
        ref_losses, ref_grads = _run(steps.loss_block, [a.double() if torch.is_tensor(a) and not a.requires_grad
                                                        else a for a in args], leaves)
    torch.testing.assert_close(losses.double(), ref_losses.double(), rtol=1e-4, atol=1e-7)
    assert ops.count > 5 * len(eager_log)


def test_loss_block_without_cdm_term():
    args, leaves = _inputs(seed=1)
    args = list(args)
    args[12] = None  # v_p: no CDM term
    with ck.use_backend("triton"):
        ca, dm, cdm, total = steps.loss_block(*args, **KW)
    assert cdm.item() == 0.0
    torch.testing.assert_close(total, KW["ca_weight"] * ca + KW["dm_weight"] * dm)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
def test_compile_loss_block_switch_changes_nothing(tmp_path, monkeypatch):
    # The CPU normally runs the block eagerly; force a compile backend so the switch's region runs here.
    monkeypatch.setitem(steps.LOSS_BLOCK_BACKENDS, "cpu", "aot_eager")
    monkeypatch.setattr(steps, "_COMPILED_BLOCKS", {})
    fixed = "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]"
    base = one_iteration(tiny_config(tmp_path, fixed, "train.batch_size=3"))
    fast = one_iteration(tiny_config(tmp_path, fixed, "train.batch_size=3", "speed.compile_loss_block=true"))
    assert steps._COMPILED_BLOCKS  # the region was really used
    for name in ("ca", "dm", "cdm", "total"):
        torch.testing.assert_close(getattr(fast["losses"], name), getattr(base["losses"], name), rtol=1e-5, atol=1e-7)
    for ga, gb in zip(fast["student_grads"], base["student_grads"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
