"""Repository-wide pytest hooks (tests/ and benchmarks/ have their own conftest.py for everything else)."""

import shutil
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config):
    # tmp_path directories under one fresh base that is removed at the end (pytest's default keeps the last
    # three runs in /tmp/pytest-of-USER): a test run leaves nothing behind in /tmp. An explicit --basetemp stays.
    if config.option.basetemp is None:
        config._cdm_basetemp = tempfile.mkdtemp(prefix="cdm-pytest-")
        config.option.basetemp = config._cdm_basetemp


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    base = getattr(config, "_cdm_basetemp", None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
    # pytest-benchmark creates its storage directory (./.benchmarks) at start-up on every run, even when nothing
    # is saved: remove it again when it is empty, so a test run leaves nothing behind. A directory holding saved
    # runs (--benchmark-autosave / --benchmark-save) is not empty and stays.
    session = getattr(config, "_benchmarksession", None)
    path = getattr(getattr(session, "storage", None), "path", None)
    if isinstance(path, Path) and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
