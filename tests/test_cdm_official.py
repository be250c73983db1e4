"""The drop-in for official-CDM training code, tested against a stand-in module with the
assumed official signatures (plain PyTorch formulas written independently of cdm_kernels)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels.integrations import cdm_official


def _x0(latents, sigmas, pred):
    s = sigmas.reshape(-1, *([1] * (latents.dim() - 1))) if isinstance(sigmas, torch.Tensor) else sigmas
    return latents - s * pred


def _official_score_loss(student_pred, a_pred, b_pred, latents, teacher_latents, sigmas, teacher_sigmas, scale):
    x0_s = _x0(latents, sigmas, student_pred)
    with torch.no_grad():
        x0_a = _x0(teacher_latents, teacher_sigmas, a_pred)
        x0_b = _x0(teacher_latents, teacher_sigmas, b_pred)
        norm = (x0_a - x0_s).abs().mean(dim=tuple(range(1, x0_s.dim())), keepdim=True) + 1e-8
        shift = torch.nan_to_num(scale * (x0_a - x0_b) / norm.clamp_min(0.1))
        target = x0_s + shift
    return ((x0_s - target) ** 2).mean()


def _make_official_modules():
    """cdm, cdm.training, cdm.training.losses and a training script that imported the losses."""
    losses = types.ModuleType("cdm.training.losses")

    def compute_dm_loss(student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas, teacher_sigmas):
        loss = _official_score_loss(student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas,
                                    teacher_sigmas, 1.0)
        return loss, {"loss": loss.detach()}

    def compute_cfg_loss(student_pred, cond_pred, uncond_pred, latents, teacher_latents, sigmas, teacher_sigmas,
                         guidance_scale=7.0):
        loss = _official_score_loss(student_pred, cond_pred, uncond_pred, latents, teacher_latents, sigmas,
                                    teacher_sigmas, guidance_scale)
        return loss, {"loss": loss.detach()}

    def compute_fake_teacher_diffusion_loss(fake_pred, x0, noise):
        loss = ((fake_pred - (noise - x0)) ** 2).mean()
        return loss, {"loss": loss.detach()}

    for fn in (compute_dm_loss, compute_cfg_loss, compute_fake_teacher_diffusion_loss):
        setattr(losses, fn.__name__, fn)
    training = types.ModuleType("cdm.training")
    training.losses = losses
    training.compute_dm_loss = compute_dm_loss
    cdm = types.ModuleType("cdm")
    cdm.training = training
    script = types.ModuleType("train_cdm_script")
    script.compute_dm_loss = compute_dm_loss
    script.compute_cfg_loss = compute_cfg_loss
    script.compute_fake_teacher_diffusion_loss = compute_fake_teacher_diffusion_loss
    return {"cdm": cdm, "cdm.training": training, "cdm.training.losses": losses, "train_cdm_script": script}


@pytest.fixture
def official(monkeypatch):
    mods = _make_official_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    yield mods
    cdm_official.unpatch()


def _inputs(shape=(3, 4, 6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(shape, generator=g) for _ in range(5)]
    return t, torch.rand(shape[0], generator=g) * 0.9 + 0.05, torch.rand(shape[0], generator=g) * 0.9 + 0.05


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cpp"])
def test_drop_in_losses_match_the_official_formulas(official, backend):
    if backend not in ck.available_backends("dm_loss") and backend != "auto":
        pytest.skip(f"{backend} not available")
    losses = official["cdm.training.losses"]
    (sv, a, b, xt, xtt), s, st = _inputs()
    cases = [
        ("compute_dm_loss", (a, b, xt, xtt, s, st), {}),
        ("compute_cfg_loss", (a, b, xt, xtt, s, st, 4.5), {}),
        ("compute_fake_teacher_diffusion_loss", (a, b), {}),
    ]
    with ck.use_backend(backend):
        for name, rest, kw in cases:
            p1, p2 = sv.clone().requires_grad_(True), sv.clone().requires_grad_(True)
            want, _ = getattr(losses, name)(p1, *rest, **kw)
            got, info = getattr(cdm_official, name)(p2, *rest, **kw)
            want.backward()
            got.backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-9)
            assert info["loss"].dim() == 0 and not info["loss"].requires_grad
            assert all(not isinstance(v, torch.Tensor) or v.dim() == 0 for v in info.values())


def test_non_finite_teacher_behaves_like_nan_to_num(official):
    (sv, a, b, xt, xtt), s, st = _inputs(seed=1)
    a[1, 0, 0, 0] = float("nan")
    want, _ = official["cdm.training.losses"].compute_dm_loss(sv, a, b, xt, xtt, s, st)
    got, _ = cdm_official.compute_dm_loss(sv, a, b, xt, xtt, s, st)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_return_tensors_only_when_asked(official):
    (sv, a, b, xt, xtt), s, st = _inputs()
    _, info = cdm_official.compute_cfg_loss(sv, a, b, xt, xtt, s, st, 3.0)
    assert "x0_student" not in info
    _, info = cdm_official.compute_cfg_loss(sv, a, b, xt, xtt, s, st, 3.0, return_tensors=True)
    assert info["x0_student"].shape == sv.shape and info["shift_unnormalised"].shape == sv.shape
    _, info = cdm_official.compute_fake_teacher_diffusion_loss(a, b, seed=3, return_tensors=True)
    torch.testing.assert_close(info["target"], ck.renoise(torch.zeros_like(b), 1.0, seed=3) - b)


def test_patch_installs_everywhere_and_unpatch_restores(official):
    losses, training, script = official["cdm.training.losses"], official["cdm.training"], official["train_cdm_script"]
    originals = (losses.compute_dm_loss, losses.compute_cfg_loss, script.compute_fake_teacher_diffusion_loss)
    script_globals = {"__name__": "__main__", "compute_dm_loss": originals[0]}
    replaced = cdm_official.patch("train_cdm_script", script_globals)
    assert "cdm.training.losses.compute_dm_loss" in replaced and "cdm.training.compute_dm_loss" in replaced
    assert "train_cdm_script.compute_fake_teacher_diffusion_loss" in replaced and "__main__.compute_dm_loss" in replaced
    assert losses.compute_dm_loss is cdm_official.compute_dm_loss
    assert training.compute_dm_loss is cdm_official.compute_dm_loss
    assert script.compute_cfg_loss is cdm_official.compute_cfg_loss
    assert script_globals["compute_dm_loss"] is cdm_official.compute_dm_loss
    assert cdm_official.patch() == []  # idempotent
    (sv, a, b, xt, xtt), s, st = _inputs()
    loss, info = losses.compute_dm_loss(sv, a, b, xt, xtt, s, st)  # now the fused path
    assert "sigma_mean" in info
    cdm_official.unpatch()
    assert (losses.compute_dm_loss, losses.compute_cfg_loss, script.compute_fake_teacher_diffusion_loss) == originals
    assert script_globals["compute_dm_loss"] is originals[0]


def test_patch_refuses_a_signature_it_does_not_know(official):
    losses = official["cdm.training.losses"]

    def compute_dm_loss(model_pred, target, weighting):  # not the assumed official signature
        raise AssertionError

    losses.compute_dm_loss = compute_dm_loss
    with pytest.raises(TypeError, match="compute_dm_loss"):
        cdm_official.patch()
    assert losses.compute_dm_loss is compute_dm_loss
    cdm_official.unpatch()
    assert "cdm.training.losses.compute_dm_loss" in cdm_official.patch(strict=False)
    with pytest.raises(ValueError, match="not imported"):
        cdm_official.patch("no_such_module_xyz")
