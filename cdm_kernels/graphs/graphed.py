"""CUDA-graph capture of no-grad forwards: one graph per input shape, live parameters, eager fallback.

``GraphedForward(fn)`` behaves like ``fn`` (a forward that takes tensors, dicts/lists of
tensors and plain values). On CUDA and without gradient it copies the inputs into static
buffers and replays a CUDA graph captured for those shapes; otherwise it calls ``fn``.

Design points (why, not what):

- **One graph per distinct input signature** (tensor shapes, dtypes, devices, the
  structure of dict/list inputs, plain values, the autocast state), held in a small LRU
  cache (`ShapeKeyedCache`). The rollout's batch shrinks as samples leave early, so a
  model sees a handful of batch sizes; each gets its own graph.
- **Warm-up on a side stream before capture**: Triton autotuning, cuBLAS workspace and
  lazy module initialisation must happen outside the capture (they allocate, sync or
  launch benchmark kernels), as `torch.cuda.graph` requires.
- **Shared memory pool**: every graph of one `GraphedForward` captures into one private
  pool (`torch.cuda.graph_pool_handle()`), so the graphs for several batch sizes reuse
  each other's intermediate memory. That is safe because the graphs of one helper are
  never replayed concurrently; two helpers whose graphs run at the same time on two
  streams (real and fake teacher) must NOT share a pool, so each helper owns its own
  unless `pool=` is passed.
- **Live parameters**: a graph reads parameters by address. An optimizer step, an EMA
  `lerp_`, `load_state_dict` all update parameters in place, so a replay sees the new
  weights. Replacing a parameter tensor (``module.weight = ...``, ``.to(dtype)``) would
  not be seen: call ``reset()`` after such a change.
- **Autocast weight cache**: autocast caches the bf16 copy of fp32 leaf parameters that
  require grad (the fake teacher's) for the duration of the autocast region. A capture
  that hit that cache would bake a stale, later freed, bf16 copy into the graph, so the
  warm-up and the capture run with ``cache_enabled=False``: the cast kernel is part of
  the graph and re-reads the live fp32 weights on every replay.
- **RNG**: forwards need no random numbers (dropout is off in eval and in these
  transformers), so no generator state is registered with the graph. A captured
  function that did draw random numbers would replay with Philox offsets that PyTorch
  advances per replay for the default CUDA generator only (graph-safe RNG); custom
  generators would have to be registered with ``graph.register_generator_state``.
- **Outputs are cloned** by default: the static output buffers are overwritten by the
  next replay of the same graph (the unbatched teacher path calls the same shape
  several times in a row).
- **Eager fallback**: CPU tensors, gradient enabled (graphs here hold no autograd
  state), a capture already under way, or a failed capture (logged once, then the helper
  stays eager) all call ``fn`` directly.

- **Never captured concurrently**: a capture synchronizes the device, empties the allocator
  cache and puts the process in global capture mode. Inside ``run_concurrently`` (a
  *concurrent region*, marked on every device) a signature without a graph raises
  ``CaptureInConcurrentRegionError`` before anything is enqueued: capture first with
  ``prepare(...)`` (or let ``run_overlapped`` run that call sequentially). Replays are fine there.
- **One warm-up stream per device**, created once: ``torch.cuda.Stream()`` hands out pool
  streams round-robin, so a fresh one per capture could alias run_concurrently's side stream.

``simulate=True`` runs the same bookkeeping on any device without CUDA graphs (static
buffers, cache, replays that recompute into the static outputs): it exists so that the
orchestration is testable on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .region import CaptureInConcurrentRegionError, in_concurrent_region

log = logging.getLogger("cdm_kernels.graphs")

_warmup_streams: dict[int, torch.cuda.Stream] = {}


def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _warmup_streams:
        _warmup_streams[index] = torch.cuda.Stream(device=index)
    return _warmup_streams[index]

_LEAF = "leaf"


# --------------------------------------------------------------------------------------------- pytree helpers
def flatten(obj: Any) -> tuple[list[Any], Any]:
    """(leaves, structure) for nested dicts/lists/tuples; the structure is hashable."""
    leaves: list[Any] = []

    def walk(o):
        if isinstance(o, dict):
            keys = tuple(o.keys())
            return ("dict", keys, tuple(walk(o[k]) for k in keys))
        if isinstance(o, (list, tuple)):
            return ("list" if isinstance(o, list) else "tuple", len(o), tuple(walk(v) for v in o))
        leaves.append(o)
        return _LEAF

    structure = walk(obj)
    return leaves, structure


def unflatten(structure: Any, leaves: list[Any]) -> Any:
    it = iter(leaves)

    def build(s):
        if s == _LEAF:
            return next(it)
        kind, meta, children = s
        if kind == "dict":
            return {k: build(c) for k, c in zip(meta, children)}
        values = [build(c) for c in children]
        return values if kind == "list" else tuple(values)

    return build(structure)


def _autocast_state() -> tuple:
    if not hasattr(torch, "get_autocast_dtype"):  # pragma: no cover - old torch
        return (torch.is_autocast_enabled(),)
    return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def input_key(leaves: list[Any], structure: Any) -> Hashable:
    """The signature one graph is valid for: structure, per-leaf tensor meta or plain value, autocast."""
    meta = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            meta.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
                meta.append(("V", type(leaf).__name__, leaf))
            except TypeError:
                meta.append(("V", type(leaf).__name__, repr(leaf)))
    return (structure, tuple(meta), _autocast_state())


# --------------------------------------------------------------------------------------------- the cache
class ShapeKeyedCache:
    """A small LRU map from input signatures to captured graphs; evicting drops the graph."""

    def __init__(self, max_entries: int = 32):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def keys(self):
        return list(self._items.keys())


# --------------------------------------------------------------------------------------------- graphed forward
@dataclass
class _Entry:
    static_inputs: list[Any]  # leaves; tensors are the static buffers
    structure: Any
    output_leaves: list[Any]
    output_structure: Any
    run: Callable[[], None]  # graph.replay (or the simulated replay)
    replays: int = 0


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_calls: int = 0
    eager_reasons: dict[str, int] = field(default_factory=dict)
    failed: str | None = None


def _no_cache_autocast():
    """The current autocast state with its weight cache off (see module docstring)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class GraphedForward:
    """Call `fn` through one CUDA graph per input signature (no-grad forwards); eager otherwise.

    fn: the forward, ``fn(*args, **kwargs)`` with tensors / dicts / lists of tensors and plain
        values as arguments; returns a tensor or a dict/list/tuple of tensors.
    pool: a `torch.cuda.graph_pool_handle()` to share with other helpers that are never
        replayed concurrently with this one (default: a private pool per helper).
    warmup_iters: eager calls on a side stream before the first capture of each signature.
    max_graphs: LRU capacity of the signature cache.
    clone_outputs: return copies of the static outputs (safe default; see module docstring).
    enabled: False forces the eager path (an off switch that keeps call sites unchanged).
    simulate: run the capture/replay bookkeeping without CUDA graphs (testing on CPU).
    """

    def __init__(self, fn: Callable[..., Any], *, name: str = "forward", pool=None, warmup_iters: int = 2,
                 max_graphs: int = 32, clone_outputs: bool = True, enabled: bool = True, simulate: bool = False):
        self.fn = fn
        self.name = name
        self.pool = pool
        self.warmup_iters = int(warmup_iters)
        self.clone_outputs = clone_outputs
        self.enabled = enabled
        self.simulate = simulate
        self.cache = ShapeKeyedCache(max_graphs)
        self.stats = GraphStats()
        self._logged: set[str] = set()

    # ------------------------------------------------------------------------------------- public
    def __call__(self, *args, **kwargs):
        leaves, structure = flatten((args, kwargs))
        reason = self.eager_reason(leaves)
        if reason is not None:
            self.stats.eager_calls += 1
            self.stats.eager_reasons[reason] = self.stats.eager_reasons.get(reason, 0) + 1
            self._log_once(reason, logging.DEBUG)
            return self.fn(*args, **kwargs)
        key = input_key(leaves, structure)
        entry = self.cache.get(key)
        if entry is None:
            if in_concurrent_region():
                raise CaptureInConcurrentRegionError(
                    f"GraphedForward {self.name!r}: no CUDA graph yet for this input signature, and a capture "
                    f"inside run_concurrently can hang the GPU (device synchronize and global capture mode "
                    f"while the other stream holds work; docs/graphs.md). Call .prepare(...) with inputs of "
                    f"this signature before the concurrent region, or use run_overlapped.")
            try:
                entry = self._capture(leaves, structure)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: stay eager
                self.stats.failed = f"{type(exc).__name__}: {exc}"
                self.cache.clear()
                self._log_once(f"CUDA-graph capture of {self.name} failed, running eagerly from now on: "
                               f"{self.stats.failed}", logging.WARNING)
                self.stats.eager_calls += 1
                return self.fn(*args, **kwargs)
            self.cache.put(key, entry)
            self.stats.captures += 1
        return self._replay(entry, leaves)

    def eager_reason(self, leaves: list[Any]) -> str | None:
        """Why this call runs eagerly (None: it is replayed from a graph)."""
        if not self.enabled:
            return "disabled"
        if self.stats.failed is not None:
            return "capture failed earlier"
        if torch.is_grad_enabled():
            return "gradient enabled (graphs hold no-grad forwards only)"
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not tensors:
            return "no tensor inputs"
        if self.simulate:
            return None
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in tensors):
            return "not on CUDA"
        if len({t.device for t in tensors}) > 1:
            return "inputs on several devices"
        if torch.cuda.is_current_stream_capturing():
            return "a capture is already under way"
        return None

    def would_capture(self, *args, **kwargs) -> bool:
        """Whether a call with these arguments would capture a new graph (no side effect)."""
        leaves, structure = flatten((args, kwargs))
        if self.eager_reason(leaves) is not None:
            return False
        return input_key(leaves, structure) not in self.cache.keys()

    def prepare(self, *args, **kwargs) -> bool:
        """Warm up and capture the graph for this input signature now (outside any concurrent region).

        Returns True if a graph was captured. Call it before overlapping replays. Runs without gradient
        (graphs hold no-grad forwards); the output is discarded.
        """
        with torch.no_grad():
            if not self.would_capture(*args, **kwargs):
                return False
            captures = self.stats.captures
            self(*args, **kwargs)
            return self.stats.captures > captures

    def reset(self) -> None:
        """Drop every graph (after replacing parameter tensors, or to free their memory)."""
        self.cache.clear()
        self.stats.failed = None

    @property
    def num_graphs(self) -> int:
        return len(self.cache)

    # ------------------------------------------------------------------------------------- internals
    def _log_once(self, message: str, level: int) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.log(level, "%s: %s", self.name, message)

    def _capture(self, leaves: list[Any], structure: Any) -> _Entry:
        static = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        args, kwargs = unflatten(structure, static)
        if self.simulate:
            out_leaves, out_structure = flatten(self.fn(*args, **kwargs))
            out_leaves = [o.clone() if isinstance(o, torch.Tensor) else o for o in out_leaves]

            def run():
                fresh, _ = flatten(self.fn(*args, **kwargs))
                for o, n in zip(out_leaves, fresh):
                    if isinstance(o, torch.Tensor):
                        o.copy_(n)

            return _Entry(static, structure, out_leaves, out_structure, run)

        device = next(t.device for t in static if isinstance(t, torch.Tensor))
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(device):
            main = torch.cuda.current_stream(device)
            side = _warmup_stream(device)
            side.wait_stream(main)
            with torch.cuda.stream(side), _no_cache_autocast():
                for _ in range(self.warmup_iters):
                    self.fn(*args, **kwargs)
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with _no_cache_autocast(), torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*args, **kwargs)
        out_leaves, out_structure = flatten(out)
        if not all(isinstance(o, torch.Tensor) for o in out_leaves):
            raise TypeError("a graphed forward must return tensors (or dicts/lists/tuples of tensors)")
        return _Entry(static, structure, out_leaves, out_structure, graph.replay)

    def _replay(self, entry: _Entry, leaves: list[Any]):
        for buf, new in zip(entry.static_inputs, leaves):
            if isinstance(buf, torch.Tensor) and buf is not new:
                buf.copy_(new)
        entry.run()
        entry.replays += 1
        self.stats.replays += 1
        outs = [o.clone() if self.clone_outputs and isinstance(o, torch.Tensor) else o for o in entry.output_leaves]
        return unflatten(entry.output_structure, outs)
