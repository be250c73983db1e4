"""Each exact saving produces the same losses and gradients as with its switch off (same seeds)."""

import pytest
import torch

from .helpers import one_iteration, tiny_config

FIXED = "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]"
OFF = ["speed.shared_student_forward=false", "speed.early_exit_rollout=false", "speed.batched_teacher_calls=false",
       "speed.backend=reference"]


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    for name in ("ca", "dm", "cdm", "total"):
        torch.testing.assert_close(getattr(a["losses"], name), getattr(b["losses"], name), rtol=rtol, atol=atol)
    torch.testing.assert_close(a["fake"], b["fake"], rtol=rtol, atol=atol)
    for ga, gb in zip(a["student_grads"], b["student_grads"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
    for ga, gb in zip(a["fake_grads"], b["fake_grads"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("switch", ["shared_student_forward", "early_exit_rollout", "batched_teacher_calls"])
def test_switch_changes_nothing(tmp_path, switch):
    on = [o for o in OFF if switch not in o]
    base = one_iteration(tiny_config(tmp_path, FIXED, "train.batch_size=6", *OFF))
    fast = one_iteration(tiny_config(tmp_path, FIXED, "train.batch_size=6", *on))
    assert base["losses"].total > 0 and base["losses"].cdm > 0  # a real, non-trivial comparison
    assert any(g.abs().sum() > 0 for g in base["student_grads"])
    _assert_same(base, fast)
    if switch == "shared_student_forward":
        assert fast["losses"].student_nfe == base["losses"].student_nfe - 6
    if switch == "early_exit_rollout":
        assert fast["rollout"].nfe < base["rollout"].nfe


def test_all_switches_together_on_the_dynamic_schedule(tmp_path):
    # Several steps so that several schedule lengths and index patterns are exercised.
    for step in (0, 1, 2):
        base = one_iteration(tiny_config(tmp_path, "train.batch_size=5", *OFF), step=step)
        fast = one_iteration(tiny_config(tmp_path, "train.batch_size=5"), step=step)
        assert fast["rollout"].nfe <= base["rollout"].nfe
        _assert_same(base, fast)
