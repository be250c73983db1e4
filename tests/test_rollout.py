import pytest
import torch

from cdm_train.config import ScheduleConfig
from cdm_train.models.build import build_models
from cdm_train.rollout import draw_schedule, last_step_needed, rollout, sample_schedule, sample_trajectory_indices
from cdm_train.schedule import Shift, flux_mu, shift_sigmas

from .helpers import tiny_config


def test_schedule_is_the_dynamic_continuous_schedule():
    cfg = ScheduleConfig()
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(300):
        s = sample_schedule(cfg, g)
        n = len(s) - 1
        lengths.add(n)
        assert 1 <= n <= 28
        assert s[0] == 1.0 and s[-1] == 0.0
        assert all(a > b for a, b in zip(s, s[1:]))
        assert all(0.25 <= x <= 0.95 for x in s[1:-1])
    assert min(lengths) <= 2 and max(lengths) >= 27  # N ~ U{1..28} actually covers the range
    fixed = ScheduleConfig(fixed=[1.0, 0.75, 0.5, 0.25])
    assert sample_schedule(fixed, g) == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("shift", [3.0, 1.0, 6.0])
def test_rollout_schedule_is_shifted_exactly_as_diffusers_scheduler_shifts_it(shift):
    # The official code hands [1.0] + sorted inner draws to the pipeline; FlowMatchEulerDiscreteScheduler shifts them.
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = ScheduleConfig()
    for seed in range(20):
        raw = draw_schedule(cfg, torch.Generator().manual_seed(seed))
        ours = sample_schedule(cfg, torch.Generator().manual_seed(seed), shift)
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(sigmas=raw[:-1])
        theirs = sched.sigmas.tolist()
        assert len(ours) == len(theirs) and ours[0] == 1.0 and ours[-1] == 0.0
        assert ours == pytest.approx(theirs, rel=2e-7, abs=1e-7)  # diffusers computes in fp32
        if shift != 1.0 and len(raw) > 2:
            assert ours[1] != pytest.approx(raw[1])  # the shift does something
    fixed = ScheduleConfig(fixed=[1.0, 0.75, 0.5, 0.25])  # the official 4-step inference schedule
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    assert sample_schedule(fixed, torch.Generator(), shift) == pytest.approx(sched.sigmas.tolist(), rel=2e-7)


def test_dynamic_shift_matches_diffusers_flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    raw = [1.0, 0.8, 0.55, 0.3]
    for seq_len in (256, 1024, 4096, 4500):
        mu = flux_mu(seq_len)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        sched.set_timesteps(sigmas=raw, mu=mu)
        assert shift_sigmas(raw + [0.0], Shift(mu=mu)) == pytest.approx(sched.sigmas.tolist(), rel=2e-7, abs=1e-7)


def test_trajectory_indices_uniform_and_descending():
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(5)
    for _ in range(400):
        idx = sample_trajectory_indices(5, 8, g)
        assert idx == sorted(idx, reverse=True) and all(0 <= i < 5 for i in idx)
        counts += torch.bincount(torch.tensor(idx), minlength=5)
    freq = counts / counts.sum()
    assert (freq - 0.2).abs().max() < 0.03


def _naive_rollout(student, adapter, cond, noise, sigmas):
    """Every step for every sample, whole trajectory stored, recorded as the official
    TrainingSchedulerWrapper records it: all_xt and all_x0 start with the initial noise."""
    all_xt, all_x0, all_v = [noise], [noise], []
    x = noise
    with torch.no_grad():
        for k in range(len(sigmas) - 1):
            v = adapter(student, x, torch.full((x.shape[0],), sigmas[k]), cond)
            all_x0.append(x - sigmas[k] * v)
            all_v.append(v)
            x = x + (sigmas[k + 1] - sigmas[k]) * v
            all_xt.append(x)
    return all_xt, all_v, all_x0


@pytest.mark.parametrize("early_exit", [False, True])
def test_rollout_records_match_the_naive_trajectory(tmp_path, early_exit):
    cfg = tiny_config(tmp_path)
    m = build_models(cfg, torch.device("cpu"))
    sigmas = [1.0, 0.9, 0.7, 0.5, 0.3, 0.0]
    indices = [4, 4, 3, 1, 0, 0]
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(6, *m.latent_shape, generator=g)
    cond = m.sample_cond(6, g)
    ro = rollout(m.student, m.adapter, cond, noise, sigmas, indices, early_exit=early_exit)
    all_xt, all_v, all_x0 = _naive_rollout(m.student, m.adapter, cond, noise, sigmas)
    for b, i in enumerate(indices):
        torch.testing.assert_close(ro.x_i[b], all_xt[i][b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ro.v_i[b], all_v[i][b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ro.x0_i[b], all_x0[i + 1][b], rtol=1e-5, atol=1e-6)  # the official FT target
        assert float(ro.sigma_i[b]) == pytest.approx(sigmas[i])
    n = len(sigmas) - 1
    expected_nfe = sum(i + 1 for i in indices) if early_exit else n * len(indices)
    assert ro.nfe == expected_nfe
    if early_exit:
        assert ro.nfe < n * len(indices)


def test_last_step_needed_is_the_trajectory_index():
    assert [last_step_needed(i, 5) for i in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        last_step_needed(5, 5)


def test_early_exit_keeps_about_53_percent_of_the_rollout_on_the_official_schedule():
    # Exact expectation: a sample with index i runs i + 1 steps; sum_N sum_i (i + 1) / N over sum_N N
    # (N ~ U{1..28}, i ~ U{0..N-1}) = (406 + 28) / 2 / 406.
    exact = sum(sum(i + 1 for i in range(n)) / n for n in range(1, 29)) / sum(range(1, 29))
    assert abs(exact - 217 / 406) < 1e-12 and abs(exact - 0.534) < 0.001
    cfg = ScheduleConfig()
    g = torch.Generator().manual_seed(3)
    full = kept = 0
    for _ in range(2000):
        n = len(sample_schedule(cfg, g)) - 1
        for i in sample_trajectory_indices(n, 4, g):
            full += n
            kept += last_step_needed(i, n) + 1
    assert abs(kept / full - exact) < 0.02
