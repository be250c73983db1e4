"""What a user gets when optional pieces are missing: no C++ extension, no FP8 tensor cores."""

from __future__ import annotations

import logging
import subprocess
import sys

import torch

NO_EXTENSION = r"""
import sys
sys.modules["cdm_kernels._C"] = None  # `import cdm_kernels._C` now raises ImportError: as if never built
import torch, cdm_kernels as ck
from cdm_kernels import reference as ref
assert "cpp" not in ck.available_backends("dm_loss"), ck.available_backends("dm_loss")
g = torch.Generator().manual_seed(0)
t = [torch.randn(3, 4, 5, generator=g) for _ in range(5)]
s, st = torch.rand(3, generator=g), torch.rand(3, generator=g)
with ck.use_backend("auto"):  # CPU without the extension: the reference serves
    got = ck.dm_loss(*t, s, st)
want = ref.dm_loss(*t, s, st)
assert torch.equal(got, want), (got, want)
try:
    with ck.use_backend("cpp"):
        ck.dm_loss(*t, s, st)
except (RuntimeError, ValueError) as exc:
    assert "cpp" in str(exc), exc
else:
    raise AssertionError("forcing the missing cpp backend did not raise")
print("ok")
"""


def test_without_the_cpp_extension_auto_falls_back_to_reference():
    proc = subprocess.run([sys.executable, "-c", NO_EXTENSION], capture_output=True, text=True, timeout=300,
                          env={"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_fp8_attention_on_a_gpu_without_fp8_tensor_cores_takes_int8_and_says_so(monkeypatch, caplog):
    """sm_80 (A100): the path resolves to the INT8-QK kernel (SDPA for head dims it lacks), logged once;
    no CUDA needed to check the decision."""
    import importlib

    fa = importlib.import_module("cdm_kernels.attention.fp8_attention")  # the module, not the same-named function
    dispatch = importlib.import_module("cdm_kernels.attention.dispatch")  # where the path is decided
    common = importlib.import_module("cdm_kernels.attention._common")

    monkeypatch.setattr(dispatch, "interpret", lambda: False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(common, "_logged", set())

    class FakeCudaTensor:
        device = torch.device("cuda", 0)
        dtype = torch.bfloat16
        shape = (1, 1, 128, 64)

    class FakeCudaTensorD32(FakeCudaTensor):
        shape = (1, 1, 128, 32)

    with caplog.at_level(logging.INFO, logger="cdm_kernels"):
        assert fa._resolve_path(FakeCudaTensor(), "auto") == "int8"
        assert fa._resolve_path(FakeCudaTensor(), "auto") == "int8"
        assert fa._resolve_path(FakeCudaTensorD32(), "auto") == "sdpa"  # the INT8 kernel has D 64 / 128 only
    lines = [r.getMessage() for r in caplog.records if "no FP8 tensor cores" in r.getMessage()]
    assert len(lines) == 1 and "INT8-QK" in lines[0] and "A100" in lines[0] and "sm_80" in lines[0]
    assert any("SDPA" in r.getMessage() and "head dim 32" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fa._resolve_path(FakeCudaTensor(), "auto") == "triton"
