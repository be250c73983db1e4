"""CUDA graphs, two-stream overlap, regional compile, GPU monitor (cdm_kernels.graphs, cdm_train.graphs/monitor).

CPU: the fallbacks give the plain results, the capture bookkeeping (simulated graphs) and
the shape-keyed cache behave, and a tiny-preset iteration with every new switch on equals
the one with them off. GPU-marked: real capture and replay, concurrent replay on two
streams, replays after an optimizer step, rollout graphs per batch size.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import pytest
import torch

import cdm_train.accelerations as accelerations_mod
from cdm_kernels.graphs import (
    CaptureInConcurrentRegionError,
    GraphedForward,
    ShapeKeyedCache,
    compile_blocks,
    find_blocks,
    flatten,
    in_concurrent_region,
    input_key,
    is_compiled,
    run_concurrently,
    run_overlapped,
    unflatten,
)
from cdm_train import graphs as train_graphs
from cdm_train import trainer as trainer_mod
from cdm_train.graphs import GraphedAdapter, graph_stats
from cdm_train.monitor import GpuMonitor

from .helpers import one_iteration, tiny_config

# The GPU machines have no diffusers unless its wheel is carried: the tests that build SD3 models skip
# there instead of erroring; the pure graph/stream tests still run.
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="needs diffusers (carry its wheel to the GPU machine)")

# compile_blocks with the eager backend: dynamo traces every network's blocks (inductor's CPU compile is tested in
# test_accelerations.py).
NEW_SWITCHES = ["speed.cuda_graphs_teacher=true", "speed.overlap_teacher_calls=true", "speed.compile_blocks=true",
                "speed.compile_backend=eager",
                "speed.rollout_graphs=true"]
FIXED = "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]"


def _key(*args, **kwargs):
    return input_key(*flatten((args, kwargs)))


# --------------------------------------------------------------------------------------------- pure logic
def test_flatten_roundtrip_and_signature():
    obj = ((torch.ones(2), {"a": torch.zeros(3, 1), "b": [1.5, None]}), {"k": torch.ones(1)})
    leaves, structure = flatten(obj)
    assert len(leaves) == 5
    back = unflatten(structure, leaves)
    assert back[0][1]["b"] == [1.5, None] and back[1]["k"] is leaves[-1]
    x, c = torch.randn(4, 2), {"e": torch.randn(4, 3)}
    assert _key(x, c) == _key(torch.zeros(4, 2), {"e": torch.ones(4, 3)})  # values do not matter
    assert _key(x, c) != _key(torch.zeros(3, 2), {"e": torch.ones(3, 3)})  # batch size does
    assert _key(x, c) != _key(x.double(), c)  # dtype does
    assert _key(x, c) != _key(x, {"f": c["e"]})  # structure does
    assert _key(x, c, scale=1.0) != _key(x, c, scale=2.0)  # plain values are baked into a graph


def test_shape_keyed_cache_is_lru():
    cache = ShapeKeyedCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"] and cache.evictions == 1
    assert cache.get("b") is None and cache.misses == 1 and cache.hits == 1
    with pytest.raises(ValueError):
        ShapeKeyedCache(0)


def test_graphed_forward_falls_back_to_eager_on_cpu():
    lin = torch.nn.Linear(3, 2)
    g = GraphedForward(lambda x, c: lin(x) + c["b"], name="lin")
    x, c = torch.randn(4, 3), {"b": torch.randn(4, 2)}
    with torch.no_grad():
        torch.testing.assert_close(g(x, c), lin(x) + c["b"], rtol=0, atol=0)
    assert g.stats.eager_reasons == {"not on CUDA": 1} and g.num_graphs == 0
    out = g(x, c)  # gradient enabled: always eager, and autograd works through it
    out.sum().backward()
    assert lin.weight.grad is not None
    assert "gradient enabled (graphs hold no-grad forwards only)" in g.stats.eager_reasons


def test_simulated_capture_uses_static_buffers_one_graph_per_shape():
    lin = torch.nn.Linear(3, 2)
    calls = []

    def fn(x, c):
        calls.append(x.data_ptr())
        return lin(x) * c["s"][:, None]

    g = GraphedForward(fn, simulate=True)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    with torch.no_grad():
        results = []
        for b in (4, 4, 2, 4):
            x, c = torch.randn(b, 3), {"s": torch.rand(b)}
            out = g(x, c)
            torch.testing.assert_close(out, lin(x) * c["s"][:, None], rtol=0, atol=0)
            results.append(out)
    assert g.stats.captures == 2 and g.num_graphs == 2 and g.stats.replays == 4
    assert len(set(calls)) == 2  # the forward only ever reads the two static input buffers
    first = results[0].clone()
    with torch.no_grad():
        g(torch.randn(4, 3), {"s": torch.rand(4)})
    torch.testing.assert_close(results[0], first, rtol=0, atol=0)  # outputs are copies, not the static buffers
    # Parameters are read live: an optimizer step (in place) is seen by the next replay. The same
    # inputs before and after the step, so a replay that returned its previous outputs, or a
    # capture that had copied the weights, would give the pre-step output and fail here.
    x, c = torch.randn(4, 3), {"s": torch.rand(4)}
    with torch.no_grad():
        before = g(x, c)
    lin(torch.randn(1, 3)).sum().backward()
    opt.step()
    with torch.no_grad():
        after = g(x, c)
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(after, lin(x) * c["s"][:, None], rtol=0, atol=0)
    assert g.stats.captures == 2  # no recapture was needed to see the new weights


def test_capture_failure_is_logged_once_then_eager(caplog):
    class Failing(GraphedForward):
        def _capture(self, leaves, structure):
            raise RuntimeError("operation not permitted when stream is capturing")

    g = Failing(lambda x: x * 2, name="failing", simulate=True)
    with caplog.at_level(logging.WARNING, logger="cdm_kernels.graphs"), torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(g(torch.ones(2)), torch.full((2,), 2.0))
    warnings = [r for r in caplog.records if "capture of failing failed" in r.getMessage()]
    assert len(warnings) == 1 and "not permitted" in warnings[0].getMessage()
    assert g.stats.eager_calls == 3 and g.stats.eager_reasons == {"capture failed earlier": 2}
    g.reset()
    assert g.stats.failed is None


def test_run_concurrently_falls_back_to_sequential_on_cpu():
    order = []
    x = torch.randn(5)

    def main():
        order.append("main")
        return x * 2

    def side():
        order.append("side")
        return {"y": x + 1}

    a, b = run_concurrently(main, side, device=x.device)
    assert order == ["side", "main"]
    torch.testing.assert_close(a, x * 2)
    torch.testing.assert_close(b["y"], x + 1)
    assert run_concurrently(lambda: 1, lambda: 2, device=None) == (1, 2)


def test_run_concurrently_refuses_a_capture_and_replays_after_prepare():
    # A first capture inside the concurrent region is what can hang the GPU (docs/graphs.md): it must be
    # refused before anything is captured, on every device (simulated graphs stand in for CUDA graphs here).
    lin_a, lin_b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    g_a, g_b = GraphedForward(lin_a, name="a", simulate=True), GraphedForward(lin_b, name="b", simulate=True)
    x4, x2 = torch.randn(4, 3), torch.randn(2, 3)
    seen = []

    def side():
        seen.append(in_concurrent_region())
        return g_b(x2)

    with torch.no_grad():
        with pytest.raises(CaptureInConcurrentRegionError, match="'b'.*prepare"):
            run_concurrently(lambda: g_a(x4), side, device=x4.device)
        assert g_b.stats.captures == 0 and g_b.num_graphs == 0 and seen == [True]
        assert not in_concurrent_region()  # the region ends with the exception
        assert g_a.prepare(x4) and g_b.prepare(x2)
        assert not g_a.prepare(x4) and not g_a.would_capture(torch.zeros(4, 3)) and g_a.would_capture(x2)
        for _ in range(3):
            a, b = run_concurrently(lambda: g_a(x4), side, device=x4.device)
        torch.testing.assert_close(a, lin_a(x4), rtol=0, atol=0)
        torch.testing.assert_close(b, lin_b(x2), rtol=0, atol=0)
        # a new shape inside the region: refused again (the main callable this time), nothing captured
        with pytest.raises(CaptureInConcurrentRegionError, match="'a'"):
            run_concurrently(lambda: g_a(x2), side, device=x4.device)
    assert g_a.stats.captures == g_b.stats.captures == 1 and g_a.stats.replays == 4  # prepare's call + 3


def test_run_overlapped_captures_outside_the_region_then_overlaps(monkeypatch):
    lin_a, lin_b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    regions = []

    class Recording(GraphedForward):
        def _capture(self, leaves, structure):
            regions.append(in_concurrent_region())
            return super()._capture(leaves, structure)

    g_a, g_b = Recording(lin_a, name="a", simulate=True), Recording(lin_b, name="b", simulate=True)
    x4, x2 = torch.randn(4, 3), torch.randn(2, 3)
    with torch.no_grad():
        for _ in range(3):
            a, b = run_overlapped(lambda: g_a(x4), lambda: g_b(x2), device=x4.device)
            torch.testing.assert_close(a, lin_a(x4), rtol=0, atol=0)
            torch.testing.assert_close(b, lin_b(x2), rtol=0, atol=0)
    assert regions == [False, False]  # both captures happened outside any concurrent region
    assert g_a.stats.captures == g_b.stats.captures == 1


def test_graphed_adapter_routes_only_no_grad_calls():
    class Base:
        def __call__(self, model, x, sigma, cond):
            return model(x) + sigma[:, None]

        def uncond(self, cond):
            return cond * 0

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    routed = []
    wrapper = GraphedAdapter(Base())
    wrapper.route(a, lambda x, s, c: routed.append(1) or a(x) + s[:, None])
    x, s = torch.randn(3, 2), torch.rand(3)
    with torch.no_grad():
        wrapper(a, x, s, None)
        wrapper(b, x, s, None)
    wrapper(a, x, s, None)  # with gradient: the base adapter
    assert routed == [1]
    assert torch.equal(wrapper.uncond(torch.ones(2)), torch.zeros(2))


@needs_diffusers
def test_regional_compile_finds_and_compiles_blocks(tmp_path):
    from cdm_train.models.build import build_models

    cfg = tiny_config(tmp_path)
    models = build_models(cfg, torch.device("cpu"))
    blocks = find_blocks(models.student)
    assert len(blocks) == 2  # tiny preset: 2 SD3 joint blocks
    keys = list(models.student.state_dict())
    assert compile_blocks(models.student, backend="eager") == 2
    assert all(is_compiled(b) for b in blocks) and list(models.student.state_dict()) == keys
    assert compile_blocks(torch.nn.Linear(2, 2)) == 0


def test_monitor_is_silently_off_without_gpu_or_library(monkeypatch, tmp_path):
    assert GpuMonitor("cpu").read() == {} and GpuMonitor(None).read() == {}
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mon = GpuMonitor("cuda:0")
    assert not mon.enabled and mon.read() == {}
    mon.close()


@needs_diffusers
def test_trainer_log_has_no_gpu_fields_on_cpu(tmp_path):
    tr = trainer_mod.Trainer(tiny_config(tmp_path, "speed.rollout_graphs=true", "train.steps=1",
                                         "schedule.max_steps=2"))
    summary = tr.train()
    assert not tr.monitor.enabled
    assert summary["steps"] == 1 and not any(k.startswith("gpu_") for k in summary["last"])


# --------------------------------------------------------------------------------------------- trainer equivalence
def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    for name in ("ca", "dm", "cdm", "total"):
        torch.testing.assert_close(getattr(a["losses"], name), getattr(b["losses"], name), rtol=rtol, atol=atol)
    torch.testing.assert_close(a["fake"], b["fake"], rtol=rtol, atol=atol)
    for key in ("student_grads", "fake_grads"):
        for ga, gb in zip(a[key], b[key]):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


_BASE: dict = {}


def _base_iteration(tmp_path):
    # The all-switches-off baseline, computed once per session (the output directory plays no part).
    if "base" not in _BASE:
        _BASE["base"] = one_iteration(tiny_config(tmp_path, FIXED, "train.batch_size=5"))
    return _BASE["base"]


@needs_diffusers
def test_new_switches_change_nothing_on_cpu(tmp_path):
    # On the CPU every switch takes its fallback path (eager adapters, sequential streams, no compile).
    base = _base_iteration(tmp_path)
    fast = one_iteration(tiny_config(tmp_path, FIXED, "train.batch_size=5", *NEW_SWITCHES))
    assert base["losses"].total > 0 and base["losses"].cdm > 0
    _assert_same(base, fast)


@needs_diffusers
def test_new_switches_change_nothing_with_simulated_graphs_and_compile(tmp_path, monkeypatch):
    # The orchestration of the GPU path on the CPU: simulated graphs (static buffers, one per shape,
    # including the shrinking rollout batch) and dynamo-traced student blocks (eager backend).
    installed = []

    def apply(cfg, models, **_):
        installed.append(models)
        return train_graphs.apply_graph_switches(cfg, models, compile_backend="eager", simulate=True)

    monkeypatch.setattr(accelerations_mod, "apply_graph_switches", apply)
    base = _base_iteration(tmp_path)
    fast = one_iteration(tiny_config(tmp_path, FIXED, "train.batch_size=5", *NEW_SWITCHES))
    _assert_same(base, fast, rtol=1e-5, atol=1e-6)
    stats = graph_stats(installed[-1])
    assert stats["real teacher"]["replays"] >= 1 and stats["fake teacher (no grad)"]["replays"] >= 1
    # batch 5 with early exit: the rollout batch shrinks, one graph per distinct size
    assert stats["student rollout"]["graphs"] == len(set(stats_sizes(fast["rollout"]))) > 1
    assert all(is_compiled(b) for b in find_blocks(installed[-1].student))


def test_rollout_compile_mode_forward_matches_eager():
    # rollout_graph_mode=compile: one static-shape compiled graph per batch size (eager backend on the CPU).
    lin = torch.nn.Linear(3, 3)
    fn = lambda x, s, c: lin(x) * s[:, None] + c
    compiled = train_graphs.CompiledForward(fn, backend="eager")
    plain = train_graphs.CompiledForward(fn)  # no backend forced: eager on the CPU, never compiled
    with torch.no_grad():
        for b in (4, 3, 4, 1):
            x, s, c = torch.randn(b, 3), torch.rand(b), torch.randn(b, 3)
            torch.testing.assert_close(compiled(x, s, c), fn(x, s, c), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(plain(x, s, c), fn(x, s, c), rtol=0, atol=0)
    assert compiled._compiled is not None and plain._compiled is None


def stats_sizes(ro):
    from cdm_train.rollout import last_step_needed

    need = [last_step_needed(i, ro.num_steps) for i in ro.indices]
    return [sum(1 for s in need if s >= k) for k in range(max(need) + 1)]


# --------------------------------------------------------------------------------------------- GPU
def _tiny_sd3(device, seed=0):
    from cdm_train.models.sd3 import TINY_ARCH
    from cdm_train.models.sd3 import sd3_from_arch as _sd3_from_arch

    return _sd3_from_arch(TINY_ARCH, seed).to(device)


def _sd3_inputs(batch, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).to(device)
    s = torch.rand(batch, generator=g).to(device)
    cond = {"encoder_hidden_states": torch.randn(batch, 6, 16, generator=g).to(device),
            "pooled_projections": torch.randn(batch, 8, generator=g).to(device)}
    return x, s, cond


def _sd3_call(model):
    from cdm_train.models.sd3 import SD3Adapter

    adapter = SD3Adapter({"encoder_hidden_states": torch.zeros(1, 6, 16), "pooled_projections": torch.zeros(1, 8)})
    return functools.partial(adapter, model)


@needs_diffusers
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_gpu_capture_replay_equals_eager(autocast):
    dev = torch.device("cuda")
    model = _tiny_sd3(dev).eval()
    call = _sd3_call(model)
    g = GraphedForward(call, name="t")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for batch, seed in ((4, 0), (4, 1), (2, 2), (4, 3)):
            x, s, c = _sd3_inputs(batch, dev, seed)
            torch.testing.assert_close(g(x, s, c), call(x, s, c), rtol=0, atol=0)
    assert g.stats.captures == 2 and g.stats.replays == 4 and g.stats.failed is None


@needs_diffusers
@pytest.mark.gpu
def test_gpu_replay_after_optimizer_step_sees_new_weights():
    # Trainable fp32 weights under bf16 autocast: the autocast weight cache must not be baked in.
    # The graph is captured and replayed inside one long autocast region whose weight cache holds
    # bf16 copies made before the optimizer steps (the training forward fills it, and the cache
    # ignores in-place updates). The eager reference therefore runs with cache_enabled=False: it
    # casts the live fp32 weights, as the graph's cast kernels do on every replay; a reference
    # that used the cache would see stale weights and differ from a correct replay.
    dev = torch.device("cuda")
    model = _tiny_sd3(dev).train()
    call = _sd3_call(model)
    g = GraphedForward(call, name="fake")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    x, s, c = _sd3_inputs(3, dev)

    def reference():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return call(x, s, c)

    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            before = g(x, s, c)
        torch.testing.assert_close(before, reference(), rtol=0, atol=0)
        previous = before
        for _ in range(2):
            call(x, s, c).float().square().mean().backward()  # a training step inside the same autocast region
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                after = g(x, s, c)
            torch.testing.assert_close(after, reference(), rtol=0, atol=0)
            assert (after.float() - previous.float()).abs().max() > 1e-3  # the step changed the output
            previous = after
    assert g.stats.captures == 1 and g.stats.replays == 3


def _two_graphed_teachers(dev):
    """Real and fake tiny SD3 teachers as (uncaptured) graphed forwards, their inputs (batch 8 and 4) and their eager
    outputs."""
    real, fake = _tiny_sd3(dev, 0).eval(), _tiny_sd3(dev, 1).eval()
    g_real, g_fake = GraphedForward(_sd3_call(real), name="real"), GraphedForward(_sd3_call(fake), name="fake")
    real_in, fake_in = _sd3_inputs(8, dev, 0), _sd3_inputs(4, dev, 1)
    with torch.no_grad():
        expected = (_sd3_call(real)(*real_in), _sd3_call(fake)(*fake_in))
    return g_real, g_fake, real_in, fake_in, expected


@needs_diffusers
@pytest.mark.gpu(timeout_s=90)
def test_gpu_concurrent_replay_on_two_streams_equals_sequential():
    dev = torch.device("cuda")
    g_real, g_fake, (x4, s4, c4), (x2, s2, c2), expected = _two_graphed_teachers(dev)
    with torch.no_grad():
        # The hang on the H200 came with first captures inside run_concurrently: now refused, so capture first.
        with pytest.raises(CaptureInConcurrentRegionError):
            run_concurrently(lambda: g_real(x4, s4, c4), lambda: g_fake(x2, s2, c2), device=dev)
        assert g_real.prepare(x4, s4, c4) and g_fake.prepare(x2, s2, c2)
        for _ in range(3):
            a, b = run_concurrently(lambda: g_real(x4, s4, c4), lambda: g_fake(x2, s2, c2), device=dev)
            # use the results on the main stream right away (no host sync in between)
            total = a.sum() + b.sum()
    torch.testing.assert_close(a, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(b, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(total, expected[0].sum() + expected[1].sum())
    # Concurrent replays must not share a memory pool: compare the pool ids by value (two handles
    # naming the same pool would be distinct tuple objects, so an identity check could not fail).
    assert g_real.pool is not None and tuple(g_real.pool) != tuple(g_fake.pool)
    assert g_real.stats.captures == g_fake.stats.captures == 1
    assert g_real.stats.replays == g_fake.stats.replays == 4  # prepare's call + 3 concurrent


@needs_diffusers
@pytest.mark.gpu(timeout_s=90)
def test_gpu_run_overlapped_first_call_captures_sequentially():
    dev = torch.device("cuda")
    g_real, g_fake, (x4, s4, c4), (x2, s2, c2), expected = _two_graphed_teachers(dev)
    with torch.no_grad():
        for _ in range(3):
            a, b = run_overlapped(lambda: g_real(x4, s4, c4), lambda: g_fake(x2, s2, c2), device=dev)
    torch.testing.assert_close(a, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(b, expected[1], rtol=0, atol=0)
    assert g_real.stats.captures == g_fake.stats.captures == 1


@needs_diffusers
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["capture", "compile"])
def test_gpu_rollout_graphs_per_batch_size(tmp_path, mode):
    from cdm_train.rollout import rollout

    cfg = tiny_config(tmp_path, "train.device=cuda", "speed.rollout_graphs=true", f"speed.rollout_graph_mode={mode}")
    tr = trainer_mod.Trainer(cfg)
    m = tr.models
    base = m.adapter.base
    indices = [3, 3, 2, 1, 0, 0]
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    cond = m.sample_cond(6, torch.Generator().manual_seed(0))
    noise = torch.randn(6, *m.latent_shape, device="cuda")
    eager = rollout(m.student, base, cond, noise, sigmas, indices, early_exit=True)
    for _ in range(2):
        graphed = rollout(m.student, m.adapter, cond, noise, sigmas, indices, early_exit=True)
    tol = dict(rtol=0, atol=0) if mode == "capture" else dict(rtol=1e-4, atol=1e-5)
    for name in ("x_i", "v_i", "x0_i"):
        torch.testing.assert_close(getattr(graphed, name), getattr(eager, name), **tol)
    if mode == "capture":
        stats = graph_stats(m)["student rollout"]
        assert stats["graphs"] == len(set(stats_sizes(eager))) and stats["failed"] is None


@needs_diffusers
@pytest.mark.gpu
def test_gpu_iteration_with_graphs_and_overlap_equals_eager(tmp_path):
    sw = ["train.device=cuda", "train.precision=fp32", FIXED, "train.batch_size=5"]
    base = one_iteration(tiny_config(tmp_path, *sw))
    fast = one_iteration(tiny_config(tmp_path, *sw, "speed.cuda_graphs_teacher=true",
                                     "speed.overlap_teacher_calls=true", "speed.rollout_graphs=true"))
    _assert_same(base, fast, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_monitor_reads_when_available():
    pytest.importorskip("pynvml")
    mon = GpuMonitor("cuda")
    torch.ones(1024, 1024, device="cuda").matmul(torch.ones(1024, 1024, device="cuda"))
    rec = mon.read()
    assert mon.enabled and {"gpu_util_pct", "gpu_mem_used_gib", "gpu_power_w"} <= set(rec)
    assert rec["gpu_mem_used_gib"] > 0
