"""The drop-in for the official CDM training code (byliutao/cdm cdm/training/losses.py, checked at HEAD bacc57f;
last changed in dd5087a, byte-identical in the fork songh11/CDM).

The tests build a stand-in ``cdm.training.losses`` whose functions have the official
signatures and compute loss and ``info`` as the official code documents them, written here
in plain PyTorch, independently of cdm_kernels. The drop-in must agree with it on every
available backend, and ``patch()`` must install into it.
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels.backend import resolve
from cdm_kernels.integrations import cdm_official

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["auto", "reference", "triton", "cpp"]
SCORE_KEYS = {"x0_student_mean", "x0_student_var", "student_sigma", "teacher_sigma"}
CFG_KEYS = SCORE_KEYS | {"cfg_norm_factor_mean", "cfg_effect_norm", "x0_cond_x0_student_norm"}
DM_KEYS = SCORE_KEYS | {"dm_norm_factor_mean", "dm_effect_norm", "x0_real_x0_fake_norm", "x0_real_x0_student_norm"}
COS_KEYS = {f"dm_cfg_cosine_sim_{k}" for k in ("mean", "std", "min", "max")}
FAKE_KEYS = {"v_target_norm", "fake_teacher_pred_norm", "prediction_error"}


# ---------------------------------------------------------------------------------------------
# Stand-in for the official module (official signatures; plain PyTorch).
# ---------------------------------------------------------------------------------------------

def _flat(t):
    return t.reshape(t.shape[0], -1)


def _official_parts(v_student, v_a, v_b, xt, xt_teacher, s, s_t, scale, clip):
    """x0 of student and teachers in fp32, and the element-wise nan_to_num'ed, normalised shift."""
    x0_student = xt.float() - s.float() * v_student.float()
    x0_a = xt_teacher.float() - s_t.float() * v_a.detach().float()
    x0_b = xt_teacher.float() - s_t.float() * v_b.detach().float()
    gap = _flat(x0_a - x0_student.detach()).abs().mean(1) + 1e-8
    norm = torch.clamp(gap, min=clip).reshape(-1, *([1] * (xt.dim() - 1)))
    shift = torch.nan_to_num(scale * (x0_a - x0_b) / norm)
    return x0_student, x0_a, x0_b, norm, shift


def _official_per_sample(x0_student, shift, return_per_sample):
    target = x0_student.detach() + shift
    per_sample = _flat((x0_student - target) ** 2).mean(1)
    return per_sample if return_per_sample else per_sample.mean()


def official_compute_cfg_loss(student_prediction, real_teacher_cond_prediction, real_teacher_uncond_prediction,
                              xt, xt_teacher, student_sigma_expanded, teacher_sigma_expanded, guidance_scale,
                              return_per_sample=False, norm_clip_min=0.1):
    x0_s, x0_c, x0_u, norm, shift = _official_parts(
        student_prediction, real_teacher_cond_prediction, real_teacher_uncond_prediction, xt, xt_teacher,
        student_sigma_expanded, teacher_sigma_expanded, guidance_scale, norm_clip_min)
    loss = _official_per_sample(x0_s, shift, return_per_sample)
    x0_s_d = x0_s.detach()
    info = {
        "cfg_norm_factor_mean": norm.mean(),
        "cfg_effect_norm": shift.abs().mean(),
        "x0_cond_x0_student_norm": (x0_c - x0_s_d).abs().mean(),
        "x0_student_mean": x0_s_d.mean(),
        "x0_student_var": x0_s_d.var(),
        "student_sigma": student_sigma_expanded.flatten().mean(),
        "teacher_sigma": teacher_sigma_expanded.flatten().mean(),
        "cfg_grad_direction": (x0_c - x0_u).detach(),
    }
    return loss, {k: v.detach() for k, v in info.items()}


