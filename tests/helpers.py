"""Shared test utilities (imported by test modules, not collected)."""

from __future__ import annotations

import torch

from cdm_train.config import make_config
from cdm_train.rng import step_random
from cdm_train.rollout import rollout, sample_schedule, sample_trajectory_indices
from cdm_train.steps import draw_sigmas, fake_teacher_loss, student_losses
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
    rnd = step_random(cfg.train.seed, 0, step, tr.device)
    sigmas = sample_schedule(cfg.schedule, rnd.host)
    batch = cfg.train.batch_size
    indices = sample_trajectory_indices(len(sigmas) - 1, batch, rnd.host)
    cond = m.sample_cond(batch, rnd.host)
    noise = torch.randn((batch, *m.latent_shape), generator=rnd.device, device=tr.device)
    import cdm_kernels as ck

    with ck.use_backend(cfg.speed.backend):
        ro = rollout(m.student, m.adapter, cond, noise, sigmas, indices, early_exit=cfg.speed.early_exit_rollout)
        sg = draw_sigmas(cfg, rnd, ro.sigma_i)
        fake = fake_teacher_loss(cfg, m.fake, m.adapter, ro, cond, sg, rnd)
        fake.backward()
        fake_grads = [p.grad.detach().clone() for p in m.fake.parameters()]
        for p in m.fake.parameters():
            p.grad = None
        sl = student_losses(cfg, m.student, m.teacher, m.fake, m.adapter, ro, cond, sg, rnd)
        sl.total.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in m.student.parameters()]
    return {"rollout": ro, "fake": fake.detach(), "losses": sl, "student_grads": grads, "fake_grads": fake_grads}
