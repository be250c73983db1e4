"""The public ops: validate arguments, pick the backend, run.

Every function here has a twin with the same signature in `cdm_kernels.reference`
(the specification) and accelerated versions registered in `cdm_kernels.backend`.
"""

from __future__ import annotations

import torch

from . import _checks as C
from . import reference as _ref
from .backend import register, resolve

for _name in ("euler_extrapolate", "euler_step", "renoise", "predict_x0_renoise", "dm_loss", "cfg_loss",
              "flow_matching_loss"):
    register("reference", _name, getattr(_ref, _name))


def euler_extrapolate(x: torch.Tensor, v: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
    """x + (sigma_to - sigma_from) * v: move along the velocity v from sigma_from to sigma_to."""
    C.check_tensor("x", x)
    C.check_like("v", v, "x", x)
    sigma_from = C.check_sigma("sigma_from", sigma_from, x)
    sigma_to = C.check_sigma("sigma_to", sigma_to, x)
    return resolve("euler_extrapolate", x.device, x.dtype)(x, v, sigma_from, sigma_to)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_from, sigma_to) -> tuple[torch.Tensor, torch.Tensor]:
    """One rollout step: (x + (sigma_to - sigma_from) v, x - sigma_from v)."""
    C.check_tensor("x", x)
    C.check_like("v", v, "x", x)
    sigma_from = C.check_sigma("sigma_from", sigma_from, x)
    sigma_to = C.check_sigma("sigma_to", sigma_to, x)
    return resolve("euler_step", x.device, x.dtype)(x, v, sigma_from, sigma_to)


def renoise(x0: torch.Tensor, sigma, noise: torch.Tensor | None = None, *, seed: int | None = None,
            offset: int = 0) -> torch.Tensor:
    """(1 - sigma) x0 + sigma noise, with noise given or drawn in-kernel from Philox(seed, offset)."""
    C.check_tensor("x0", x0)
    sigma = C.check_sigma("sigma", sigma, x0)
    C.check_noise_or_seed(noise, seed, offset, "x0", x0)
    return resolve("renoise", x0.device, x0.dtype)(x0, sigma, noise, seed=seed, offset=offset)


def predict_x0_renoise(xt: torch.Tensor, v: torch.Tensor, sigma, sigma_teacher,
                       noise: torch.Tensor | None = None, *, seed: int | None = None,
                       offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, xt_teacher) with x0 = xt - sigma v re-noised to sigma_teacher; no gradient."""
    C.check_tensor("xt", xt)
    C.check_like("v", v, "xt", xt)
    sigma = C.check_sigma("sigma", sigma, xt)
    sigma_teacher = C.check_sigma("sigma_teacher", sigma_teacher, xt)
    C.check_noise_or_seed(noise, seed, offset, "xt", xt)
    return resolve("predict_x0_renoise", xt.device, xt.dtype)(xt, v, sigma, sigma_teacher, noise, seed=seed,
                                                              offset=offset)


def _check_score_difference_args(student_v, a_name, a_v, b_name, b_v, xt, xt_teacher, sigma, sigma_teacher,
                                 norm_clip_min, reduction):
    C.check_tensor("student_v", student_v)
    C.check_like(a_name, a_v, "student_v", student_v)
    C.check_like(b_name, b_v, "student_v", student_v)
    C.check_like("xt", xt, "student_v", student_v)
    C.check_like("xt_teacher", xt_teacher, "student_v", student_v)
    sigma = C.check_sigma("sigma", sigma, student_v)
    sigma_teacher = C.check_sigma("sigma_teacher", sigma_teacher, student_v)
    norm_clip_min = C.check_positive("norm_clip_min", norm_clip_min)
    C.check_reduction(reduction)
    return sigma, sigma_teacher, norm_clip_min


def dm_loss(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher, *, norm_clip_min: float = 0.1,
            reduction: str = "mean") -> torch.Tensor:
    """Distribution-matching loss in x0 space (see cdm_kernels.reference.score_difference)."""
    sigma, sigma_teacher, norm_clip_min = _check_score_difference_args(
        student_v, "real_v", real_v, "fake_v", fake_v, xt, xt_teacher, sigma, sigma_teacher, norm_clip_min,
        reduction)
    fn = resolve("dm_loss", student_v.device, student_v.dtype)
    return fn(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher, norm_clip_min=norm_clip_min,
              reduction=reduction)


def cfg_loss(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher, *, guidance_scale: float,
             norm_clip_min: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """CFG-augmentation loss: target shift guidance_scale * (x0_cond - x0_uncond)."""
    sigma, sigma_teacher, norm_clip_min = _check_score_difference_args(
        student_v, "cond_v", cond_v, "uncond_v", uncond_v, xt, xt_teacher, sigma, sigma_teacher, norm_clip_min,
        reduction)
    guidance_scale = C.check_finite_number("guidance_scale", guidance_scale)
    fn = resolve("cfg_loss", student_v.device, student_v.dtype)
    return fn(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher, guidance_scale=guidance_scale,
              norm_clip_min=norm_clip_min, reduction=reduction)


def flow_matching_loss(pred_v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None = None, *,
                       seed: int | None = None, offset: int = 0, reduction: str = "mean") -> torch.Tensor:
    """mean((pred_v - (noise - x0))^2); with a seed the noise is regenerated, never stored."""
    C.check_tensor("pred_v", pred_v)
    C.check_like("x0", x0, "pred_v", pred_v)
    C.check_noise_or_seed(noise, seed, offset, "x0", x0)
    C.check_reduction(reduction)
    fn = resolve("flow_matching_loss", pred_v.device, pred_v.dtype)
    return fn(pred_v, x0, noise, seed=seed, offset=offset, reduction=reduction)
