"""The random draws of an iteration against the official code's (github byliutao/cdm).

- Schedule length N: the official `random.Random((epoch, batch_idx)).randint(1, 28)` (train.py ~L610) is the
  same on every rank; checked across 2 gloo ranks and for its distribution (chi-square, U{1..Nmax}).
- Inner sigmas: U(0.25, 0.95) per rank (the official global `random`, seeded seed + rank): Kolmogorov-Smirnov.
- Trajectory index i ~ U{0..N-1} (train.py `torch.randint(0, num_steps, ...)`): chi-square within each N.
- Prompts: exactly the rows an independent transcription of the stateful `DistributedKRepeatSampler`
  (cdm/data/datasets.py, k = 1, set_epoch(step) before each batch) yields, rank by rank.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy import stats

from cdm_train.config import make_config
from cdm_train.draws import draw_iteration
from cdm_train.models.build import build_models
from cdm_train.prompts import official_prompt_rows
from cdm_train.rollout import draw_num_steps

from .helpers import tiny_config

P_MIN = 1e-4  # a correct implementation fails one of these tests with probability ~1e-4 each; fixed seeds anyway


class OfficialKRepeatSampler:
    """cdm/data/datasets.py DistributedKRepeatSampler, transcribed statement by statement (the stateful one)."""

    def __init__(self, size, batch_size, k, num_replicas, rank, seed=0):
        self.size, self.batch_size, self.k = size, batch_size, k
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.total_samples = num_replicas * batch_size
        assert self.total_samples % k == 0
        self.m = self.total_samples // k
        self.epoch = 0
        self._shuffled_indices, self._pointer, self._shuffle_epoch = None, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        while True:
            g = torch.Generator()
            if self._shuffled_indices is None or self._pointer + self.m > len(self._shuffled_indices):
                g.manual_seed(self.seed + self._shuffle_epoch)
                self._shuffled_indices = torch.randperm(self.size, generator=g).tolist()
                self._pointer = 0
                self._shuffle_epoch += 1
            if self.size >= self.m:
                indices = self._shuffled_indices[self._pointer:self._pointer + self.m]
                self._pointer += self.m
            else:
                indices, remaining = [], self.m
                while remaining > 0:
                    available = len(self._shuffled_indices) - self._pointer
                    if available <= 0:
                        g.manual_seed(self.seed + self._shuffle_epoch)
                        self._shuffled_indices = torch.randperm(self.size, generator=g).tolist()
                        self._pointer = 0
                        self._shuffle_epoch += 1
                        available = len(self._shuffled_indices)
                    take = min(remaining, available)
                    indices.extend(self._shuffled_indices[self._pointer:self._pointer + take])
                    self._pointer += take
                    remaining -= take
            repeated = [idx for idx in indices for _ in range(self.k)]
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(repeated), generator=g).tolist()
            samples = [repeated[i] for i in order]
            per_card = [samples[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.num_replicas)]
            self.epoch += 1
            yield per_card[self.rank]


@pytest.mark.parametrize("size, world, batch", [(10, 2, 3), (11, 2, 2), (4, 3, 2), (7, 1, 7), (200, 8, 16)])
def test_prompt_rows_equal_the_official_sampler(size, world, batch):
    for rank in range(world):
        sampler = OfficialKRepeatSampler(size, batch, 1, world, rank, seed=42)
        it = iter(sampler)
        for step in range(9):
            sampler.set_epoch(step)  # train.py: set_epoch(epoch * num_batches_per_epoch + batch_idx), 1 batch/epoch
            assert official_prompt_rows(size, 42, step, rank, world, batch) == next(it), (rank, step)


def test_trainer_draws_its_prompts_in_the_official_order(tmp_path):
    cfg = tiny_config(tmp_path, "train.batch_size=3", "train.seed=5")
    models = build_models(cfg, torch.device("cpu"))
    bank = models.sample_cond
    for rank in range(2):
        for step in range(4):
            d = draw_iteration(cfg, bank, models.latent_shape, models.shift, rank=rank, world=2, step=step,
                               device=torch.device("cpu"))
            want = bank.take(official_prompt_rows(bank.size, 5, step, rank, 2, 3))
            assert all(torch.equal(d.cond[k], want[k]) for k in want)
    random_order = tiny_config(tmp_path, "train.batch_size=3", "train.seed=5", "train.prompt_order=random")
    d = draw_iteration(random_order, bank, models.latent_shape, models.shift, rank=0, world=1, step=0,
                       device=torch.device("cpu"))
    assert d.cond["encoder_hidden_states"].shape[0] == 3


def test_schedule_length_is_uniform_and_independent_of_rank_and_seed(tmp_path):
    cfg = make_config("tiny", overrides=[f"train.out_dir={tmp_path}", "schedule.max_steps=28"])
    steps = range(5600)
    n = [draw_num_steps(cfg.schedule, 0, t) for t in steps]
    counts = Counter(n)
    assert set(counts) == set(range(1, 29))
    assert stats.chisquare([counts[k] for k in range(1, 29)]).pvalue > P_MIN
    assert n == [draw_num_steps(cfg.schedule, 123, t) for t in steps]  # official: the seed plays no part
    cfg.schedule.length_draw = "seeded"
    seeded = [draw_num_steps(cfg.schedule, 0, t) for t in steps]
    assert seeded != n and seeded != [draw_num_steps(cfg.schedule, 1, t) for t in steps]
    assert stats.chisquare([Counter(seeded)[k] for k in range(1, 29)]).pvalue > P_MIN


def test_inner_sigmas_and_indices_follow_the_official_distributions(tmp_path):
    cfg = tiny_config(tmp_path, "train.batch_size=4", "schedule.max_steps=28")
    models = build_models(cfg, torch.device("cpu"))
    inner, cells = [], Counter()
    for step in range(400):
        a = draw_iteration(cfg, models.sample_cond, models.latent_shape, 1.0, rank=0, world=2, step=step,
                           device=torch.device("cpu"))
        b = draw_iteration(cfg, models.sample_cond, models.latent_shape, 1.0, rank=1, world=2, step=step,
                           device=torch.device("cpu"))
        assert len(a.raw_sigmas) == len(b.raw_sigmas)  # the same N on both ranks
        if len(a.raw_sigmas) > 3:
            assert a.raw_sigmas != b.raw_sigmas  # inner sigmas are per rank
        inner += a.raw_sigmas[1:-1]
        num = len(a.raw_sigmas) - 1
        cells.update((num, i) for i in a.indices)
    assert stats.kstest(inner, stats.uniform(loc=0.25, scale=0.70).cdf).pvalue > P_MIN
    # i ~ U{0..N-1} given N: one chi-square over every (N, i) cell with its expected count.
    by_n = Counter()
    for (num, _), c in cells.items():
        by_n[num] += c
    observed = [cells[(num, i)] for num in by_n for i in range(num)]
    expected = [by_n[num] / num for num in by_n for i in range(num)]
    assert stats.chisquare(observed, expected).pvalue > P_MIN


def _draws_worker(rank, world, store, out):
    from cdm_train.trainer import Trainer

    from .test_distributed import _config, _init

    _init(rank, world, store)
    try:
        tr = Trainer(_config(Path(out), "train.parallel=ddp", "schedule.max_steps=28"))
        records = []
        for step in range(6):
            d = tr.draws(step)
            records.append({"raw": d.raw_sigmas, "cond": d.cond["encoder_hidden_states"].flatten(1)[:, :4].tolist()})
        Path(out, f"draws{rank}.json").write_text(json.dumps(records))
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def test_two_gloo_ranks_share_n_and_split_the_prompts(tmp_path):
    from .test_distributed import _spawn

    _spawn(_draws_worker, 2, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"draws{r}.json").read_text()) for r in range(2))
    assert [len(a["raw"]) for a in r0] == [len(b["raw"]) for b in r1]  # the same N at every step
    assert any(a["raw"] != b["raw"] for a, b in zip(r0, r1))  # inner sigmas differ
    for a, b in zip(r0, r1):  # the tiny bank has 8 rows, the global batch 4: no row on both ranks
        assert not {tuple(x) for x in a["cond"]} & {tuple(x) for x in b["cond"]}
