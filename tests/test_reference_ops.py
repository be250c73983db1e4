"""The reference ops (the specification) against independent float64 formulas and autograd."""

import math

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference as ref
from cdm_kernels.reference.philox import philox_randn

SHAPES = [(3, 5), (2, 3, 7, 5), (4, 2, 3, 4, 5)]


def _naive_score_difference_f64(student_v, a_v, b_v, xt, xt_t, s, st, scale, clip):
    """Independent float64 formula: per-sample loop, plain Python reductions."""
    losses, grads = [], []
    for i in range(student_v.shape[0]):
        x0_s = xt[i].double() - s[i] * student_v[i].double()
        x0_a = xt_t[i].double() - st[i] * a_v[i].double()
        x0_b = xt_t[i].double() - st[i] * b_v[i].double()
        n = x0_s.numel()
        norm = max(float((x0_a - x0_s).abs().sum()) / n + 1e-8, clip)
        shift = scale * (x0_a - x0_b) / norm
        if not (math.isfinite(norm) and bool(torch.isfinite(shift).all())):
            shift = torch.zeros_like(shift)
        losses.append(float((shift**2).sum()) / n)
        grads.append(2.0 * s[i] * shift / n / student_v.shape[0])
    return torch.tensor(losses, dtype=torch.float64), torch.stack(grads)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("which", ["dm", "cfg"])
def test_score_difference_loss_and_grad_match_float64(shape, which):
    g = torch.Generator().manual_seed(hash((shape, which)) % 2**31)
    b = shape[0]
    t = [torch.randn(shape, generator=g) for _ in range(5)]
    s = torch.rand(b, generator=g) * 0.9 + 0.05
    st = torch.rand(b, generator=g) * 0.9 + 0.05
    student_v = t[0].clone().requires_grad_(True)
    scale = 1.0 if which == "dm" else 7.0
    if which == "dm":
        loss = ref.dm_loss(student_v, t[1], t[2], t[3], t[4], s, st)
    else:
        loss = ref.cfg_loss(student_v, t[1], t[2], t[3], t[4], s, st, guidance_scale=scale)
    loss.backward()
    want_losses, want_grad = _naive_score_difference_f64(t[0], t[1], t[2], t[3], t[4], s.double(),
                                                         st.double(), scale, 0.1)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want_losses.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(student_v.grad.double(), want_grad, rtol=1e-4, atol=1e-8)


def test_score_difference_norm_clip_is_active_for_small_differences():
    # |x0_real - x0_s| tiny -> normaliser clamps at norm_clip_min: shift = diff / clip.
    x = torch.zeros(2, 8)
    v = torch.zeros(2, 8)
    real = torch.full((2, 8), -0.01)  # x0_real = 0.01 * sigma_t
    loss = ref.dm_loss(v, real, torch.zeros(2, 8), x, x, 0.5, 1.0, norm_clip_min=0.1, reduction="none")
    expected = (0.01 / 0.1) ** 2
    torch.testing.assert_close(loss, torch.full((2,), expected))


def test_non_finite_teacher_zeroes_that_sample_only():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, 4, 6, generator=g) for _ in range(5)]
    real = t[1].clone()
    real[1, 2, 3] = float("nan")
    fake = t[2].clone()
    fake[2, 0, 0] = float("inf")
    student_v = t[0].clone().requires_grad_(True)
    per = ref.dm_loss(student_v, real, fake, t[3], t[4], 0.4, 0.6, reduction="none")
    assert torch.isfinite(per).all()
    assert per[1] == 0 and per[2] == 0 and per[0] > 0
    per.sum().backward()
    assert torch.isfinite(student_v.grad).all()
    assert (student_v.grad[1:] == 0).all() and (student_v.grad[0] != 0).any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_are_consistent(reduction):
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(4, 3, 5, generator=g) for _ in range(5)]
    per = ref.dm_loss(*t, 0.3, 0.7, reduction="none")
    out = ref.dm_loss(*t, 0.3, 0.7, reduction=reduction)
    want = {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("sigma_kind", ["float", "vector", "broadcast", "scalar_tensor"])
def test_euler_extrapolate_and_step_match_float64(sigma_kind):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    v = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    s_from_vec = torch.rand(3, generator=g)
    s_to_vec = torch.rand(3, generator=g)
    make = {
        "float": lambda t: float(t[0]),
        "vector": lambda t: t,
        "broadcast": lambda t: t.reshape(3, 1, 1),
        "scalar_tensor": lambda t: t[0].clone(),
    }[sigma_kind]
    s_from, s_to = make(s_from_vec), make(s_to_vec)
    out = ref.euler_extrapolate(x, v, s_from, s_to)
    sf = torch.as_tensor(s_from, dtype=torch.float64).reshape(-1, 1, 1)
    stt = torch.as_tensor(s_to, dtype=torch.float64).reshape(-1, 1, 1)
    want = x.double() + (stt - sf) * v.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    (out * torch.arange(60.0).reshape(3, 4, 5)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(60.0).reshape(3, 4, 5))
    torch.testing.assert_close(v.grad.double(), ((stt - sf) * torch.arange(60.0).reshape(3, 4, 5)).expand(3, 4, 5),
                               rtol=1e-6, atol=1e-6)
    x_next, x0 = ref.euler_step(x, v, s_from, s_to)
    torch.testing.assert_close(x_next, out)
    torch.testing.assert_close(x0.double(), x.double() - sf * v.double(), rtol=1e-6, atol=1e-6)


def test_renoise_given_and_seeded_noise():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    s = torch.tensor([0.25, 0.75], dtype=torch.float64)
    out = ref.renoise(x0, s, noise)
    torch.testing.assert_close(out, (1 - s.view(2, 1, 1)) * x0 + s.view(2, 1, 1) * noise)
    out.sum().backward()
    torch.testing.assert_close(x0.grad, (1 - s.view(2, 1, 1)).expand(2, 3, 4))
    seeded = ref.renoise(x0.detach().float(), 0.5, seed=11, offset=5)
    eps = philox_randn((2, 3, 4), 11, 5)
    torch.testing.assert_close(seeded, 0.5 * x0.detach().float() + 0.5 * eps)


def test_philox_noise_is_standard_normal_and_keyed_by_seed_and_offset():
    a = philox_randn((200_000,), seed=7)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1.0) < 0.01
    assert abs(float((a[:-1] * a[1:]).mean())) < 0.01  # no correlation between neighbours
    b = philox_randn((10,), seed=7, offset=3)
    torch.testing.assert_close(b, a[3:13])  # offset shifts the counter, nothing else
    c = philox_randn((10,), seed=8)
    assert not torch.allclose(c, a[:10])


