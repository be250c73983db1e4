"""pytest set-up of the pytest-benchmark suite (benchmarks/test_bench_*.py; see docs/benchmarks.md "Microbenchmarks").

Not collected by a plain `pytest` (pyproject's testpaths is tests/); `make test` runs it with
--benchmark-disable, where every benchmark body runs once as a correctness test.
"""

import os
import tempfile

# A fresh inductor cache per session, removed at exit (as tests/conftest.py): compile(reference) is timed
# and checked from scratch, and nothing is left behind in /tmp.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    _inductor_cache = tempfile.mkdtemp(prefix="cdm-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, True)


def pytest_addoption(parser):
    group = parser.getgroup("cdm-kernels microbenchmarks")
    group.addoption("--bench-shape", default="",
                    help="comma-separated tensor shape of the op benchmarks (default: 4,16,64,64 on CPU, "
                         "16,16,128,128 = SD3 1024 px batch 16 on CUDA; with --benchmark-disable 3,5,17,19)")
    group.addoption("--bench-dtype", default="", choices=["", "float32", "bfloat16", "float16"],
                    help="dtype of the op benchmarks (default: float32 on CPU, bfloat16 on CUDA)")
