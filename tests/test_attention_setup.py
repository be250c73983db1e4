"""The trainer's attention setup (cdm_train/attention_setup.py, issue 24): speed.attention_backend, the reference
mode's untouched diffusers attention, and the 8-bit switches consulting the speed table in attention_8bit=auto
(device facts faked: H100/H200 sm_90, L4 sm_89, A100 sm_80, CPU)."""

from __future__ import annotations

import pytest
import torch

import cdm_kernels
from cdm_kernels.attention import sdpa_backend, speed_table
from cdm_kernels.attention.sdpa_backend import DeviceFacts
from cdm_kernels.attention.speed_table import Measurement, eight_bit_is_faster
from cdm_train import attention_setup
from cdm_train.config import ATTENTION_BACKENDS, ConfigError, make_config, reference_mode

H100 = DeviceFacts("cuda", (9, 0), 91501)


def test_config_key_and_reference_mode():
    assert ATTENTION_BACKENDS == sdpa_backend.BACKENDS
    cfg = make_config()
    assert cfg.speed.attention_backend == "auto"
    assert make_config(overrides=["speed.attention_backend=cudnn"]).speed.attention_backend == "cudnn"
    assert make_config(overrides=["speed.attention_8bit=fp8"]).speed.attention_8bit == "fp8"
    with pytest.raises(ConfigError, match="speed.attention_backend"):
        make_config(overrides=["speed.attention_backend=cuDNN"])
    reference_mode(cfg)
    assert cfg.speed.attention_backend == "sdpa-default"


def test_speed_table():
    faster, why = eight_bit_is_faster((9, 0), 64, "fp8")
    assert not faster and "2026-12-04" in why and "H200" in why and "0.96-1.06x" in why
    faster, why = eight_bit_is_faster((9, 0), 128, "fp8")  # 1.11x at S=32760 but 0.74x at Flux 1024 px
    assert not faster and "0.74-1.11x" in why
    assert eight_bit_is_faster((8, 9), 64, "fp8")[0] is False  # unmeasured: bf16
    assert "not measured" in eight_bit_is_faster((8, 0), 128, "int8")[1]
    assert eight_bit_is_faster(None, 64, "fp8")[0] is False
    with pytest.raises(ValueError, match="kernel"):
        eight_bit_is_faster((9, 0), 64, "int4")
    base = dict(device="d", date="x", comparator="cudnn", source="s")
    assert Measurement(comparator_is_best_bf16=True, speedups={"a": 1.2, "b": 1.01}, **base).faster
    assert not Measurement(comparator_is_best_bf16=True, speedups={"a": 1.2, "b": 0.99}, **base).faster
    assert not Measurement(comparator_is_best_bf16=False, speedups={"a": 1.5}, **base).faster


class _Attn(torch.nn.Module):  # a diffusers attention module as attention_setup sees one
    def __init__(self, head_dim):
        super().__init__()
        self.head_dim, self.processor = head_dim, None
        self.proj = torch.nn.Linear(2, 2)

    def set_processor(self, p):
        self.processor = p


def _models(head_dim=64):
    class Models:
        teacher, fake, student = _Attn(head_dim), _Attn(head_dim), _Attn(head_dim)

    return Models


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_patch(net, mode="fp8_no_grad", backend="sdpa-default"):
        seen.append((net, mode, backend))
        return {"patched": ["attn"], "skipped": []}

    monkeypatch.setattr(cdm_kernels, "patch_attention", fake_patch)
    return seen


def _apply(monkeypatch, facts, *overrides, head_dim=64):
    monkeypatch.setattr(attention_setup, "_facts", lambda net: facts)
    models = _models(head_dim)
    lines = attention_setup.apply_attention(make_config(overrides=list(overrides)), models)
    return models, lines


def test_auto_backend_on_every_network_of_a_gpu(monkeypatch, calls):
    models, lines = _apply(monkeypatch, H100)
    assert sorted((id(n), m, b) for n, m, b in calls) == sorted(
        (id(n), "bf16", "auto") for n in (models.teacher, models.fake, models.student))
    assert [line.split(":")[0] for line in lines] == ["teacher", "fake", "student"]
    assert all("backend=auto" in line for line in lines)


def test_cpu_and_reference_mode_leave_diffusers_attention(monkeypatch, calls):
    _, lines = _apply(monkeypatch, DeviceFacts("cpu"))
    assert calls == [] and all("diffusers' default" in line for line in lines)
    _, lines = _apply(monkeypatch, H100, "speed.attention_backend=sdpa-default")
    assert calls == []


def test_fp8_switch_declines_where_the_table_says_slower(monkeypatch, calls, caplog):
    with caplog.at_level("INFO", logger="cdm_train"):
        models, lines = _apply(monkeypatch, H100, "speed.fp8_attention_teacher=true")
    modes = {id(n): m for n, m, _ in calls}
    assert modes[id(models.teacher)] == "bf16"  # FP8 measured 0.96-1.06x of flash on sm_90 at D=64
    assert "declined" in lines[0] and "H200" in lines[0] and "declined" in caplog.text
    # unmeasured (L4, sm_89) and A100's INT8: declined too
    for facts, head_dim in ((DeviceFacts("cuda", (8, 9), 90100), 64), (DeviceFacts("cuda", (8, 0), 90100), 128)):
        calls.clear()
        models, lines = _apply(monkeypatch, facts, "speed.fp8_attention_teacher=true", head_dim=head_dim)
        assert {id(n): m for n, m, _ in calls}[id(models.teacher)] == "bf16" and "not measured" in lines[0]
    # no 8-bit kernel for the head dim
    calls.clear()
    models, lines = _apply(monkeypatch, H100, "speed.fp8_attention_teacher=true", head_dim=96)
    assert "no 8-bit kernel for head dim 96" in lines[0]


def test_fp8_switch_takes_the_kernel_where_measured_faster_or_asked(monkeypatch, calls):
    won = Measurement(device="test", date="today", comparator="cudnn", comparator_is_best_bf16=True,
                      speedups={"SD3": 1.3}, source="test")
    monkeypatch.setitem(speed_table.MEASURED, ((9, 0), 64, "fp8"), won)
    models, lines = _apply(monkeypatch, H100, "speed.fp8_attention_teacher=true", "speed.fp8_attention_rollout=true")
    modes = {id(n): (m, b) for n, m, b in calls}
    assert modes[id(models.teacher)] == ("fp8_no_grad", "auto") == modes[id(models.student)]
    assert modes[id(models.fake)] == ("bf16", "auto")
    assert calls[-1][1] == "fp8_no_grad"  # 8-bit patches come last
    monkeypatch.delitem(speed_table.MEASURED, ((9, 0), 64, "fp8"))
    calls.clear()
    models, _ = _apply(monkeypatch, H100, "speed.fp8_attention_teacher=true", "speed.attention_8bit=fp8")
    assert {id(n): m for n, m, _ in calls}[id(models.teacher)] == "fp8_no_grad"
    calls.clear()
    models, _ = _apply(monkeypatch, H100, "speed.fp8_attention_teacher=true", "speed.fp8_attention_emulate=true")
    assert {id(n): m for n, m, _ in calls}[id(models.teacher)] == "fp8_emulated_no_grad"


def test_head_dim_of_real_diffusers_models():
    pytest.importorskip("diffusers")
    from tests.test_fp8_attention import _tiny_flux, _tiny_sd3

    assert attention_setup._head_dim(_tiny_sd3()) == 64
    assert attention_setup._head_dim(_tiny_flux(32)) == 32
    assert attention_setup._head_dim(torch.nn.Linear(1, 1)) is None
