import json
import os

import pytest
import torch

import cdm_train.trainer as trainer_mod
from cdm_train.checkpoint import load, save_atomic
from cdm_train.cli import main
from cdm_train.trainer import Trainer, TrainingDiverged

from .helpers import tiny_config


def _losses(history):
    return [(r["step"], r["loss_fake"], r.get("loss_student")) for r in history]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a", "train.steps=6", "train.checkpoint_every=3"))
    straight.train()
    first = Trainer(tiny_config(tmp_path / "b", "train.steps=6", "train.checkpoint_every=3"))
    first.train(steps=3)
    resumed = Trainer(tiny_config(tmp_path / "b", "train.steps=6", "train.checkpoint_every=3"))
    resumed.resume()
    assert resumed.step == 3
    resumed.train()
    assert _losses(first.history) + _losses(resumed.history) == _losses(straight.history)
    for p, q in zip(straight.ema.module.parameters(), resumed.ema.module.parameters()):
        assert torch.equal(p, q)
    log_lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log_lines] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_identically(tmp_path, monkeypatch):
    straight = Trainer(tiny_config(tmp_path / "a", "train.steps=5", "train.checkpoint_every=100"))
    straight.train()
    tr = Trainer(tiny_config(tmp_path / "b", "train.steps=5", "train.checkpoint_every=100"))
    original = tr.train_step

    def step_then_interrupt():
        stats = original()
        if tr.step == 1:  # the signal arrives during the 2nd iteration (step index 1)
            tr._on_sigint(None, None)
        return stats

    monkeypatch.setattr(tr, "train_step", step_then_interrupt)
    summary = tr.train()
    assert summary["interrupted"] and summary["steps"] == 2
    assert load(tmp_path / "b")["step"] == 2
    resumed = Trainer(tiny_config(tmp_path / "b", "train.steps=5", "train.checkpoint_every=100"))
    resumed.resume()
    resumed.train()
    assert _losses(tr.history) + _losses(resumed.history) == _losses(straight.history)


def test_atomic_checkpoint_survives_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"step": 1}, path)

    def exploding_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


def test_nonfinite_loss_skips_the_step_and_k_in_a_row_stop(tmp_path, monkeypatch):
    tr = Trainer(tiny_config(tmp_path, "train.steps=6", "train.max_nonfinite=3"))
    real_fake_loss = trainer_mod.fake_teacher_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_fake_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(trainer_mod, "fake_teacher_loss", poisoned)
    before = None
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row"):
        original_step = tr.train_step

        def tracking_step():
            nonlocal before
            if tr.step == 1:
                before = [p.detach().clone() for p in tr.models.fake.parameters()]
            return original_step()

        tr.train_step = tracking_step
        tr.train()
    assert tr.counters["nonfinite_total"] == 3
    assert tr.counters["fake_updates"] == 1
    # Skipped steps leave the fake teacher untouched except for the merge of the (finite) student,
    # which is skipped too: parameters are exactly as after step 1.
    for p, q in zip(before, tr.models.fake.parameters()):
        assert torch.equal(p, q)


def test_tiny_training_lowers_the_fake_teacher_loss(tmp_path):
    """`cdm-train train --preset tiny --steps 20`: the fake teacher's flow-matching loss on a fixed
    held-out batch of the student's samples goes down."""
    import cdm_kernels as ck
    from cdm_train.sampling import sample_euler

    tr = Trainer(tiny_config(tmp_path, "train.steps=20"))
    m = tr.models
    g = torch.Generator().manual_seed(123)
    cond = m.sample_cond(64, g)
    x0 = sample_euler(m.student, m.adapter, cond, torch.randn(64, *m.latent_shape, generator=g), 8)
    sigma = torch.rand(64, generator=g).clamp(0.02, 0.98)

    def heldout_loss():
        with torch.no_grad():
            xt = ck.renoise(x0, sigma, seed=99)
            return float(ck.flow_matching_loss(m.adapter(m.fake, xt, sigma, cond), x0, seed=99))

    before = heldout_loss()
    tr.train()
    after = heldout_loss()
    assert after < 0.99 * before, (before, after)  # deterministic on CPU: 2.120 -> 2.086 when written


def test_cli_train_and_sample(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "4", "--out", str(out), "--no-progress",
                 "--set", "train.tensorboard=false"]) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and all(r["loss_fake"] > 0 for r in records)
    assert load(out)["step"] == 4
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(out), "--steps", "2", "--num", "4", "--out", str(png)]) == 0
    from PIL import Image

    img = Image.open(png)
    assert img.size[0] > 64 and img.size[1] > 32
    assert main(["train", "--preset", "tiny", "--steps", "6", "--out", str(out), "--resume", "--no-progress",
                 "--set", "train.tensorboard=false"]) == 0
    assert load(out)["step"] == 6


