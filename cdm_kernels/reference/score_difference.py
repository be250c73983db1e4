"""The weighted score-difference losses of CDM: DM and CFG-augmentation (CA).

Both are the same computation in x0 space (reference twin of ops/score_difference.py):

    x0_s  = xt - sigma * student_v                       (carries the gradient)
    x0_a  = xt_teacher - sigma_teacher * teacher_a_v      (real teacher / cond teacher)
    x0_b  = xt_teacher - sigma_teacher * teacher_b_v      (fake teacher / uncond teacher)
    norm  = max(mean|x0_a - x0_s| + 1e-8, norm_clip_min)   per sample
    shift = scale * (x0_a - x0_b) / norm                   per sample, zero if non-finite
    loss  = mean((x0_s - sg(x0_s + shift))^2)              over non-batch dims, then batch

so d loss / d student_v = 2 * sigma * shift / numel. DM uses scale 1 with the real and
fake teachers; CA uses scale = guidance_scale with the cond and uncond teacher.

Non-finite teacher values: if a sample's normaliser or any of its shift elements is
not finite, that sample's shift is zero (nan_to_num of a NaN-normalised shift), so no
NaN/Inf reaches the loss or the gradient. A non-finite *student* value is not hidden:
it makes the loss non-finite and the trainer skips that step.
"""

from __future__ import annotations

import torch

from ._common import compute_dtype, per_sample_mean, reduce_per_sample, sigma_view

NORM_EPS = 1e-8


def weighted_score_difference(student_v, teacher_a_v, teacher_b_v, xt, xt_teacher, sigma, sigma_teacher,
                              *, scale: float, norm_clip_min: float = 0.1,
                              reduction: str = "mean") -> torch.Tensor:
    cd = compute_dtype(student_v, teacher_a_v, teacher_b_v, xt, xt_teacher)
    s = sigma_view(sigma, xt, cd)
    st = sigma_view(sigma_teacher, xt, cd)
    x0_student = xt.to(cd) - s * student_v.to(cd)
    with torch.no_grad():
        x0_a = xt_teacher.detach().to(cd) - st * teacher_a_v.detach().to(cd)
        x0_b = xt_teacher.detach().to(cd) - st * teacher_b_v.detach().to(cd)
        norm = per_sample_mean((x0_a - x0_student.detach()).abs()) + NORM_EPS
        norm = torch.clamp_min(norm, norm_clip_min)
        norm = norm.reshape((-1,) + (1,) * (xt.dim() - 1))
        shift = scale * (x0_a - x0_b) / norm
        finite = torch.isfinite(shift).flatten(1).all(dim=1) if shift.dim() > 1 else torch.isfinite(shift)
        finite = finite & torch.isfinite(norm.reshape(-1))
        shift = torch.where(finite.reshape(norm.shape), shift, torch.zeros_like(shift))
        target = x0_student.detach() + shift
    per_sample = per_sample_mean((x0_student - target) ** 2)
    return reduce_per_sample(per_sample, reduction)


def dm_loss(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher, *, norm_clip_min: float = 0.1,
            reduction: str = "mean") -> torch.Tensor:
    """Distribution-matching loss: shift = x0_real - x0_fake, normalised by mean|x0_real - x0_s|."""
    return weighted_score_difference(student_v, real_v, fake_v, xt, xt_teacher, sigma, sigma_teacher,
                                     scale=1.0, norm_clip_min=norm_clip_min, reduction=reduction)


def cfg_loss(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher, *, guidance_scale: float,
             norm_clip_min: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """CFG augmentation: shift = guidance_scale * (x0_cond - x0_uncond), normalised by mean|x0_cond - x0_s|."""
    return weighted_score_difference(student_v, cond_v, uncond_v, xt, xt_teacher, sigma, sigma_teacher,
                                     scale=float(guidance_scale), norm_clip_min=norm_clip_min,
                                     reduction=reduction)