def test_flow_matching_loss_matches_float64_and_seeded_noise_is_the_renoise_noise():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(3, 2, 5, generator=g, requires_grad=True)
    x0 = torch.randn(3, 2, 5, generator=g)
    loss = ref.flow_matching_loss(pred, x0, seed=21, offset=0)
    eps = philox_randn((3, 2, 5), 21).double()
    target = eps - x0.double()
    want = ((pred.double() - target) ** 2).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(pred.grad.double(), 2 * (pred.double() - target) / 30, rtol=1e-5, atol=1e-8)
    # The noise of renoise(seed) is exactly the noise the loss regenerates.
    xt = ref.renoise(x0, 1.0, seed=21)
    torch.testing.assert_close(xt, eps.float())


def test_predict_x0_renoise_is_detached_and_correct():
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(2, 6, generator=g)
    v = torch.randn(2, 6, generator=g, requires_grad=True)
    noise = torch.randn(2, 6, generator=g)
    x0, xt_t = ref.predict_x0_renoise(xt, v, 0.6, torch.tensor([0.2, 0.9]), noise)
    assert not x0.requires_grad and not xt_t.requires_grad
    want_x0 = xt - 0.6 * v.detach()
    torch.testing.assert_close(x0, want_x0)
    st = torch.tensor([0.2, 0.9]).view(2, 1)
    torch.testing.assert_close(xt_t, (1 - st) * want_x0 + st * noise)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    g = torch.Generator().manual_seed(6)
    t = [torch.randn(2, 3, 8, generator=g).to(dtype) for _ in range(5)]
    loss = ref.dm_loss(*t, 0.5, 0.5)
    assert loss.dtype == torch.float32
    want = ref.dm_loss(*[x.double() for x in t], 0.5, 0.5)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    out = ref.euler_extrapolate(t[0], t[1], 0.2, 0.9)
    assert out.dtype == dtype


def test_public_api_defaults_to_reference_and_validates():
    assert ck.get_backend() in ("auto", "reference")
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="fake_v"):
        ck.dm_loss(x, x, x[:1], x, x, 0.5, 0.5)
    with pytest.raises(ValueError, match="sigma_teacher"):
        ck.dm_loss(x, x, x, x, x, 0.5, torch.rand(5))
    with pytest.raises(ValueError, match="reduction"):
        ck.dm_loss(x, x, x, x, x, 0.5, 0.5, reduction="avg")
    with pytest.raises(ValueError, match="norm_clip_min"):
        ck.cfg_loss(x, x, x, x, x, 0.5, 0.5, guidance_scale=7.0, norm_clip_min=0.0)
    with pytest.raises(ValueError, match="seed"):
        ck.renoise(x, 0.5)
    with pytest.raises(ValueError, match="x0"):
        ck.renoise(x.long(), 0.5, seed=1)
    with pytest.raises(ValueError, match="backend"):
        with ck.use_backend("cuda-magic"):
            pass
    with ck.use_backend("reference"):
        torch.testing.assert_close(ck.dm_loss(x, x, x + 1, x, x, 0.5, 0.5), ref.dm_loss(x, x, x + 1, x, x, 0.5, 0.5))
