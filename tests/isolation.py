"""A hard timeout for GPU tests: each `gpu`-marked test runs in a child pytest process that is killed when late.

Why a process and not a signal: the two-stream test hung on the H200 inside a CUDA wait (a C call that never
returns to the interpreter), where neither pytest-timeout's SIGALRM handler nor KeyboardInterrupt can run. A
child process can always be killed (SIGKILL to its whole process group), and the parent reports the test as
failed with the child's output, including the stacks faulthandler dumps shortly before the deadline (its
watchdog is a C thread, so it fires even while the main thread waits inside CUDA).

tests/conftest.py routes every `gpu` test through `run_isolated` (set CDM_GPU_TEST_ISOLATION=0 to run them
in-process, e.g. under a debugger). The deadline is the marker's `timeout_s` (`@pytest.mark.gpu(timeout_s=60)`)
or CDM_GPU_TEST_TIMEOUT_S (default 180 s).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

CHILD_ENV = "CDM_GPU_TEST_CHILD"
DEFAULT_TIMEOUT_S = 180.0
OUTPUT_TAIL = 6000  # characters of the child's output shown in a failure report


@dataclass
class Outcome:
    rc: int | None  # None when killed at the deadline
    timed_out: bool
    output: str
    seconds: float


def run_with_hard_timeout(argv: list[str], timeout_s: float, *, env: dict | None = None,
                          cwd: str | None = None) -> Outcome:
    """Run argv in a new session; at the deadline SIGKILL its whole process group (nothing can block that)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return Outcome(proc.returncode, False, out.decode(errors="replace"), time.monotonic() - t0)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own group (start_new_session): grandchildren too
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return Outcome(None, True, out.decode(errors="replace"), time.monotonic() - t0)


def timeout_for(item) -> float:
    marker = item.get_closest_marker("gpu")
    if marker is not None and "timeout_s" in marker.kwargs:
        return float(marker.kwargs["timeout_s"])
    return float(os.environ.get("CDM_GPU_TEST_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def should_isolate(item) -> bool:
    """A gpu test in the parent process, isolation not switched off."""
    return (item.get_closest_marker("gpu") is not None and os.environ.get(CHILD_ENV) != "1"
            and os.environ.get("CDM_GPU_TEST_ISOLATION", "1") != "0")


def child_argv(nodeid: str, timeout_s: float) -> list[str]:
    # faulthandler dumps every thread's stack a little before the kill, into the output the parent reports.
    dump_after = max(1, int(timeout_s * 0.9) - 2)
    return [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o",
            f"faulthandler_timeout={dump_after}", nodeid]


def report(outcome: Outcome, what: str, timeout_s: float) -> None:
    """Turn a child's outcome into this test's result: return (passed), pytest.skip or pytest.fail."""
    tail = outcome.output[-OUTPUT_TAIL:]
    if outcome.timed_out:
        pytest.fail(f"{what}: no result after {timeout_s:.0f} s; its process group was killed (a hang, e.g. a "
                    f"CUDA wait). Child output (stacks dumped before the kill):\n{tail}", pytrace=False)
    if outcome.rc != 0:
        pytest.fail(f"{what}: failed in its child process (exit {outcome.rc}):\n{tail}", pytrace=False)
    if re.search(r"\b\d+ passed\b", outcome.output) is None:
        reasons = re.findall(r"SKIPPED \[\d+\] [^\n]*?: ([^\n]*)", outcome.output)
        if reasons or re.search(r"\b\d+ skipped\b", outcome.output):
            pytest.skip(reasons[0] if reasons else "skipped in its child process")
        pytest.fail(f"{what}: the child process reported no result:\n{tail}", pytrace=False)


def run_isolated(item) -> None:
    timeout_s = timeout_for(item)
    env = dict(os.environ, **{CHILD_ENV: "1"})
    outcome = run_with_hard_timeout(child_argv(item.nodeid, timeout_s), timeout_s, env=env,
                                    cwd=str(item.config.rootpath))
    report(outcome, item.nodeid, timeout_s)
