"""Capture safety (cdm_kernels.graphs.capture_safety): the checker itself, then the regions the trainer captures.

The checker must fail on each kind of capture-unsafe operation (naming it) and pass clean code. The real
regions are exactly the callables `apply_graph_switches` hands to `GraphedForward` (speed.cuda_graphs_teacher:
real teacher, fake teacher's no-grad scoring; speed.rollout_graphs: the student's rollout forward), run with
the inputs a real training iteration gives them, on the tiny SD3, tiny Flux and digits models.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import cdm_train.accelerations as accelerations_mod
from cdm_kernels.graphs import GraphedForward
from cdm_kernels.graphs.capture_safety import CaptureSafetyError, CaptureSafetyMode, capture_checked, check_capture_safe
from cdm_train import graphs as train_graphs
from cdm_train.config import make_config

from .helpers import one_iteration

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")


# --------------------------------------------------------------------------------------------- the checker
def _planted_item(x):
    scale = x.abs().max().item()  # the planted host sync
    return x / scale


UNSAFE = {  # name -> (callable of x, op the error must name)
    "item": (_planted_item, "Tensor.item"),
    "float": (lambda x: x * float(x.sum()), "Tensor.__float__"),
    "branch on a tensor": (lambda x: x if x.sum() > 0 else -x, "Tensor.__bool__"),
    "tolist": (lambda x: x.tolist(), "Tensor.tolist"),
    "device to host": (lambda x: x.cpu(), "Tensor.cpu"),
    "numpy": (lambda x: x.numpy(), "Tensor.numpy"),
    "nonzero": (lambda x: x.nonzero(), "aten.nonzero"),
    "masked_select": (lambda x: x.masked_select(x > 0), "aten.masked_select"),
    "boolean index": (lambda x: x[x > 0], "aten.index.Tensor"),
    "boolean index assignment": (lambda x: x.clone().index_put_((x > 0,), x.new_zeros(())), "aten.index_put_"),
    "unique": (lambda x: torch.unique(x), "aten._unique2"),
    "repeat_interleave without output_size": (
        lambda x: torch.repeat_interleave(x, torch.ones_like(x, dtype=torch.long)), "aten.repeat_interleave.Tensor"),
    "torch.equal": (lambda x: x * torch.equal(x, x), "aten.equal"),
    "host tensor": (lambda x: x * torch.tensor([2.0, 1.0, 1.0, 1.0]), "torch.tensor"),
    "factory without device": (lambda x: x + torch.zeros(4), "torch.zeros"),
    "torch.cuda.synchronize": (lambda x: (torch.cuda.synchronize(), x)[1], "torch.cuda.synchronize"),
}


@pytest.mark.parametrize("name", list(UNSAFE))
def test_checker_fails_naming_the_op(name):
    fn, op = UNSAFE[name]
    x = torch.randn(4)
    if not op.startswith("torch.cuda"):  # (needs CUDA outside the checker)
        fn(x)  # runs fine outside the checker: the error below comes from the checker alone
    with pytest.raises(CaptureSafetyError) as err:
        check_capture_safe(fn, x)
    assert err.value.op == op
    assert op in str(err.value) and "capture safety" in str(err.value)


def _clean(x, cond):
    # The operations the real regions use: device-side factories, scalars, fixed-shape masks, integer indexing.
    w = torch.linspace(0, 1, x.shape[-1], device=x.device, dtype=x.dtype)
    y = torch.where(x > 0, x * w, 0.0).masked_fill(x.isnan(), 0.0)
    idx = torch.arange(x.shape[0], device=x.device).flip(0)
    y = y[idx] + cond["e"].mean(-1, keepdim=True)
    return torch.repeat_interleave(y, torch.full((x.shape[0],), 2, device=x.device), dim=0,
                                   output_size=2 * x.shape[0]).softmax(-1)


def test_checker_passes_clean_code_and_returns_its_output():
    x, cond = torch.randn(3, 5), {"e": torch.randn(3, 7)}
    out = check_capture_safe(_clean, x, cond)
    torch.testing.assert_close(out, _clean(x, cond), rtol=0, atol=0)


def test_checker_restores_everything_on_exit():
    sync = torch.cuda.synchronize
    with pytest.raises(CaptureSafetyError):
        check_capture_safe(_planted_item, torch.randn(3))
    assert torch.cuda.synchronize is sync
    assert torch.randn(3).abs().max().item() >= 0  # no mode left active
    assert torch.tensor([1.0]).tolist() == [1.0]


def test_allow_lets_one_named_op_through_and_nothing_else():
    x = torch.randn(4)
    torch.testing.assert_close(check_capture_safe(_planted_item, x, allow=["Tensor.item"]), _planted_item(x))
    with pytest.raises(CaptureSafetyError, match="aten.nonzero"):
        check_capture_safe(lambda t: (t.nonzero(), t.sum().item()), x, allow=["Tensor.item"])


def test_cross_device_outputs_fail_when_the_region_device_is_given():
    # The GPU case seen on the CPU: a region declared to run on "meta" that puts a tensor on the host.
    x = torch.randn(4)
    with pytest.raises(CaptureSafetyError, match="puts a tensor on cpu inside a region that runs on meta"):
        with CaptureSafetyMode("meta"):
            x * 2


def test_explicit_cross_device_copies_fail_whatever_their_size():
    # .to(<other device>) on the region's tensors: caught at the copy even for a 0-dim int64 (exempt as an output).
    i = torch.tensor(3, device="meta")
    with pytest.raises(CaptureSafetyError, match="aten._to_copy copies between devices"):
        with CaptureSafetyMode("meta"):
            i.to("cpu")
    dst, host = torch.empty(4, device="meta"), torch.ones(4)  # the host tensor made outside the region
    with pytest.raises(CaptureSafetyError, match="aten.copy_ copies between devices"):
        with CaptureSafetyMode("meta"):
            dst.copy_(host)


def test_capture_checked_wraps_a_graphed_forward_region():
    calls: list[str] = []
    g = GraphedForward(capture_checked(_planted_item, where="planted", calls=calls), simulate=True)
    with torch.no_grad(), pytest.raises(CaptureSafetyError, match="inside planted"):
        g(torch.randn(3))
    assert calls == []
    ok = GraphedForward(capture_checked(lambda x: x * 2, calls=calls), simulate=True)
    with torch.no_grad():
        for _ in range(3):
            ok(torch.randn(3))
    assert ok.stats.captures == 1 and ok.stats.replays == 3 and len(calls) == 4  # capture + 3 replays


# --------------------------------------------------------------------------------------------- the real regions
SWITCHES = ["speed.cuda_graphs_teacher=true", "speed.rollout_graphs=true"]
REGIONS = {"real teacher", "fake teacher (no grad)", "student rollout"}
FP8_EMULATED = ("speed.fp8_attention_teacher=true", "speed.fp8_attention_fake=true",
                "speed.fp8_attention_rollout=true", "speed.fp8_attention_emulate=true")
CASES = {  # id -> (preset, overrides)
    "sd3-tiny": ("tiny", ()),
    # FP8 attention processors on every graph (emulated: the same processor code, the kernel's PyTorch twin)
    "sd3-tiny-fp8-emulated": ("tiny", FP8_EMULATED),
    "flux-tiny": ("flux-tiny", ()),
    "digits": ("digits", ("schedule.fixed=[1.0, 0.75, 0.5]",)),
}


def _checked_iteration(monkeypatch, tmp_path, preset, *overrides, device="cpu"):
    """One training iteration with every graphed region run under the checker; returns checked calls per region.

    On the CPU the graphs are simulated (the same callables on static buffers); on CUDA they are really
    captured, and the checker also fails on any op output off the region's device.
    """
    calls: list[str] = []

    def apply(cfg, models, **_):
        wrapper = train_graphs.apply_graph_switches(cfg, models, simulate=device == "cpu")
        for _model, fn in wrapper._routes:
            assert isinstance(fn, GraphedForward)
            fn.fn = capture_checked(fn.fn, where=f"the {fn.name} graph ({preset})", calls=calls)
        return wrapper

    monkeypatch.setattr(accelerations_mod, "apply_graph_switches", apply)
    base = [f"train.out_dir={tmp_path}", "train.progress=false", "train.tensorboard=false", "train.batch_size=3",
            f"train.device={device}"]
    out = one_iteration(make_config(preset, overrides=base + SWITCHES + list(overrides)))
    assert torch.isfinite(out["losses"].total)
    return {region: sum(1 for c in calls if c.startswith(f"the {region} graph")) for region in REGIONS}


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@needs_diffusers
@pytest.mark.parametrize("case", list(CASES))
def test_graphed_regions_are_capture_safe(monkeypatch, tmp_path, case):
    from cdm_kernels.attention import processors

    preset, overrides = CASES[case]
    fp8 = _count_calls(monkeypatch, processors, "fp8_attention_reference")
    counts = _checked_iteration(monkeypatch, tmp_path, preset, *overrides)
    # Every region really ran under the checker (capture + replays; the rollout once per step and batch size).
    assert all(counts[r] >= 2 for r in REGIONS), counts
    assert (len(fp8) > 0) == (overrides is FP8_EMULATED)  # the FP8 processors ran inside the regions


@needs_diffusers
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["sd3-tiny", "flux-tiny", "digits"])
def test_gpu_graphed_regions_are_capture_safe(monkeypatch, tmp_path, case):
    # Real captures, bf16 autocast, and the cross-device check on (region device = cuda).
    preset, overrides = CASES[case]
    counts = _checked_iteration(monkeypatch, tmp_path, preset, *overrides, device="cuda")
    assert all(counts[r] >= 2 for r in REGIONS), counts


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["auto", "int8"])
def test_gpu_8bit_attention_host_code_is_capture_safe(path):
    # The kernels the fp8_attention_* switches put inside the graphs at head dim 64 (the tiny presets' head dim
    # 8 takes SDPA): the host wrapper and custom op launch nothing unsafe. Warm-up (autotune, JIT) outside.
    from cdm_kernels import fp8_attention

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 3, 77, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        expected = fp8_attention(q, k, v, path=path)
    out = check_capture_safe(fp8_attention, q, k, v, path=path)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@needs_diffusers
def test_a_sync_planted_in_a_real_model_is_caught(monkeypatch, tmp_path):
    # The same harness must fail when the model's forward syncs: plant .item() in the SD3 time embedding.
    from diffusers.models.embeddings import Timesteps

    original = Timesteps.forward

    def forward_with_sync(self, timesteps):
        timesteps.max().item()
        return original(self, timesteps)

    monkeypatch.setattr(Timesteps, "forward", forward_with_sync)
    with pytest.raises(CaptureSafetyError, match=r"Tensor.item .*inside the (real teacher|student rollout) graph"):
        _checked_iteration(monkeypatch, tmp_path, "tiny")
