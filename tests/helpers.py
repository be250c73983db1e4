"""Shared test utilities (imported by test modules, not collected)."""

from __future__ import annotations

import torch

from cdm_train.config import make_config
from cdm_train.rollout import rollout
from cdm_train.steps import fake_teacher_loss, student_losses, training_sigmas
from cdm_train.trainer import Trainer


def tiny_config(tmp_path, *overrides):
    base = [f"train.out_dir={tmp_path}", "train.progress=false", "train.tensorboard=false", "train.log_every=1"]
    return make_config("tiny", overrides=base + list(overrides))


def one_iteration(cfg, step: int = 0):
    """Losses and student gradients of one iteration, computed from scratch (fresh models)."""
    tr = Trainer(cfg)
    m = tr.models
    # At initialisation fake == teacher == student and every DM shift is exactly zero: perturb the
    # fake teacher and the student (deterministically) so the comparison is not trivially 0 == 0.
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for net, scale in ((m.fake, 0.05), (m.student, 0.02)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    d = tr.draws(step)
    rnd, cond = d.rnd, d.cond
    import cdm_kernels as ck

    with ck.use_backend(cfg.speed.backend):
        ro = rollout(m.student, m.adapter, cond, d.noise, d.sigmas, d.indices, early_exit=cfg.speed.early_exit_rollout)
        sg = training_sigmas(cfg, d.uniform, ro.sigma_i)
        fake = fake_teacher_loss(cfg, m.fake, m.adapter, ro, cond, sg, rnd)
        fake.backward()
        fake_grads = [p.grad.detach().clone() for p in m.fake.parameters()]
        for p in m.fake.parameters():
            p.grad = None
        sl = student_losses(cfg, m.student, m.teacher, m.fake, m.adapter, ro, cond, sg, rnd)
        sl.total.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in m.student.parameters()]
    return {"rollout": ro, "fake": fake.detach(), "losses": sl, "student_grads": grads, "fake_grads": fake_grads}