def test_cli_resume_uses_the_runs_own_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), "--no-progress",
                 "--set", "train.tensorboard=false", "--set", "optim.student_lr=3e-4"]) == 0
    # Bare `--out DIR --resume` (what the Ctrl-C message suggests): the tiny run, not the digits default.
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    state = load(out)
    assert state["step"] == 3 and state["config"]["model"]["preset"] == "tiny"
    assert state["config"]["optim"]["student_lr"] == 3e-4 and state["config"]["train"]["steps"] == 3
    capsys.readouterr()
    # A different model: a clear config error (exit 2), not a state_dict traceback.
    assert main(["train", "--preset", "digits", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume", "--no-progress"]) == 2


def test_fp8_switches_patch_only_the_no_grad_passes(tmp_path):
    from cdm_kernels.attention import is_patched

    tr = Trainer(tiny_config(tmp_path, "speed.fp8_attention_teacher=true", "speed.fp8_attention_fake=true",
                             "speed.fp8_attention_rollout=true", "speed.fp8_linear_teacher=true",
                             "schedule.max_steps=2", "train.batch_size=2"))
    assert is_patched(tr.models.teacher) and is_patched(tr.models.fake) and is_patched(tr.models.student)
    assert not is_patched(tr.ema.module)  # samples from the EMA keep the stock attention
    tr.step = 1  # a student-step iteration: grad-mode attention must still work (bf16 path)
    stats = tr.train_step()
    assert torch.isfinite(stats["loss_fake"]) and torch.isfinite(stats["loss_student"])
    assert tr.counters["student_updates"] == 1 and tr.counters["fake_updates"] == 1


def test_fp8_emulate_switch_installs_the_reference_twin(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "speed.fp8_attention_teacher=true", "speed.fp8_attention_emulate=true",
                             "schedule.max_steps=2", "train.batch_size=2"))
    modes = {p.mode for p in tr.models.teacher.attn_processors.values()}
    assert modes == {"fp8_emulated_no_grad"}
    assert not any(hasattr(p, "mode") for p in tr.models.student.attn_processors.values())  # switch off: stock
    stats = tr.train_step()
    assert torch.isfinite(stats["loss_fake"])


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_trainer_wiring_merge_ema_and_update_ratio(tmp_path):
    """The real train_step: fake <- d*fake + (1-d)*student after every fake step, EMA <- e*EMA + (1-e)*student
    after every student step, the student step on every update_ratio-th iteration only.

    Learning rates 0 (the trainer's LR setter replaced) make the AdamW steps identities (decoupled weight
    decay is lr*wd = 0), so the expected weights are exact formulas of the weights before the iteration.
    The EMA's decay at student step 1 is the official warm-up value min(2 / 11, ema_decay).
    """
    d, e = 0.9, 0.5
    tr = Trainer(tiny_config(tmp_path, f"optim.fake_merge_decay={d}", f"optim.ema_decay={e}", "optim.update_ratio=2",
                             "schedule.max_steps=2", "train.batch_size=2"))

    def zero_lr(opt, base_lr, warmup, steps_taken):  # the config insists on lr > 0
        for group in opt.param_groups:
            group["lr"] = 0.0

    tr._set_lr = zero_lr
    m = tr.models
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # make fake, student and EMA differ so every formula is non-trivial
        for net in (m.fake, tr.ema.module):
            for p in net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    fake0, student0, ema0 = _params(m.fake), _params(m.student), _params(tr.ema.module)

    tr.train_step()  # step 0: fake step + merge, no student step
    tr.step += 1
    assert tr.counters["fake_updates"] == 1 and tr.counters["student_updates"] == 0
    for f, f0, s0 in zip(m.fake.parameters(), fake0, student0):
        torch.testing.assert_close(f.detach(), d * f0 + (1 - d) * s0, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(_params(tr.ema.module), ema0))  # EMA waits for a student step
    fake1 = _params(m.fake)

    tr.train_step()  # step 1: fake step + merge, then the student step and the EMA
    assert tr.counters["fake_updates"] == 2 and tr.counters["student_updates"] == 1
    for f, f1, s0 in zip(m.fake.parameters(), fake1, student0):
        torch.testing.assert_close(f.detach(), d * f1 + (1 - d) * s0, rtol=1e-6, atol=1e-7)
    e1 = min(2 / 11, e)
    for a, a0, s0 in zip(tr.ema.module.parameters(), ema0, student0):
        torch.testing.assert_close(a.detach(), e1 * a0 + (1 - e1) * s0, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(_params(m.student), student0))  # lr 0: the student is unchanged


def test_early_exit_saving_is_counted(tmp_path):
    on = Trainer(tiny_config(tmp_path / "on", "train.batch_size=4"))
    off = Trainer(tiny_config(tmp_path / "off", "train.batch_size=4", "speed.early_exit_rollout=false"))
    for tr in (on, off):
        for _ in range(3):
            stats = tr.train_step()
            tr.step += 1
    assert off.counters["nfe_saved_early_exit"] == 0
    # Same seeds, same schedules: the saving is exactly the difference in rollout NFE.
    assert on.counters["nfe_saved_early_exit"] == off.counters["nfe_rollout"] - on.counters["nfe_rollout"] > 0
    assert stats["rollout_steps"] >= 1


def test_log_survives_a_skipped_step(tmp_path, monkeypatch):
    """A non-finite (skipped) step is left out of the window's mean; the log stays valid JSON."""
    real = trainer_mod.fake_teacher_loss
    calls = {"n": 0}

    def nan_once(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer_mod, "fake_teacher_loss", nan_once)
    tr = Trainer(tiny_config(tmp_path, "train.log_every=3", "train.steps=3", "train.batch_size=2",
                             "schedule.max_steps=2"))
    tr.train()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    record = json.loads(lines[-1], parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
    assert record["nonfinite_total"] == 1 and record["loss_fake"] is not None and record["loss_fake"] > 0
