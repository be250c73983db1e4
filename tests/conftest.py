"""Test set-up shared by every test module.

Without CUDA, Triton kernels run through the interpreter on CPU tensors: the env var
must be set before triton decorates any kernel, i.e. before cdm_kernels.ops imports.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh inductor cache per session: stale compiled artefacts must never mask a bug. Removed at exit
# (tests leave nothing behind in /tmp); subprocesses inherit the variable and finish before we do.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    _inductor_cache = tempfile.mkdtemp(prefix="cdm-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, True)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    # Every GPU test runs in a child process under a hard deadline (tests/isolation.py): a hang inside CUDA
    # cannot be interrupted from within the process, and must fail the test instead of the whole run.
    from .isolation import run_isolated, should_isolate

    if should_isolate(pyfuncitem):
        run_isolated(pyfuncitem)
        return True
    return None


@pytest.fixture(autouse=True)
def _reset_backend():
    import cdm_kernels

    previous = cdm_kernels.get_backend()
    yield
    cdm_kernels.set_backend(previous)
