"""cdm_train.rng: derived per-step randomness, and the global RNG states a checkpoint records.

The CUDA part runs on the CPU with torch.cuda's RNG functions faked: a node with a given
number of visible GPUs whose set_rng_state rejects device indices it does not have, as
the real one does (that is what made set_rng_state_all fail on a node with fewer GPUs).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cdm_train import rng


class FakeNode:
    """torch.cuda's RNG surface for a node with `count` GPUs and `current` as the current device."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.count, self.current = count, current
        self.states = {i: torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(count)}
        self.set_calls: list[int] = []
        for name in ("is_available", "current_device", "device_count", "get_rng_state", "set_rng_state",
                     "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        return True

    def current_device(self):
        return self.current

    def device_count(self):
        return self.count

    def _index(self, device):
        index = self.current if device in ("cuda", None) else int(device)
        if not 0 <= index < self.count:
            raise IndexError(f"device index {index} out of range for {self.count} device(s)")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, new_state, device="cuda"):
        assert new_state.dtype == torch.uint8 and new_state.device.type == "cpu"
        index = self._index(device)
        self.set_calls.append(index)
        self.states[index] = new_state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, new_states):  # what torch does: one set_rng_state per list entry
        for i, state in enumerate(new_states):
            self.set_rng_state(state, i)


def _old_checkpoint_state(num_gpus: int) -> dict:
    """The format before this fix: torch.cuda.get_rng_state_all() of the saving node."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "cuda": [torch.full((8,), 100 + i, dtype=torch.uint8) for i in range(num_gpus)]}


def test_cpu_round_trip_restores_torch_and_numpy():
    state = rng.capture_global_rng()
    a, b = torch.rand(3), np.random.rand(3)
    rng.restore_global_rng(state)
    torch.testing.assert_close(torch.rand(3), a, rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), b)


def test_capture_saves_the_current_device_state_only(monkeypatch):
    node = FakeNode(monkeypatch, count=8, current=5)
    state = rng.capture_global_rng()
    assert isinstance(state["cuda"], torch.Tensor) and state["cuda_device"] == 5
    torch.testing.assert_close(state["cuda"], node.states[5], rtol=0, atol=0)


def test_resume_on_a_node_with_fewer_gpus(monkeypatch, caplog):
    # Saved on 8 GPUs, resumed on 4: the old restore (set_rng_state_all) raised IndexError here.
    state = _old_checkpoint_state(8)
    node = FakeNode(monkeypatch, count=4, current=3)
    with pytest.raises(IndexError):
        torch.cuda.set_rng_state_all(state["cuda"])  # the fake rejects it as torch does
    node.set_calls.clear()
    rng.restore_global_rng(state)
    assert node.set_calls == [3]
    torch.testing.assert_close(node.states[3], state["cuda"][3], rtol=0, atol=0)

    # New format, saved on device 6 of 8, resumed on device 1 of a 2-GPU node.
    saver = FakeNode(monkeypatch, count=8, current=6)
    new_state = rng.capture_global_rng()
    resumer = FakeNode(monkeypatch, count=2, current=1)
    rng.restore_global_rng(new_state)
    assert resumer.set_calls == [1]
    torch.testing.assert_close(resumer.states[1], saver.states[6], rtol=0, atol=0)

    # Old checkpoint with fewer entries than the current device index: the first entry, logged.
    short = _old_checkpoint_state(2)
    node = FakeNode(monkeypatch, count=4, current=3)
    with caplog.at_level(logging.INFO, logger="cdm_train.rng"):
        rng.restore_global_rng(short)
    assert node.set_calls == [3]
    torch.testing.assert_close(node.states[3], short["cuda"][0], rtol=0, atol=0)
    assert "none for device 3" in caplog.text


def test_resume_skips_missing_cuda_state(monkeypatch, caplog):
    node = FakeNode(monkeypatch, count=2)
    with caplog.at_level(logging.INFO, logger="cdm_train.rng"):
        rng.restore_global_rng(_old_checkpoint_state(0))  # an empty list
    assert node.set_calls == [] and "no CUDA RNG state" in caplog.text
    rng.restore_global_rng({"torch": torch.get_rng_state(), "numpy": np.random.get_state()})  # saved on CPU
    assert node.set_calls == []


def test_step_randomness_ignores_the_global_rng():
    # Why restoring only one device's global state is enough: training draws from derived generators.
    def draws():
        r = rng.step_random(seed=3, rank=1, step=7, device=torch.device("cpu"))
        return torch.rand(4, generator=r.host), torch.randn(4, generator=r.device), r.seeds

    torch.manual_seed(0)
    a = draws()
    torch.manual_seed(1)
    b = draws()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert a[2] == b[2]
    other = rng.step_random(seed=3, rank=2, step=7, device=torch.device("cpu"))
    assert not torch.equal(torch.rand(4, generator=other.host), a[0])  # the rank is part of the seed


def test_each_rank_draws_its_own_stream_and_a_step_replays_exactly():
    """Per-rank noise, trajectory indices and prompts come from (seed, rank, step): ranks differ, a
    resumed step (same seed, rank, step) draws the same numbers, and the seed changes everything."""
    from cdm_train.rng import step_random

    cpu = torch.device("cpu")

    def draws(seed, rank, step):
        r = step_random(seed, rank, step, cpu)
        return (torch.randint(0, 10**6, (8,), generator=r.host), torch.randn(8, generator=r.device),
                tuple(sorted(r.seeds.values())))

    base = draws(0, 0, 5)
    for other in (draws(0, 1, 5), draws(0, 0, 6), draws(1, 0, 5)):
        assert not torch.equal(base[0], other[0]) and not torch.equal(base[1], other[1]) and base[2] != other[2]
    again = draws(0, 0, 5)
    assert torch.equal(base[0], again[0]) and torch.equal(base[1], again[1]) and base[2] == again[2]
