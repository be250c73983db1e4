"""GPU readiness checked on the CPU: clean errors instead of raw Triton ones, 32-bit offset limits,
launch geometry of the loss reductions, and the compile-ahead check itself (in a subprocess: it needs
the real JIT, and the suite runs under TRITON_INTERPRET=1)."""

import os
import subprocess
import sys

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels._checks import MAX_SAMPLE_NUMEL
from cdm_kernels.attention.fp8_attention import check_triton_path_device


def test_fp8_triton_path_on_sm80_names_the_path_to_use(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"path='triton'.*sm_80.*path='auto'"):
        check_triton_path_device(cuda, (8, 0))
    with pytest.raises(ValueError, match="sm_86"):
        check_triton_path_device(cuda, (8, 6))
    check_triton_path_device(cuda, (8, 9))  # Ada and Hopper have FP8 tensor cores
    check_triton_path_device(cuda, (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="sm_80"):
        check_triton_path_device(cuda)
    check_triton_path_device(torch.device("cpu"), (8, 0))  # no GPU involved: nothing to refuse


def test_a_sample_beyond_32_bit_offsets_is_refused_naming_the_argument():
    # A stride-0 expansion: 2**31 elements per sample without allocating them.
    big = torch.zeros(1).expand(2, MAX_SAMPLE_NUMEL + 1)
    ok = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"^x: one sample holds 2147483648 elements"):
        ck.euler_extrapolate(big, big, 0.5, 0.2)
    with pytest.raises(ValueError, match=r"^student_v: one sample"):
        ck.dm_loss(big, big, big, big, big, 0.5, 0.3)
    ck.euler_extrapolate(ok, ok, 0.5, 0.2)  # ordinary sizes pass


def test_reduction_launch_geometry_fills_the_gpu():
    from cdm_kernels.ops.utils import reduce_programs

    for sms in (108, 132):  # A100, H100/H200
        for batch, sample in ((16, 16 * 128 * 128), (1, 16 * 21 * 60 * 104), (4, 16 * 128 * 128),
                              (16, 4096 * 64)):
            programs = reduce_programs(batch, sample, sms)
            assert programs >= 2 * sms, (batch, sample, sms, programs)
    assert reduce_programs(1, 100, 132) == 1  # a tiny sample is one program, not 264 empty ones


def test_compile_check_compiles_the_kernels_for_a_gpu_without_one(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # --smoke: a handful of settings (the quick sweep runs in `make test`, against two Tritons)
    cmd = [sys.executable, "-m", "cdm_kernels.compile_check", "--smoke", "--arch", "90", "--arch", "80"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary.startswith("compile_check: triton") and summary.endswith(": OK")
    # Kernel names: the ops' _lincomb/_euler_step/_predict_renoise and _forward/_backward (score difference and
    # flow matching share both names since the loss forwards became one launch each, 2026-12-06), the FP8 path's
    # three (K column sums, quantisation, attention) and the INT8-QK path's two.
    assert "10 kernels" in summary and "FP8 launches skipped below sm_89" in summary


def test_compile_check_reports_a_kernel_that_does_not_compile(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # FP8 MMAs do not exist on sm_80: forcing the attention kernels there must fail, kernel by kernel.
    proc = subprocess.run([sys.executable, "-m", "cdm_kernels.compile_check", "--smoke", "--force-fp8", "--arch", "80"],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1
    assert any(ln.startswith("FAIL sm_80 _fp8_attention_fwd_kernel [fp8-attention D=64") for ln in lines)
    assert lines[-1].startswith("compile_check:") and "FAILED" in lines[-1]
    with pytest.raises(subprocess.CalledProcessError) as info:
        subprocess.run([sys.executable, "-m", "cdm_kernels.compile_check"], env={**env, "TRITON_INTERPRET": "1"},
                       capture_output=True, check=True, timeout=300)
    assert info.value.returncode == 2  # the interpreter cannot compile: a usage error, said so


def test_compile_check_quick_mode_reaches_every_kernel_variant_of_the_full_sweep():
    # The quick mode (make test) keeps fewer shapes and, per kernel, only the most and least specialised
    # integer/pointer variants; it must still reach every constexpr and argument-type combination (every
    # finalize tile, reduction, dtype, FP8 head dim and EVEN_N) that the full sweep reaches.
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """
from cdm_kernels import compile_check as cc
groups = {}
for mode in ("quick", "full"):
    launches, errors = cc.collect(mode)
    assert not errors, errors
    cc.plan(launches, [80, 90], extremes_only=mode == "quick")
    groups[mode] = cc.planned_groups()
    print(mode, len(cc._WORK), len(groups[mode]))
missing = sorted(groups["full"] - groups["quick"])
assert not missing, missing[:5]
losses = {m: {g for g in groups[m] if g[1] == "_forward_kernel"} for m in groups}  # loss forwards, finalize inside
print("loss-forward", len(losses["quick"]), len(losses["full"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    quick_compiles, full_compiles = int(counts["quick"][0]), int(counts["full"][0])
    assert quick_compiles < full_compiles / 1.5  # the quick mode is a real reduction...
    # ...that keeps every variant of the loss forwards (the 3.6 crash lived in their finalize, now inside them):
    # at least 3 dtypes x 2 archs, and all of the full sweep's
    quick_losses, full_losses = (int(c) for c in counts["loss-forward"])
    assert quick_losses == full_losses >= 6
