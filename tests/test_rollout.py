import pytest
import torch

from cdm_train.config import ScheduleConfig
from cdm_train.presets import build_models
from cdm_train.rollout import last_step_needed, rollout, sample_schedule, sample_trajectory_indices

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
    """Every step for every sample, whole trajectory stored: the plain definition."""
    xs, vs, x0s = [], [], []
    x = noise
    with torch.no_grad():
        for k in range(len(sigmas) - 1):
            v = adapter(student, x, torch.full((x.shape[0],), sigmas[k]), cond)
            xs.append(x)
            vs.append(v)
            x0s.append(x - sigmas[k] * v)
            x = x + (sigmas[k + 1] - sigmas[k]) * v
    x0s.append(x)  # "x0 at step N" = the final sample
    return xs, vs, x0s


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
    xs, vs, x0s = _naive_rollout(m.student, m.adapter, cond, noise, sigmas)
    for b, i in enumerate(indices):
        torch.testing.assert_close(ro.x_i[b], xs[i][b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ro.v_i[b], vs[i][b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ro.x0_next[b], x0s[i + 1][b], rtol=1e-5, atol=1e-6)
        assert float(ro.sigma_i[b]) == pytest.approx(sigmas[i])
    n = len(sigmas) - 1
    expected_nfe = sum(last_step_needed(i, n) + 1 for i in indices) if early_exit else n * len(indices)
    assert ro.nfe == expected_nfe
    if early_exit:
        assert ro.nfe < n * len(indices)


def test_early_exit_saves_about_forty_percent_of_the_rollout_on_the_official_schedule():
    # Exact expectation: sum_N sum_i min(i + 2, N) / N  over  sum_N N  (N ~ U{1..28}, i ~ U{0..N-1}).
    exact = sum(sum(min(i + 2, n) for i in range(n)) / n for n in range(1, 29)) / sum(range(1, 29))
    assert abs(exact - 0.594) < 0.001
    cfg = ScheduleConfig()
    g = torch.Generator().manual_seed(3)
    full = kept = 0
    for _ in range(2000):
        n = len(sample_schedule(cfg, g)) - 1
        for i in sample_trajectory_indices(n, 4, g):
            full += n
            kept += last_step_needed(i, n) + 1
    assert abs(kept / full - exact) < 0.02
