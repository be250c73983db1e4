"""CUDA-graph capture, two-stream overlap, regional compile and capture-safety helpers (see docs/graphs.md).

Everything here falls back to plain eager calls on the CPU, so call sites need no
device checks.
"""

from .capture_safety import CaptureSafetyError, CaptureSafetyMode, capture_checked, check_capture_safe
from .checkpointing import checkpoint_blocks, checkpoint_policy
from .graphed import GraphedForward, GraphStats, ShapeKeyedCache, flatten, input_key, unflatten
from .region import CaptureInConcurrentRegionError, concurrent_region, in_concurrent_region
from .regional import compile_blocks, find_blocks, is_compiled, raise_recompile_limit
from .streams import concurrency_available, run_concurrently, run_overlapped, run_sequentially, side_stream

__all__ = [
    "GraphedForward",
    "GraphStats",
    "ShapeKeyedCache",
    "flatten",
    "unflatten",
    "input_key",
    "compile_blocks",
    "find_blocks",
    "is_compiled",
    "raise_recompile_limit",
    "checkpoint_blocks",
    "checkpoint_policy",
    "run_concurrently",
    "run_overlapped",
    "CaptureInConcurrentRegionError",
    "concurrent_region",
    "in_concurrent_region",
    "run_sequentially",
    "concurrency_available",
    "side_stream",
    "CaptureSafetyError",
    "CaptureSafetyMode",
    "check_capture_safe",
    "capture_checked",
]
