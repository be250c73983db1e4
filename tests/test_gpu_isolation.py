"""The hard timeout of the GPU tests (tests/isolation.py), checked on the CPU with children that hang."""

from __future__ import annotations

import os
import sys
import time

import pytest

from .isolation import CHILD_ENV, Outcome, child_argv, report, run_with_hard_timeout, should_isolate, timeout_for

# A child that cannot be stopped politely: SIGTERM and SIGINT ignored (as a thread blocked inside a CUDA wait
# never runs a Python signal handler), plus a grandchild that would outlive a kill of the child alone. It
# prints both pids, then waits forever.
HUNG = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
print(os.getpid(), grandchild.pid, flush=True)
while True:
    time.sleep(10**6)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by its parent) counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hung_child_is_killed_at_the_deadline_and_reported_as_failure():
    t0 = time.monotonic()
    outcome = run_with_hard_timeout([sys.executable, "-c", HUNG], timeout_s=3.0)
    elapsed = time.monotonic() - t0
    assert outcome.timed_out and outcome.rc is None
    assert 3.0 <= elapsed < 20.0
    child, grandchild = (int(p) for p in outcome.output.split()[:2])
    deadline = time.monotonic() + 5.0
    while (_alive(child) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)  # the whole process group is gone
    with pytest.raises(pytest.fail.Exception, match="no result after 3 s"):
        report(outcome, "tests/x.py::test_hang", 3.0)


def test_finished_children_pass_fail_or_skip():
    ok = run_with_hard_timeout([sys.executable, "-c", "print('1 passed in 0.1s')"], timeout_s=60)
    assert not ok.timed_out and ok.rc == 0
    report(ok, "t", 60)  # passes: no exception
    bad = run_with_hard_timeout([sys.executable, "-c", "import sys; print('boom'); sys.exit(1)"], timeout_s=60)
    with pytest.raises(pytest.fail.Exception, match="exit 1"):
        report(bad, "t", 60)
    skipped = Outcome(0, False, "SKIPPED [1] tests/test_x.py:12: needs diffusers\n1 skipped in 0.2s", 0.1)
    with pytest.raises(pytest.skip.Exception, match="needs diffusers"):
        report(skipped, "t", 60)
    silent = Outcome(0, False, "no tests ran", 0.1)
    with pytest.raises(pytest.fail.Exception, match="no result"):
        report(silent, "t", 60)


class _Marker:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _Item:
    def __init__(self, marker):
        self.marker = marker

    def get_closest_marker(self, name):
        return self.marker if name == "gpu" else None


def test_only_gpu_tests_in_the_parent_are_isolated(monkeypatch):
    monkeypatch.delenv(CHILD_ENV, raising=False)
    monkeypatch.delenv("CDM_GPU_TEST_ISOLATION", raising=False)
    monkeypatch.setenv("CDM_GPU_TEST_TIMEOUT_S", "77")
    gpu, cpu = _Item(_Marker()), _Item(None)
    assert should_isolate(gpu) and not should_isolate(cpu)
    assert timeout_for(gpu) == 77 and timeout_for(_Item(_Marker(timeout_s=9))) == 9
    monkeypatch.setenv(CHILD_ENV, "1")  # inside the child: run the test itself
    assert not should_isolate(gpu)
    monkeypatch.delenv(CHILD_ENV)
    monkeypatch.setenv("CDM_GPU_TEST_ISOLATION", "0")
    assert not should_isolate(gpu)
    argv = child_argv("tests/test_graphs.py::test_gpu_x[True]", 100)
    assert argv[-1] == "tests/test_graphs.py::test_gpu_x[True]" and "faulthandler_timeout=88" in argv
