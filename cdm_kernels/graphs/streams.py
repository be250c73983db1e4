"""Run two independent GPU workloads concurrently on two CUDA streams, without a host sync.

``run_concurrently(main_fn, side_fn, device=...)`` returns ``(main_fn(), side_fn())``. On
CUDA the side workload is enqueued first on a side stream that waits for everything
already queued on the current ("main") stream (its inputs were produced there); the main
workload is then enqueued on the main stream; finally the main stream waits for the side
stream (an event, not a host sync), so whatever the caller does next on the main stream
sees both results. Tensors returned by ``side_fn`` were allocated on the side stream and
are about to be used on the main stream: ``record_stream(main)`` tells the caching
allocator not to hand their memory to another side-stream allocation before the main
stream is done with them. Inputs need no ``record_stream``: they stay referenced by the
closures until the main stream has joined the side stream, and every later free happens
in main-stream order after that join.

Grad mode and autocast are thread-local, so both callables run under the caller's
settings. Without CUDA, for CPU devices, or while a CUDA graph is being captured, the two
callables simply run one after the other (side first, as on the GPU, so any lazy
initialisation happens in the same order).

**No capture inside a concurrent region.** A first CUDA-graph capture inside either callable
runs ``torch.cuda.graph``'s device-wide synchronize / ``empty_cache`` and a global-mode capture
while the other stream holds queued work and cross-stream event waits, on a warm-up stream that
may alias the side stream (``torch.cuda.Stream()`` hands out pool streams round-robin): the
suspected cause of the two-stream hang seen on the H200 (docs/graphs.md). So both callables
run inside a *concurrent region* (on every device, the sequential fallback included, so the
CPU tests see the same rule), and a ``GraphedForward`` asked to capture there raises
``CaptureInConcurrentRegionError`` before it enqueues anything. Capture first (``prepare``),
or call ``run_overlapped``, which runs a call that would capture sequentially, outside any
region, and overlaps the later ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .graphed import flatten
from .region import CaptureInConcurrentRegionError, concurrent_region, in_concurrent_region  # noqa: F401

A = TypeVar("A")
B = TypeVar("B")

log = logging.getLogger("cdm_kernels.graphs")

_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device | int | None = None) -> torch.cuda.Stream:
    """The (lazily created, reused) side stream of a CUDA device."""
    if device is None:
        index = torch.cuda.current_device()
    else:
        d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = d.index if d.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = torch.cuda.Stream(device=index)
        _side_streams[index] = stream
    return stream


def concurrency_available(device: torch.device | str | None) -> bool:
    """True when run_concurrently would really use two streams on `device`."""
    if device is None or not torch.cuda.is_available():
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return not torch.cuda.is_current_stream_capturing()


def run_sequentially(main_fn: Callable[[], A], side_fn: Callable[[], B], **_: Any) -> tuple[A, B]:
    """The fallback of run_concurrently (same call order, same results; no concurrent region)."""
    side = side_fn()
    return main_fn(), side


def run_concurrently(main_fn: Callable[[], A], side_fn: Callable[[], B], *,
                     device: torch.device | str | None = None) -> tuple[A, B]:
    """(main_fn(), side_fn()) with side_fn on a side CUDA stream, overlapping main_fn (see module docstring).

    Raises CaptureInConcurrentRegionError if either callable would capture a CUDA graph (capture first).
    """
    if not concurrency_available(device):
        # Same rule as on the GPU: a capture here would be one there (tests run this path on the CPU).
        with concurrent_region():
            return run_sequentially(main_fn, side_fn)
    device = torch.device(device)
    with torch.cuda.device(device), concurrent_region():
        main = torch.cuda.current_stream(device)
        side = side_stream(device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                side_out = side_fn()
            main_out = main_fn()
        finally:
            main.wait_stream(side)
        leaves, _ = flatten(side_out)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                t.record_stream(main)
    return main_out, side_out


def run_overlapped(main_fn: Callable[[], A], side_fn: Callable[[], B], *,
                   device: torch.device | str | None = None) -> tuple[A, B]:
    """run_concurrently, except that a call which would capture a graph runs sequentially instead.

    For pure callables (no side effects besides their results: the teacher forwards). The refusal is
    raised before the capturing helper enqueues anything; whatever the callables had queued is dropped
    (the side stream has been joined) and both run again one after the other outside any region, where
    the missing graphs are captured. Later calls with the same signatures overlap.
    """
    try:
        return run_concurrently(main_fn, side_fn, device=device)
    except CaptureInConcurrentRegionError as exc:
        log.debug("run_overlapped: capturing outside the concurrent region first (%s)", exc)
        return run_sequentially(main_fn, side_fn)
