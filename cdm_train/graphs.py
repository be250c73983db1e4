"""Trainer side of the graph / overlap / compile switches (speed.cuda_graphs_teacher, ...; docs/graphs.md).

Everything is installed by wrapping the model adapter: ``GraphedAdapter`` routes the
no-grad calls of chosen models (real teacher, fake teacher's scoring calls, the student's
rollout) through a `GraphedForward` (one CUDA graph per input shape) or a compiled
callable, and everything else (every call with gradient, other models such as the EMA)
to the wrapped adapter unchanged. The fake teacher's training step and the student step
run with gradient, so they always take the eager (or regionally compiled) path.

On the CPU the wrappers are installed too but every call falls back to the eager path,
so the orchestration is exercised by the CPU tests and the results are identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from cdm_kernels.graphs import GraphedForward, raise_recompile_limit

from .cond import Cond, ModelAdapter

log = logging.getLogger("cdm_train")

# dynamo's recompile limit for compiled blocks and forwards: distinct graphs one block class can need in a run are
# student / fake / teacher (+ EMA sampler) x grad modes x (static, then dynamic batch) x the block's own variants
# (SD3's last block), and every rollout batch size for a static-shape compiled rollout. 8 (the default) is too low.
RECOMPILE_LIMIT = 64


class GraphedAdapter:
    """An adapter that sends no-grad calls of selected models through per-model callables."""

    def __init__(self, base: ModelAdapter):
        self.base = base
        self._routes: list[tuple[torch.nn.Module, Callable[..., torch.Tensor]]] = []

    def route(self, model: torch.nn.Module, fn: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]) -> None:
        """No-grad calls ``adapter(model, x, sigma, cond)`` become ``fn(x, sigma, cond)``."""
        self._routes = [(m, f) for m, f in self._routes if m is not model] + [(model, fn)]

    def routed(self, model: torch.nn.Module):
        return next((f for m, f in self._routes if m is model), None)

    def __call__(self, model, x, sigma, cond):
        if not torch.is_grad_enabled():
            fn = self.routed(model)
            if fn is not None:
                return fn(x, sigma, cond)
        return self.base(model, x, sigma, cond)

    def uncond(self, cond):
        return self.base.uncond(cond)

    def __getattr__(self, name: str) -> Any:  # null_cond, null_class, ... of the wrapped adapter
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def _bound(adapter: ModelAdapter, model: torch.nn.Module):
    return lambda x, sigma, cond: adapter(model, x, sigma, cond)


class CompiledForward:
    """``torch.compile(mode="reduce-overhead")`` of a no-grad forward (inductor's CUDA graph trees).

    Static shapes (one compiled graph per batch size, like the captured graphs); outputs
    are cloned because the graph trees overwrite them on the next replay. On the CPU it
    calls the forward eagerly unless a backend is forced (tests use "eager").
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, backend: str | None = None):
        self.fn = fn
        self.backend = backend
        self._compiled = None

    def __call__(self, x, sigma, cond):
        if self.backend is None and x.device.type != "cuda":
            return self.fn(x, sigma, cond)
        if self._compiled is None:
            raise_recompile_limit(RECOMPILE_LIMIT)
            kwargs = {"mode": "reduce-overhead"} if self.backend in (None, "inductor") else {}
            self._compiled = torch.compile(self.fn, backend=self.backend or "inductor", dynamic=False, **kwargs)
        if x.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        out = self._compiled(x, sigma, cond)
        return out.clone()


def apply_graph_switches(cfg, models, *, compile_backend: str | None = None,
                         simulate: bool = False) -> GraphedAdapter | None:
    """Install the graph switches of cfg.speed on `models` (in place); returns the adapter wrapper.

    compile_backend: for rollout_graph_mode=compile: None = inductor on CUDA, no compile on the CPU; a name
    (e.g. "eager") forces that torch.compile backend on any device (tests). simulate: GraphedForward bookkeeping without
    CUDA graphs (tests). speed.overlap_teacher_calls needs nothing installed: steps.py reads it.
    """
    sp = cfg.speed
    if not (sp.cuda_graphs_teacher or sp.rollout_graphs):
        return None
    base = models.adapter.base if isinstance(models.adapter, GraphedAdapter) else models.adapter
    wrapper = GraphedAdapter(base)
    if sp.cuda_graphs_teacher:
        # Separate pools: the real and fake graphs may replay at the same time on two streams.
        wrapper.route(models.teacher, GraphedForward(_bound(base, models.teacher), name="real teacher",
                                                     simulate=simulate))
        wrapper.route(models.fake, GraphedForward(_bound(base, models.fake), name="fake teacher (no grad)",
                                                  simulate=simulate))
    if sp.rollout_graphs:
        if sp.rollout_graph_mode == "compile":
            wrapper.route(models.student, CompiledForward(_bound(base, models.student), backend=compile_backend))
        else:
            wrapper.route(models.student, GraphedForward(_bound(base, models.student), name="student rollout",
                                                         simulate=simulate))
    models.adapter = wrapper
    return wrapper


def graph_stats(models) -> dict[str, Any]:
    """Captures / replays / eager calls of every installed GraphedForward (for logs and benchmarks)."""
    adapter = models.adapter
    if not isinstance(adapter, GraphedAdapter):
        return {}
    out = {}
    for _model, fn in adapter._routes:
        if isinstance(fn, GraphedForward):
            s = fn.stats
            out[fn.name] = {"graphs": fn.num_graphs, "captures": s.captures, "replays": s.replays,
                            "eager_calls": s.eager_calls, "failed": s.failed}
    return out