def official_compute_dm_loss(student_prediction, real_teacher_prediction, fake_teacher_prediction, xt, xt_teacher,
                             student_sigma_expanded, teacher_sigma_expanded, return_per_sample=False,
                             cfg_grad_direction=None, norm_clip_min=0.1):
    x0_s, x0_r, x0_f, norm, shift = _official_parts(
        student_prediction, real_teacher_prediction, fake_teacher_prediction, xt, xt_teacher,
        student_sigma_expanded, teacher_sigma_expanded, 1.0, norm_clip_min)
    loss = _official_per_sample(x0_s, shift, return_per_sample)
    x0_s_d = x0_s.detach()
    direction = (x0_r - x0_f).detach()
    info = {
        "dm_norm_factor_mean": norm.mean(),
        "dm_effect_norm": shift.abs().mean(),
        "x0_real_x0_fake_norm": direction.abs().mean(),
        "x0_real_x0_student_norm": (x0_r - x0_s_d).abs().mean(),
        "x0_student_mean": x0_s_d.mean(),
        "x0_student_var": x0_s_d.var(),
        "student_sigma": student_sigma_expanded.flatten().mean(),
        "teacher_sigma": teacher_sigma_expanded.flatten().mean(),
        "dm_grad_direction": direction,
    }
    if cfg_grad_direction is not None:
        a, b = _flat(direction), _flat(cfg_grad_direction)
        cos = (a * b).sum(1) / (a.norm(dim=1).clamp_min(1e-8) * b.norm(dim=1).clamp_min(1e-8))
        info.update(dm_cfg_cosine_sim_mean=cos.mean(), dm_cfg_cosine_sim_std=cos.std(),
                    dm_cfg_cosine_sim_min=cos.min(), dm_cfg_cosine_sim_max=cos.max())
    return loss, {k: v.detach() for k, v in info.items()}


def official_compute_fake_teacher_diffusion_loss(fake_teacher_prediction, x0, noise, t_expanded):
    v_target = noise - x0
    loss = ((fake_teacher_prediction.float() - v_target.detach().float()) ** 2).mean()
    info = {"v_target_norm": v_target.abs().mean(),
            "fake_teacher_pred_norm": fake_teacher_prediction.abs().mean(),
            "prediction_error": (fake_teacher_prediction - v_target).abs().mean()}
    return loss, {k: v.detach() for k, v in info.items()}


OFFICIAL = {"compute_dm_loss": official_compute_dm_loss, "compute_cfg_loss": official_compute_cfg_loss,
            "compute_fake_teacher_diffusion_loss": official_compute_fake_teacher_diffusion_loss}


def _make_official_modules():
    """cdm, cdm.training, cdm.training.losses and a training-script module that imported the losses."""
    losses = types.ModuleType("cdm.training.losses")
    training = types.ModuleType("cdm.training")
    script = types.ModuleType("train_cdm_script")
    for name, fn in OFFICIAL.items():
        setattr(losses, name, fn)
        setattr(training, name, fn)
        setattr(script, name, fn)
    training.losses = losses
    cdm = types.ModuleType("cdm")
    cdm.training = training
    return {"cdm": cdm, "cdm.training": training, "cdm.training.losses": losses, "train_cdm_script": script}


@pytest.fixture
def official(monkeypatch):
    mods = _make_official_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    yield mods
    cdm_official.unpatch()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _batch(shape=(3, 4, 6, 5), seed=0, pred_dtype=torch.float32):
    """Keyword arguments as the official train.py builds them (sigmas shaped (B, 1, ..., 1))."""
    g = torch.Generator().manual_seed(seed)
    view = (shape[0],) + (1,) * (len(shape) - 1)
    s = (torch.rand(shape[0], generator=g) * 0.9 + 0.05).reshape(view)
    st = (torch.rand(shape[0], generator=g) * 0.9 + 0.05).reshape(view)
    x0 = torch.randn(shape, generator=g)
    noise, noise_t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    xt = (1 - s) * x0 + s * noise
    xt_teacher = (1 - st) * x0 + st * noise_t
    preds = [(torch.randn(shape, generator=g) + noise - x0).to(pred_dtype) for _ in range(3)]
    out = {"student": preds[0], "a": preds[1], "b": preds[2], "xt": xt, "xt_teacher": xt_teacher, "s": s,
           "st": st, "x0": x0, "noise": noise}
    return {k: v.to(DEVICE) for k, v in out.items()}


