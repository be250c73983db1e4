"""The concurrent region: where run_concurrently's callables run, and no CUDA graph may be captured.

Its own module so that graphed.py (which refuses the capture) and streams.py (which marks the
region) need not import each other.
"""

from __future__ import annotations

import contextlib
import threading

# Depth of nested concurrent regions, per thread (run_concurrently may be called from several threads).
_region = threading.local()


class CaptureInConcurrentRegionError(RuntimeError):
    """A CUDA-graph capture was requested inside run_concurrently (refused: it can hang the GPU)."""


def in_concurrent_region() -> bool:
    """True inside run_concurrently's callables (a capture there is refused)."""
    return getattr(_region, "depth", 0) > 0


@contextlib.contextmanager
def concurrent_region():
    """Mark the calls inside as overlapping another stream's work: no graph may be captured there."""
    _region.depth = getattr(_region, "depth", 0) + 1
    try:
        yield
    finally:
        _region.depth -= 1
