"""Drop-in fused losses for training code written against the official CDM implementation.

``compute_dm_loss``, ``compute_cfg_loss`` and ``compute_fake_teacher_diffusion_loss`` compute
the same losses as the official functions through ``cdm_kernels`` (fused Triton kernels on
CUDA, C++ kernels on CPU when built, the reference otherwise; see ``cdm_kernels.use_backend``)
and return ``(loss, info)``. ``patch()`` installs them into an already-imported
``cdm.training.losses`` / ``cdm.training`` package and into any training-script namespaces
you pass (modules or ``globals()`` dicts that did ``from cdm.training.losses import ...``).

Assumptions (the official repository, github byliutao/cdm, was not available when this
module was written; the signatures follow the algorithm of DESIGN.md):

* The student, teachers and fake teacher predict flow-matching *velocities*; x0 predictions
  are ``latents - sigma * pred``. Sigmas are per-sample values in [0, 1] (a float, a ``(B,)``
  tensor or a ``(B, 1, ..., 1)`` tensor), not the model's ``1000 * sigma`` timesteps.
* ``compute_dm_loss(student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas,
  teacher_sigmas)``: the student saw ``latents`` at ``sigmas``; both teachers saw the
  re-noised ``teacher_latents`` at ``teacher_sigmas``. Target shift ``x0_real - x0_fake``.
* ``compute_cfg_loss(student_pred, cond_pred, uncond_pred, latents, teacher_latents, sigmas,
  teacher_sigmas, guidance_scale)``: target shift ``guidance_scale * (x0_cond - x0_uncond)``.
* Both normalise the shift per sample by ``max(mean|x0_teacher - x0_student| + 1e-8, 0.1)``
  (``norm_clip_min``), zero it for samples with non-finite values and return
  ``mean((x0_s - sg(x0_s + shift))^2)``.
* ``compute_fake_teacher_diffusion_loss(fake_pred, x0, noise)``: flow-matching MSE of the fake
  teacher against ``noise - x0`` (``noise`` may be omitted when a ``seed`` is given: the
  noise ``cdm_kernels.renoise(x0, sigma, seed=seed, offset=offset)`` drew is regenerated).
* ``info`` holds detached scalar statistics (``loss``, sigma means); full-size tensors
  (x0 predictions, target) are added only with ``return_tensors=True`` (an extra pass).

``patch()`` compares the parameter names of every function it replaces with these and raises
``TypeError`` on a mismatch (unless ``strict=False``), so a wrong guess fails loudly instead
of silently changing the maths. ``unpatch()`` restores the originals.
"""

from __future__ import annotations

import inspect
import sys
import types

import torch

from .. import api as _api
from ..reference._common import sigma_view

__all__ = ["compute_dm_loss", "compute_cfg_loss", "compute_fake_teacher_diffusion_loss", "patch", "unpatch",
           "DEFAULT_TARGETS"]

DEFAULT_TARGETS = ("cdm.training.losses", "cdm.training")
_FUNCTIONS = ("compute_dm_loss", "compute_cfg_loss", "compute_fake_teacher_diffusion_loss")
_patched: list[tuple[object, str, object]] = []


def _sigma_mean(sigma) -> torch.Tensor:
    if isinstance(sigma, torch.Tensor):
        return sigma.detach().float().mean()
    return torch.tensor(float(sigma))


def _score_info(loss, student_pred, a_pred, b_pred, latents, teacher_latents, sigmas, teacher_sigmas, scale,
                return_tensors, a_name, b_name):
    info = {"loss": loss.detach(), "sigma_mean": _sigma_mean(sigmas),
            "teacher_sigma_mean": _sigma_mean(teacher_sigmas)}
    if return_tensors:
        with torch.no_grad():
            s = sigma_view(sigmas, latents, torch.float32)
            st = sigma_view(teacher_sigmas, latents, torch.float32)
            x0_s = latents.float() - s * student_pred.detach().float()
            x0_a = teacher_latents.float() - st * a_pred.float()
            x0_b = teacher_latents.float() - st * b_pred.float()
            info.update({"x0_student": x0_s, f"x0_{a_name}": x0_a, f"x0_{b_name}": x0_b,
                         "shift_unnormalised": scale * (x0_a - x0_b)})
    return info