def _dm_kwargs(d, student, **extra):
    return dict(student_prediction=student, real_teacher_prediction=d["a"], fake_teacher_prediction=d["b"],
                xt=d["xt"], xt_teacher=d["xt_teacher"], student_sigma_expanded=d["s"],
                teacher_sigma_expanded=d["st"], **extra)


def _cfg_kwargs(d, student, **extra):
    return dict(student_prediction=student, real_teacher_cond_prediction=d["a"],
                real_teacher_uncond_prediction=d["b"], xt=d["xt"], xt_teacher=d["xt_teacher"],
                student_sigma_expanded=d["s"], teacher_sigma_expanded=d["st"], **extra)


def _fake_kwargs(d, pred, **extra):
    return dict(fake_teacher_prediction=pred, x0=d["x0"].detach(), noise=d["noise"], t_expanded=d["s"], **extra)


CASES = {
    "compute_dm_loss": (_dm_kwargs, dict(return_per_sample=False, cfg_grad_direction=None, norm_clip_min=0.1)),
    "compute_cfg_loss": (_cfg_kwargs, dict(guidance_scale=4.5, return_per_sample=False, norm_clip_min=0.1)),
    "compute_fake_teacher_diffusion_loss": (_fake_kwargs, {}),
}
KEYS = {"compute_dm_loss": DM_KEYS, "compute_cfg_loss": CFG_KEYS, "compute_fake_teacher_diffusion_loss": FAKE_KEYS}


def _skip_unavailable(backend):
    if backend == "auto":
        return
    if backend not in ck.available_backends("dm_loss"):
        pytest.skip(f"backend {backend} not available")
    with ck.use_backend(backend):
        try:
            resolve("dm_loss", torch.device(DEVICE), torch.float32)
        except RuntimeError as exc:  # e.g. cpp on CUDA tensors
            pytest.skip(str(exc))


def _scalars(info):
    return {k: v for k, v in info.items() if v.dim() == 0}


def _assert_info_close(got, want, rtol=1e-5, atol=1e-6):
    want = _scalars(want)
    assert set(got) == set(want)
    for key in want:
        assert isinstance(got[key], torch.Tensor) and got[key].dim() == 0, key
        assert got[key].dtype == torch.float32 and not got[key].requires_grad, key
        torch.testing.assert_close(got[key], want[key].float(), rtol=rtol, atol=atol, msg=key)


def _run_both(name, d, student, rtol=1e-5, atol=1e-7, grad_rtol=1e-4, grad_atol=1e-9, **extra):
    make, defaults = CASES[name]
    p_want = student.detach().clone().requires_grad_(True)
    p_got = student.detach().clone().requires_grad_(True)
    kwargs = {**defaults, **extra}
    want, want_info = OFFICIAL[name](**make(d, p_want, **kwargs))
    got, got_info = getattr(cdm_official, name)(**make(d, p_got, **kwargs))
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    want.sum().backward()
    got.sum().backward()
    assert p_got.grad.dtype == student.dtype
    torch.testing.assert_close(p_got.grad, p_want.grad, rtol=grad_rtol, atol=grad_atol)
    return got_info, want_info


