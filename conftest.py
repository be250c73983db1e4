"""Repository-wide pytest hooks (tests/ and benchmarks/ have their own conftest.py for everything else)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# A test run leaves nothing behind in /tmp: every temporary file of this process and its children goes under one
# fresh directory, removed at the end. TMPDIR covers what finds /tmp through tempfile (inductor's C++
# precompiled headers in /tmp/torchinductor_USER, gloo stores, subprocesses); set before torch is imported.
_SESSION_TMP = tempfile.mkdtemp(prefix="cdm-pytest-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_configure(config):
    # tmp_path directories there too (pytest's default keeps the last three runs in /tmp/pytest-of-USER).
    # An explicit --basetemp stays.
    if config.option.basetemp is None:
        config.option.basetemp = os.path.join(_SESSION_TMP, "basetemp")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
    # pytest-benchmark creates its storage directory (./.benchmarks) at start-up on every run, even when nothing
    # is saved: remove it again when it is empty, so a test run leaves nothing behind. A directory holding saved
    # runs (--benchmark-autosave / --benchmark-save) is not empty and stays.
    session = getattr(config, "_benchmarksession", None)
    path = getattr(getattr(session, "storage", None), "path", None)
    if isinstance(path, Path) and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