def compute_dm_loss(student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas, teacher_sigmas, *,
                    norm_clip_min: float = 0.1, return_tensors: bool = False):
    """Distribution-matching loss; gradient flows into ``student_pred`` (and ``latents`` if it requires it)."""
    loss = _api.dm_loss(student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas, teacher_sigmas,
                        norm_clip_min=norm_clip_min)
    return loss, _score_info(loss, student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas,
                             teacher_sigmas, 1.0, return_tensors, "real", "fake")


def compute_cfg_loss(student_pred, cond_pred, uncond_pred, latents, teacher_latents, sigmas, teacher_sigmas,
                     guidance_scale: float = 7.0, *, norm_clip_min: float = 0.1, return_tensors: bool = False):
    """CFG-augmentation loss with target shift ``guidance_scale * (x0_cond - x0_uncond)``."""
    loss = _api.cfg_loss(student_pred, cond_pred, uncond_pred, latents, teacher_latents, sigmas, teacher_sigmas,
                         guidance_scale=guidance_scale, norm_clip_min=norm_clip_min)
    info = _score_info(loss, student_pred, cond_pred, uncond_pred, latents, teacher_latents, sigmas,
                       teacher_sigmas, float(guidance_scale), return_tensors, "cond", "uncond")
    info["guidance_scale"] = float(guidance_scale)
    return loss, info


def compute_fake_teacher_diffusion_loss(fake_pred, x0, noise=None, *, seed: int | None = None, offset: int = 0,
                                        return_tensors: bool = False):
    """Flow-matching loss of the fake teacher: ``mean((fake_pred - (noise - x0))^2)``."""
    loss = _api.flow_matching_loss(fake_pred, x0, noise, seed=seed, offset=offset)
    info = {"loss": loss.detach()}
    if return_tensors:
        with torch.no_grad():
            from ..reference.renoise import draw_noise

            eps = noise.float() if noise is not None else draw_noise(x0, seed, offset, torch.float32)
            info["target"] = eps - x0.float()
    return loss, info


def _replacement(name):
    return globals()[name]


def _check_compatible(name, original, strict):
    if not strict or not callable(original):
        return
    ours = [p for p in inspect.signature(_replacement(name)).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        theirs = [p for p in inspect.signature(original).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return
    if [p.name for p in theirs] != [p.name for p in ours][: len(theirs)] or len(theirs) < sum(
            1 for p in ours if p.default is inspect.Parameter.empty):
        raise TypeError(f"cdm_official.patch: {name}{inspect.signature(original)} does not match the drop-in "
                        f"{name}{inspect.signature(_replacement(name))}; not patching (pass strict=False to force)")


def patch(*namespaces, strict: bool = True) -> list[str]:
    """Install the fused losses; returns the list of ``target.name`` entries replaced.

    Targets: the already-imported modules of ``DEFAULT_TARGETS`` plus every namespace passed
    (a module, a module name, or a dict such as a training script's ``globals()``). Only names
    that already exist in a target are replaced. Calling it twice is harmless.
    """
    targets = [sys.modules[m] for m in DEFAULT_TARGETS if m in sys.modules]
    for ns in namespaces:
        if isinstance(ns, str):
            if ns not in sys.modules:
                raise ValueError(f"cdm_official.patch: module {ns!r} is not imported")
            ns = sys.modules[ns]
        if not isinstance(ns, (types.ModuleType, dict)):
            raise ValueError(f"cdm_official.patch: expected a module, a module name or a dict, got {type(ns)}")
        targets.append(ns)
    plan = []
    for target in targets:
        is_dict = isinstance(target, dict)
        for name in _FUNCTIONS:
            original = target.get(name) if is_dict else getattr(target, name, None)
            if original is None or original is _replacement(name):
                continue
            _check_compatible(name, original, strict)  # all checks before any change
            plan.append((target, name, original))
    replaced = []
    for target, name, original in plan:
        _patched.append((target, name, original))
        if isinstance(target, dict):
            target[name] = _replacement(name)
            replaced.append(f"{target.get('__name__', '<dict>')}.{name}")
        else:
            setattr(target, name, _replacement(name))
            replaced.append(f"{target.__name__}.{name}")
    return replaced


def unpatch() -> None:
    """Restore every function ``patch()`` replaced (most recent first)."""
    while _patched:
        target, name, original = _patched.pop()
        if isinstance(target, dict):
            target[name] = original
        else:
            setattr(target, name, original)
