"""Repository-wide pytest hooks (tests/ and benchmarks/ have their own conftest.py for everything else)."""

from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # pytest-benchmark creates its storage directory (./.benchmarks) at start-up on every run, even when nothing
    # is saved: remove it again when it is empty, so a test run leaves nothing behind. A directory holding saved
    # runs (--benchmark-autosave / --benchmark-save) is not empty and stays.
    session = getattr(config, "_benchmarksession", None)
    path = getattr(getattr(session, "storage", None), "path", None)
    if isinstance(path, Path) and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