# ---------------------------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OFFICIAL))
def test_positional_parameters_are_the_official_ones(name):
    ours = inspect.signature(getattr(cdm_official, name)).parameters.values()
    theirs = list(inspect.signature(OFFICIAL[name]).parameters.values())
    positional = [p for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [p.name for p in theirs]
    for mine, other in zip(positional, theirs):
        if other.default is not inspect.Parameter.empty:
            assert mine.default == other.default, mine.name
    extras = [p for p in ours if p.kind is not p.POSITIONAL_OR_KEYWORD]
    assert all(p.kind is p.KEYWORD_ONLY for p in extras)
    assert {"statistics", "return_tensors"} <= {p.name for p in extras}


# ---------------------------------------------------------------------------------------------
# Loss, gradient and info against the stand-in
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_loss_gradient_and_info_match_official(name, backend):
    _skip_unavailable(backend)
    d = _batch()
    with ck.use_backend(backend):
        got_info, want_info = _run_both(name, d, d["student"] if name != "compute_fake_teacher_diffusion_loss"
                                        else d["a"])
    _assert_info_close(got_info, want_info)
    assert set(got_info) == KEYS[name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_per_sample(backend):
    _skip_unavailable(backend)
    d = _batch(seed=2)
    with ck.use_backend(backend):
        for name in ("compute_dm_loss", "compute_cfg_loss"):
            got_info, want_info = _run_both(name, d, d["student"], return_per_sample=True)
            _assert_info_close(got_info, want_info)
            got, _ = getattr(cdm_official, name)(**CASES[name][0](d, d["student"], **{
                **CASES[name][1], "return_per_sample": True}))
            assert got.shape == (3,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_clip_min_and_guidance_scale_are_used(backend):
    _skip_unavailable(backend)
    d = _batch(seed=3)
    with ck.use_backend(backend):
        for clip in (0.05, 2.5):  # 2.5 is above every per-sample gap: the clamp is active
            got_info, want_info = _run_both("compute_dm_loss", d, d["student"], norm_clip_min=clip)
            _assert_info_close(got_info, want_info)
            got_info, want_info = _run_both("compute_cfg_loss", d, d["student"], norm_clip_min=clip,
                                            guidance_scale=-1.5)
            _assert_info_close(got_info, want_info)
        assert float(got_info["cfg_norm_factor_mean"]) == pytest.approx(2.5)


def test_gradient_into_xt_matches_official():
    d = _batch(seed=4)
    xt_want, xt_got = d["xt"].clone().requires_grad_(True), d["xt"].clone().requires_grad_(True)
    want, _ = official_compute_dm_loss(**{**_dm_kwargs(d, d["student"]), "xt": xt_want})
    got, _ = cdm_official.compute_dm_loss(**{**_dm_kwargs(d, d["student"]), "xt": xt_got})
    want.backward()
    got.backward()
    torch.testing.assert_close(xt_got.grad, xt_want.grad, rtol=1e-4, atol=1e-9)


def test_train_py_call_sequence_with_cfg_grad_direction():
    """cfg, then dm with cfg_info.get("cfg_grad_direction", None), all by keyword as train.py does."""
    d = _batch(seed=5)
    want_cfg, want_cfg_info = official_compute_cfg_loss(**_cfg_kwargs(d, d["student"], guidance_scale=3.0,
                                                                      return_per_sample=False, norm_clip_min=0.1))
    got_cfg, got_cfg_info = cdm_official.compute_cfg_loss(**_cfg_kwargs(
        d, d["student"], guidance_scale=3.0, return_per_sample=False, norm_clip_min=0.1), return_tensors=True)
    torch.testing.assert_close(got_cfg_info["cfg_grad_direction"], want_cfg_info["cfg_grad_direction"])
    # the dm teachers differ from the cfg teachers so the cosine is not trivially 1
    d_dm = {**d, "a": d["b"], "b": d["student"].flip(0)}
    kw = dict(return_per_sample=False, norm_clip_min=0.2)
    want, want_info = official_compute_dm_loss(**_dm_kwargs(
        d_dm, d["student"], cfg_grad_direction=want_cfg_info.get("cfg_grad_direction", None), **kw))
    got, got_info = cdm_official.compute_dm_loss(**_dm_kwargs(
        d_dm, d["student"], cfg_grad_direction=got_cfg_info.get("cfg_grad_direction", None), **kw))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    _assert_info_close(got_info, want_info)
    assert set(got_info) == DM_KEYS | COS_KEYS
    assert -1.0 < float(got_info["dm_cfg_cosine_sim_min"]) < float(got_info["dm_cfg_cosine_sim_max"]) < 1.0
    # Without return_tensors the cfg info has no direction, so dm logs no cosine statistics.
    _, plain_cfg_info = cdm_official.compute_cfg_loss(**_cfg_kwargs(d, d["student"], guidance_scale=3.0))
    assert plain_cfg_info.get("cfg_grad_direction", None) is None
    _, plain = cdm_official.compute_dm_loss(**_dm_kwargs(d_dm, d["student"], cfg_grad_direction=None))
    assert set(plain) == DM_KEYS


def test_return_tensors_only_when_asked():
    d = _batch(seed=6)
    _, want_info = official_compute_dm_loss(**_dm_kwargs(d, d["student"]))
    _, info = cdm_official.compute_dm_loss(**_dm_kwargs(d, d["student"]))
    assert all(v.dim() == 0 for v in info.values())
    _, info = cdm_official.compute_dm_loss(**_dm_kwargs(d, d["student"]), return_tensors=True)
    assert set(info) == DM_KEYS | {"dm_grad_direction"}
    torch.testing.assert_close(info["dm_grad_direction"], want_info["dm_grad_direction"])
    assert not info["dm_grad_direction"].requires_grad
    _, info = cdm_official.compute_fake_teacher_diffusion_loss(**_fake_kwargs(d, d["a"]), return_tensors=True)
    torch.testing.assert_close(info["v_target"], d["noise"] - d["x0"])


def test_statistics_false_returns_only_sigma_means():
    d = _batch(seed=7)
    _, want_info = official_compute_cfg_loss(**_cfg_kwargs(d, d["student"], guidance_scale=2.0))
    want, _ = official_compute_dm_loss(**_dm_kwargs(d, d["student"]))
    got, info = cdm_official.compute_dm_loss(**_dm_kwargs(d, d["student"], cfg_grad_direction=d["a"]),
                                             statistics=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert set(info) == {"student_sigma", "teacher_sigma"}
    _, info = cdm_official.compute_cfg_loss(**_cfg_kwargs(d, d["student"], guidance_scale=2.0), statistics=False)
    _assert_info_close(info, {k: want_info[k] for k in ("student_sigma", "teacher_sigma")})
    _, info = cdm_official.compute_cfg_loss(**_cfg_kwargs(d, d["student"], guidance_scale=2.0), statistics=False,
                                            return_tensors=True)
    assert set(info) == {"student_sigma", "teacher_sigma", "cfg_grad_direction"}
    _, info = cdm_official.compute_fake_teacher_diffusion_loss(**_fake_kwargs(d, d["a"]), statistics=False)
    assert info == {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 3, 1), (3, 2, 3, 5, 3)], ids=["odd", "b1", "5d"])
def test_odd_and_five_d_shapes(shape, backend):
    _skip_unavailable(backend)
    d = _batch(shape=shape, seed=8)
    with ck.use_backend(backend):
        for name in OFFICIAL:
            student = d["a"] if name == "compute_fake_teacher_diffusion_loss" else d["student"]
            got_info, want_info = _run_both(name, d, student)
            _assert_info_close(got_info, want_info)  # B == 1: var of one sample, std of nothing -> nan, as official


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_predictions_with_fp32_latents(backend):
    """Under autocast the model outputs are bf16 while the latents and sigmas stay fp32."""
    _skip_unavailable(backend)
    d = _batch(seed=9, pred_dtype=torch.bfloat16)
    with ck.use_backend(backend):
        for name in OFFICIAL:
            student = d["a"] if name == "compute_fake_teacher_diffusion_loss" else d["student"]
            got_info, want_info = _run_both(name, d, student, rtol=1.6e-2, atol=1e-5, grad_rtol=1.6e-2,
                                            grad_atol=1e-5)
            _assert_info_close(got_info, want_info, rtol=1.6e-2, atol=1e-4)


def test_cosine_statistics_follow_torch_cosine_similarity():
    d = _batch(shape=(4, 2, 3, 3), seed=10)
    direction = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    direction[2] = -(d["st"][2] * (d["b"][2] - d["a"][2]))  # exactly anti-parallel for sample 2
    _, want = official_compute_dm_loss(**_dm_kwargs(d, d["student"], cfg_grad_direction=direction))
    _, got = cdm_official.compute_dm_loss(**_dm_kwargs(d, d["student"], cfg_grad_direction=direction))
    _assert_info_close(got, want)
    assert float(got["dm_cfg_cosine_sim_min"]) == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter divides NaNs in numpy
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_teacher_values(backend):
    """A non-finite first teacher (real/cond) makes the normaliser non-finite: both zero the sample's shift.
    Documented difference for the second teacher (fake/uncond): the official nan_to_num zeroes a NaN
    *element* (and turns inf into float max, overflowing the loss); the fused op zeroes the whole sample."""
    _skip_unavailable(backend)
    d = _batch(seed=11)
    with ck.use_backend(backend):
        for which, value in (("a", float("nan")), ("a", float("inf")), ("b", float("nan")), ("b", float("inf"))):
            bad = {**d, which: d[which].clone()}
            bad[which][1, 0, 0, 0] = value
            want, _ = official_compute_dm_loss(**_dm_kwargs(bad, d["student"], return_per_sample=True))
            got, info = cdm_official.compute_dm_loss(**_dm_kwargs(bad, d["student"], return_per_sample=True))
            assert torch.isfinite(got).all() and float(got[1]) == 0.0, (which, value)
            torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-7)
            if which == "a":
                assert float(want[1]) == 0.0
            elif value != value:
                assert 0.0 < float(want[1]) < float("inf")
            else:
                assert float(want[1]) == float("inf")
            assert torch.isfinite(info["dm_effect_norm"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_teacher_seeded_noise_is_regenerated(backend):
    _skip_unavailable(backend)
    d = _batch(seed=12)
    noise = ck.renoise(torch.zeros_like(d["x0"]), 1.0, seed=5, offset=7)
    with ck.use_backend(backend):
        want, want_info = official_compute_fake_teacher_diffusion_loss(d["a"], d["x0"], noise, d["s"])
        got, got_info = cdm_official.compute_fake_teacher_diffusion_loss(d["a"], d["x0"], None, d["s"], seed=5,
                                                                         offset=7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_info_close(got_info, want_info, atol=1e-5)


def test_positional_calls_like_the_official_signature():
    d = _batch(seed=13)
    want, _ = official_compute_cfg_loss(d["student"], d["a"], d["b"], d["xt"], d["xt_teacher"], d["s"], d["st"], 4.0,
                                        True, 0.3)
    got, _ = cdm_official.compute_cfg_loss(d["student"], d["a"], d["b"], d["xt"], d["xt_teacher"], d["s"], d["st"],
                                           4.0, True, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    want, want_info = official_compute_dm_loss(d["student"], d["a"], d["b"], d["xt"], d["xt_teacher"], d["s"],
                                               d["st"], False, d["a"], 0.3)
    got, got_info = cdm_official.compute_dm_loss(d["student"], d["a"], d["b"], d["xt"], d["xt_teacher"], d["s"],
                                                 d["st"], False, d["a"], 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    _assert_info_close(got_info, want_info)


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------

def test_patch_installs_everywhere_and_unpatch_restores(official):
    losses, training, script = official["cdm.training.losses"], official["cdm.training"], official["train_cdm_script"]
    script_globals = {"__name__": "__main__", **OFFICIAL}
    replaced = cdm_official.patch("train_cdm_script", script_globals)  # strict by default
    for prefix in ("cdm.training.losses", "cdm.training", "train_cdm_script", "__main__"):
        for name in OFFICIAL:
            assert f"{prefix}.{name}" in replaced
    for name in OFFICIAL:
        for target in (losses, training, script):
            assert getattr(target, name) is getattr(cdm_official, name)
        assert script_globals[name] is getattr(cdm_official, name)
    assert cdm_official.patch("train_cdm_script", script_globals) == []  # idempotent
    d = _batch()
    loss, info = losses.compute_dm_loss(**_dm_kwargs(d, d["student"], return_per_sample=False,
                                                     cfg_grad_direction=None, norm_clip_min=0.1))
    assert "dm_grad_direction" not in info and set(info) == DM_KEYS  # the drop-in answered
    cdm_official.unpatch()
    for name, fn in OFFICIAL.items():
        for target in (losses, training, script):
            assert getattr(target, name) is fn
        assert script_globals[name] is fn


def test_patch_options_set_the_keyword_defaults(official):
    losses = official["cdm.training.losses"]
    assert len(cdm_official.patch(return_tensors=True)) == 6
    d = _batch()
    _, cfg_info = losses.compute_cfg_loss(**_cfg_kwargs(d, d["student"], guidance_scale=2.0))
    assert cfg_info["cfg_grad_direction"].shape == d["student"].shape  # train.py gets its cosine logs back
    _, info = losses.compute_dm_loss(**_dm_kwargs(d, d["student"],
                                                  cfg_grad_direction=cfg_info.get("cfg_grad_direction", None)))
    assert COS_KEYS <= set(info)
    assert inspect.signature(losses.compute_dm_loss) == inspect.signature(cdm_official.compute_dm_loss)
    assert cdm_official.patch(return_tensors=True) == []
    assert len(cdm_official.patch(statistics=False)) == 6  # re-configure our own install
    _, info = losses.compute_dm_loss(**_dm_kwargs(d, d["student"]))
    assert set(info) == {"student_sigma", "teacher_sigma"}
    _, info = losses.compute_dm_loss(**_dm_kwargs(d, d["student"]), statistics=True)  # explicit wins
    assert set(info) == DM_KEYS
    cdm_official.unpatch()
    assert losses.compute_dm_loss is official_compute_dm_loss


def test_patch_refuses_a_foreign_signature(official):
    losses, training = official["cdm.training.losses"], official["cdm.training"]

    def compute_dm_loss(student_pred, real_pred, fake_pred, latents, teacher_latents, sigmas, teacher_sigmas):
        raise AssertionError  # the old guessed signature: names differ

    losses.compute_dm_loss = compute_dm_loss
    with pytest.raises(TypeError, match="compute_dm_loss.*names differ"):
        cdm_official.patch()
    assert losses.compute_dm_loss is compute_dm_loss
    assert training.compute_cfg_loss is official_compute_cfg_loss  # nothing changed anywhere
    assert "cdm.training.losses.compute_dm_loss" in cdm_official.patch(strict=False)
    cdm_official.unpatch()
    assert losses.compute_dm_loss is compute_dm_loss


def test_patch_refuses_a_different_default(official):
    losses = official["cdm.training.losses"]

    def compute_cfg_loss(student_prediction, real_teacher_cond_prediction, real_teacher_uncond_prediction, xt,
                         xt_teacher, student_sigma_expanded, teacher_sigma_expanded, guidance_scale,
                         return_per_sample=False, norm_clip_min=0.05):
        raise AssertionError

    losses.compute_cfg_loss = compute_cfg_loss
    with pytest.raises(TypeError, match="norm_clip_min"):
        cdm_official.patch()
    assert losses.compute_cfg_loss is compute_cfg_loss
    with pytest.raises(ValueError, match="not imported"):
        cdm_official.patch("no_such_module_xyz")


def test_patch_with_nothing_to_patch_warns_or_raises_when_strict(monkeypatch):
    """The official modules not imported and no namespace holding the losses: an empty list alone would read as
    success, so patch() warns (strict=True: raises); a namespace without the losses changes nothing either."""
    for name in cdm_official.DEFAULT_TARGETS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(RuntimeWarning, match="nothing to patch.*NOT replaced"):
        assert cdm_official.patch() == []
    with pytest.warns(RuntimeWarning, match="nothing to patch"):
        assert cdm_official.patch({"__name__": "__main__", "unrelated": print}, strict=False) == []
    with pytest.raises(RuntimeError, match="nothing to patch"):
        cdm_official.patch(strict=True)
    assert cdm_official._patched == []  # nothing was installed along the way


def test_patch_already_installed_is_no_warning(official):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second, idempotent call found the losses: no "nothing to patch"
        assert cdm_official.patch(strict=True)
        assert cdm_official.patch(strict=True) == []
    cdm_official.unpatch()
