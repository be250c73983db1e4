"""Drop-in fused losses for training code written against the official CDM implementation.

The signatures follow ``cdm/training/losses.py`` of the official code, github.com/byliutao/cdm
(checked at HEAD ``bacc57f``; the file was last changed there in ``dd5087a``, git blob ``2c61909e``, which
the fork github.com/songh11/CDM carries byte for byte). Positional parameter names and order are identical,
and so is every default the official code declares (``compute_fake_teacher_diffusion_loss`` adds
``noise=None`` / ``t_expanded=None``, which the official code has no default for); everything this
module adds is keyword-only and comes after them::

    compute_dm_loss(student_prediction, real_teacher_prediction, fake_teacher_prediction, xt,
                    xt_teacher, student_sigma_expanded, teacher_sigma_expanded,
                    return_per_sample=False, cfg_grad_direction=None, norm_clip_min=0.1,
                    *, statistics=True, return_tensors=False)
    compute_cfg_loss(student_prediction, real_teacher_cond_prediction,
                     real_teacher_uncond_prediction, xt, xt_teacher, student_sigma_expanded,
                     teacher_sigma_expanded, guidance_scale, return_per_sample=False,
                     norm_clip_min=0.1, *, statistics=True, return_tensors=False)
    compute_fake_teacher_diffusion_loss(fake_teacher_prediction, x0, noise=None, t_expanded=None,
                                        *, seed=None, offset=0, statistics=True,
                                        return_tensors=False)

The losses go through ``cdm_kernels.dm_loss`` / ``cfg_loss`` / ``flow_matching_loss`` (fused
Triton kernels on CUDA, C++ kernels on CPU when built, the reference otherwise; see
``cdm_kernels.use_backend``) and equal the official ones: x0 = latents - sigma * v in fp32,
target shift ``x0_real - x0_fake`` (DM) or ``guidance_scale * (x0_cond - x0_uncond)`` (CFG)
divided per sample by ``max(mean|x0_teacher - x0_student| + 1e-8, norm_clip_min)``, loss
``mean((x0_student - sg(x0_student + shift))^2)``; the fake teacher's loss is
``mean((pred - (noise - x0))^2)``. ``return_per_sample=True`` returns the ``(B,)`` losses.

``info`` holds the official *scalar* statistics under the official key names and formulas
(0-d fp32 tensors, detached, computed under ``torch.no_grad`` in fp32):

* CFG: ``cfg_norm_factor_mean``, ``cfg_effect_norm``, ``x0_cond_x0_student_norm``,
  ``x0_student_mean``, ``x0_student_var``, ``student_sigma``, ``teacher_sigma``.
* DM: ``dm_norm_factor_mean``, ``dm_effect_norm``, ``x0_real_x0_fake_norm``,
  ``x0_real_x0_student_norm``, ``x0_student_mean``, ``x0_student_var``, ``student_sigma``,
  ``teacher_sigma``, plus ``dm_cfg_cosine_sim_mean/std/min/max`` when ``cfg_grad_direction``
  is given.
* Fake teacher: ``v_target_norm``, ``fake_teacher_pred_norm``, ``prediction_error``.

Differences from the official functions:

* The full-size tensors ``info["cfg_grad_direction"]`` (``x0_cond - x0_uncond``) and
  ``info["dm_grad_direction"]`` (``x0_real - x0_fake``), and ``info["v_target"]`` for the fake
  teacher, are returned only with ``return_tensors=True``. The official ``train.py`` passes
  ``cfg_info.get("cfg_grad_direction")`` to ``compute_dm_loss``, so its
  ``dm_cfg_cosine_sim_*`` logs appear only with ``patch(return_tensors=True)``.
* ``statistics=False`` skips the extra full-size passes of the statistics: ``info`` then
  holds only ``student_sigma`` and ``teacher_sigma`` (nothing for the fake teacher).
* Non-finite teacher values: a NaN/inf in the first teacher (real / cond) makes the sample's
  normaliser non-finite and both versions zero that sample's shift. In the second teacher
  (fake / uncond) the official ``nan_to_num`` zeroes a NaN *element* of the shift (and maps
  +-inf to +-float max, which overflows the loss to inf), while the fused ops zero the whole
  *sample's* shift, so that sample contributes 0 to the loss and gradient. ``*_effect_norm``
  follows the fused ops. Finite inputs give the same results.
* Gradients flow into ``student_prediction`` and ``xt`` only. The sigmas and ``xt_teacher``
  are constants (the official code would also differentiate the target through
  ``xt_teacher`` and the sigmas if they required grad; the official ``train.py`` never does).
* ``compute_fake_teacher_diffusion_loss`` accepts ``noise=None`` with ``seed=``/``offset=``:
  the noise ``cdm_kernels.renoise(x0, sigma, seed=seed, offset=offset)`` drew is regenerated
  instead of stored. ``t_expanded`` is accepted and unused, as in the official code.
* Sigmas may also be a float, a 0-d or a ``(B,)`` tensor besides ``(B, 1, ..., 1)``.

``patch()`` installs these into an already-imported ``cdm.training.losses`` / ``cdm.training``
and into any training-script namespaces passed (modules or ``globals()`` dicts that did
``from cdm.training.losses import ...``). It compares the positional parameter names (and
the defaults the originals declare) of every function it replaces with these and raises
``TypeError`` on a mismatch (unless ``strict=False``). With nothing to patch it warns (``strict=True``:
raises) instead of returning an empty list silently. ``unpatch()`` restores the originals.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings

import torch

from .. import api as _api
from ..reference._common import per_sample_mean, sigma_view

__all__ = ["compute_dm_loss", "compute_cfg_loss", "compute_fake_teacher_diffusion_loss", "patch", "unpatch",
           "DEFAULT_TARGETS"]

DEFAULT_TARGETS = ("cdm.training.losses", "cdm.training")
_FUNCTIONS = ("compute_dm_loss", "compute_cfg_loss", "compute_fake_teacher_diffusion_loss")
_NORM_EPS = 1e-8
_patched: list[tuple[object, str, object]] = []


def _sigma_mean(sigma, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(sigma, torch.Tensor):
        return sigma.detach().float().flatten().mean()
    return torch.tensor(float(sigma), dtype=torch.float32, device=ref.device)


def _reduction(return_per_sample) -> str:
    return "none" if return_per_sample else "mean"


def _score_info(prefix, student, a, b, xt, xt_teacher, sigma, sigma_teacher, scale, norm_clip_min,
                statistics, return_tensors, cfg_grad_direction=None):
    """The official statistics of compute_dm_loss (prefix 'dm') / compute_cfg_loss (prefix 'cfg')."""
    info = {}
    if not statistics and not return_tensors:
        info["student_sigma"] = _sigma_mean(sigma, xt)
        info["teacher_sigma"] = _sigma_mean(sigma_teacher, xt)
        return info
    f32 = torch.float32
    with torch.no_grad():
        s = sigma_view(sigma, xt, f32)
        st = sigma_view(sigma_teacher, xt, f32)
        xtt = xt_teacher.detach().float()
        x0_a = xtt - st * a.detach().float()
        direction = x0_a - (xtt - st * b.detach().float())  # x0_a - x0_b, unscaled
        if statistics:
            x0_s = xt.detach().float() - s * student.detach().float()
            teacher_gap = per_sample_mean((x0_a - x0_s).abs())
            norm = (teacher_gap + _NORM_EPS).clamp(min=norm_clip_min)
            direction_abs = per_sample_mean(direction.abs())
            effect = abs(float(scale)) * direction_abs / norm
            effect = torch.where(torch.isfinite(effect), effect, torch.zeros_like(effect))  # as the fused ops
            info[f"{prefix}_norm_factor_mean"] = norm.mean()
            info[f"{prefix}_effect_norm"] = effect.mean()
            if prefix == "cfg":
                info["x0_cond_x0_student_norm"] = teacher_gap.mean()
            else:
                info["x0_real_x0_fake_norm"] = direction_abs.mean()
                info["x0_real_x0_student_norm"] = teacher_gap.mean()
            info["x0_student_mean"] = x0_s.mean()
            info["x0_student_var"] = x0_s.var()
        info["student_sigma"] = _sigma_mean(sigma, xt)
        info["teacher_sigma"] = _sigma_mean(sigma_teacher, xt)
        if return_tensors:
            info[f"{prefix}_grad_direction"] = direction
        if statistics and cfg_grad_direction is not None:
            batch = direction.shape[0]
            cos = torch.nn.functional.cosine_similarity(
                direction.reshape(batch, -1), cfg_grad_direction.detach().float().reshape(batch, -1), dim=1)
            info["dm_cfg_cosine_sim_mean"] = cos.mean()
            info["dm_cfg_cosine_sim_std"] = cos.std()
            info["dm_cfg_cosine_sim_min"] = cos.min()
            info["dm_cfg_cosine_sim_max"] = cos.max()
    return info


def compute_dm_loss(student_prediction, real_teacher_prediction, fake_teacher_prediction, xt, xt_teacher,
                    student_sigma_expanded, teacher_sigma_expanded, return_per_sample=False,
                    cfg_grad_direction=None, norm_clip_min=0.1, *, statistics: bool = True,
                    return_tensors: bool = False):
    """Distribution-matching loss (shift ``x0_real - x0_fake``); returns ``(loss, info)``.

    Gradient flows into ``student_prediction`` (and ``xt`` if it requires it).
    """
    loss = _api.dm_loss(student_prediction, real_teacher_prediction, fake_teacher_prediction, xt, xt_teacher,
                        student_sigma_expanded, teacher_sigma_expanded, norm_clip_min=norm_clip_min,
                        reduction=_reduction(return_per_sample))
    info = _score_info("dm", student_prediction, real_teacher_prediction, fake_teacher_prediction, xt, xt_teacher,
                       student_sigma_expanded, teacher_sigma_expanded, 1.0, norm_clip_min, statistics,
                       return_tensors, cfg_grad_direction)
    return loss, info


def compute_cfg_loss(student_prediction, real_teacher_cond_prediction, real_teacher_uncond_prediction, xt,
                     xt_teacher, student_sigma_expanded, teacher_sigma_expanded, guidance_scale,
                     return_per_sample=False, norm_clip_min=0.1, *, statistics: bool = True,
                     return_tensors: bool = False):
    """CFG-augmentation loss (shift ``guidance_scale * (x0_cond - x0_uncond)``); returns ``(loss, info)``."""
    loss = _api.cfg_loss(student_prediction, real_teacher_cond_prediction, real_teacher_uncond_prediction, xt,
                         xt_teacher, student_sigma_expanded, teacher_sigma_expanded, guidance_scale=guidance_scale,
                         norm_clip_min=norm_clip_min, reduction=_reduction(return_per_sample))
    info = _score_info("cfg", student_prediction, real_teacher_cond_prediction, real_teacher_uncond_prediction, xt,
                       xt_teacher, student_sigma_expanded, teacher_sigma_expanded, guidance_scale, norm_clip_min,
                       statistics, return_tensors)
    return loss, info


def compute_fake_teacher_diffusion_loss(fake_teacher_prediction, x0, noise=None, t_expanded=None, *,
                                        seed: int | None = None, offset: int = 0, statistics: bool = True,
                                        return_tensors: bool = False):
    """Flow-matching loss of the fake teacher, ``mean((pred - (noise - x0))^2)``; returns ``(loss, info)``.

    ``t_expanded`` is unused (as in the official code). Without ``noise``, pass the ``seed``
    (and ``offset``) that ``cdm_kernels.renoise`` drew it with.
    """
    del t_expanded
    loss = _api.flow_matching_loss(fake_teacher_prediction, x0, noise, seed=seed, offset=offset)
    info = {}
    if statistics or return_tensors:
        with torch.no_grad():
            if noise is not None:
                eps = noise.detach().float()
            else:  # renoise at sigma = 1 is exactly the seeded noise, drawn by the fused backend
                eps = _api.renoise(torch.zeros(x0.shape, dtype=torch.float32, device=x0.device), 1.0,
                                   seed=seed, offset=offset)
            v_target = eps - x0.detach().float()
            if statistics:
                pred = fake_teacher_prediction.detach().float()
                info["v_target_norm"] = v_target.abs().mean()
                info["fake_teacher_pred_norm"] = pred.abs().mean()
                info["prediction_error"] = (pred - v_target).abs().mean()
            if return_tensors:
                info["v_target"] = v_target
    return loss, info


def _replacement(name):
    return globals()[name]


def _positional(fn):
    return [p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_compatible(name, original, strict):
    if not strict or not callable(original):
        return
    ours = _positional(_replacement(name))
    try:
        theirs = _positional(original)
    except (TypeError, ValueError):
        return
    empty = inspect.Parameter.empty
    problem = None
    if [p.name for p in theirs] != [p.name for p in ours][: len(theirs)]:
        problem = "positional parameter names differ"
    elif len(theirs) < sum(1 for p in ours if p.default is empty):
        problem = "too few positional parameters"
    else:
        for mine, other in zip(ours, theirs):
            if other.default is not empty and (mine.default is empty or mine.default != other.default):
                problem = f"default of {other.name!r} differs ({other.default!r} vs {mine.default!r})"
                break
    if problem:
        raise TypeError(f"cdm_official.patch: {name}{inspect.signature(original)} does not match the drop-in "
                        f"{name}{inspect.signature(_replacement(name))}: {problem}; not patching "
                        f"(pass strict=False to force)")


def _configured(name, statistics, return_tensors):
    """The drop-in itself, or a wrapper with other defaults for the keyword-only options."""
    fn = _replacement(name)
    if statistics and not return_tensors:
        return fn
    defaults = {"statistics": bool(statistics), "return_tensors": bool(return_tensors)}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **{**defaults, **kwargs})

    wrapper._cdm_official_options = defaults
    return wrapper


def _is_ours(fn, name) -> bool:
    return fn is _replacement(name) or hasattr(fn, "_cdm_official_options")


def patch(*namespaces, strict: bool | None = None, statistics: bool = True, return_tensors: bool = False
          ) -> list[str]:
    """Install the fused losses; returns the list of ``target.name`` entries replaced.

    Targets: the already-imported modules of ``DEFAULT_TARGETS`` plus every namespace passed
    (a module, a module name, or a dict such as a training script's ``globals()``). Only names
    that already exist in a target are replaced. ``statistics`` / ``return_tensors`` set the
    defaults of those keyword-only options for the installed functions (callers that do not
    pass them, such as the official ``train.py``). Calling it twice is harmless.

    Nothing to patch (the official modules not imported yet, no namespace holding the losses): a
    ``RuntimeWarning``, or with ``strict=True`` a ``RuntimeError``, because an empty list is easily
    mistaken for success. ``strict`` (default None): signatures are checked unless ``strict=False``.
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
    options = {"statistics": bool(statistics), "return_tensors": bool(return_tensors)}
    plan = []
    found = False  # any target holding any of the losses (ours or the originals)
    for target in targets:
        is_dict = isinstance(target, dict)
        for name in _FUNCTIONS:
            original = target.get(name) if is_dict else getattr(target, name, None)
            if original is None:
                continue
            found = True
            if _is_ours(original, name):
                if getattr(original, "_cdm_official_options", None) == options or (
                        original is _replacement(name) and statistics and not return_tensors):
                    continue  # already installed with these options
            else:
                _check_compatible(name, original, strict is not False)  # all checks before any change
            plan.append((target, name, original))
    if not found:
        message = (f"cdm_official.patch: nothing to patch: none of {', '.join(DEFAULT_TARGETS)} is imported and no "
                   f"namespace passed holds {', '.join(_FUNCTIONS)}; the official losses are NOT replaced. Import "
                   f"the official modules first, or pass the training script's module or globals()")
        if strict:
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return []
    replaced = []
    installed = {name: _configured(name, statistics, return_tensors) for name in _FUNCTIONS}
    for target, name, original in plan:
        _patched.append((target, name, original))
        if isinstance(target, dict):
            target[name] = installed[name]
            replaced.append(f"{target.get('__name__', '<dict>')}.{name}")
        else:
            setattr(target, name, installed[name])
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
