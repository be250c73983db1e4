"""Capture safety on any device: fail loudly on what a CUDA-graph capture cannot hold.

A CUDA graph records kernel launches only. Inside a captured region:

- a **host sync** (``.item()``, ``.tolist()``, ``bool(t)``, ``torch.equal``, a device-to-host copy,
  ``torch.cuda.synchronize``) is illegal during capture, and even where it is not, the Python value it
  produced is frozen into the graph: every replay reuses the capture-time value;
- a **data-dependent shape** (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing,
  ``repeat_interleave`` with a tensor of repeats and no ``output_size``) needs the host to read the
  data to size the output: a sync, and a graph whose buffers fit one input only;
- a **host tensor** created inside the region (``torch.tensor([...])`` or a factory without ``device=``)
  lives outside the graph's private memory pool: on the GPU it is a host-to-device copy from pageable
  memory recorded with a fixed host address (or a capture error), so the region must create its
  tensors on its own device.

``CaptureSafetyMode`` finds all three without a GPU, by running the region's Python code on the CPU
(real values, so the model's own code paths run) under two interposers:

- a ``TorchFunctionMode`` for what happens above the dispatcher and would go unseen on the CPU
  (``Tensor.tolist`` / ``.cpu()`` / ``.numpy()`` on a CPU tensor dispatch no ATen op; factory calls
  whose device defaults to the host);
- a ``TorchDispatchMode`` for the ATen ops (``aten._local_scalar_dense`` is what every tensor-to-Python
  conversion ends in, ``aten.nonzero``, ``aten.index.Tensor`` with a boolean index, ...) and, when the
  region's device is known, any op output on another device (a device-to-host copy on the GPU).

``torch.cuda.synchronize`` / ``Stream.synchronize`` / ``Event.synchronize`` are not torch functions:
they are replaced by raising stubs while the mode is active (restored on exit).

What the CPU cannot show: allocator behaviour proper (on the GPU every allocation made during capture
comes from the graph's pool by construction, so "outside the pool" reduces to host tensors and
cross-device copies, which are checked) and anything inside an opaque kernel launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["CaptureSafetyError", "CaptureSafetyMode", "check_capture_safe", "capture_checked"]


class CaptureSafetyError(RuntimeError):
    """An operation a CUDA-graph capture cannot hold; ``op`` names it, ``reason`` says why."""

    def __init__(self, op: str, reason: str, where: str = "a region that a CUDA graph captures"):
        self.op = op
        self.reason = reason
        super().__init__(f"capture safety: {op} {reason} (inside {where})")


_SYNC = "syncs with the host (the value would be frozen into the graph)"
_DYNAMIC = "has a data-dependent output shape (host sync; the graph fits one input only)"

# ATen ops, by overload packet name (aten.<name>), that are never capturable.
_FORBIDDEN_ATEN: dict[str, str] = {
    "_local_scalar_dense": _SYNC + "; it is what .item() / float(t) / int(t) / bool(t) run",
    "is_nonzero": _SYNC + "; it is what bool(t) / `if t:` run",
    "equal": _SYNC + "; torch.equal returns a Python bool",
    "allclose": _SYNC + "; torch.allclose returns a Python bool",
    "nonzero": _DYNAMIC,
    "argwhere": _DYNAMIC,
    "masked_select": _DYNAMIC,
    "_unique": _DYNAMIC,
    "_unique2": _DYNAMIC,
    "unique_dim": _DYNAMIC,
    "unique_consecutive": _DYNAMIC,
    "unique_dim_consecutive": _DYNAMIC,
    "bincount": _DYNAMIC + " (its length is max(input) + 1)",
    "_pin_memory": "allocates pinned host memory (outside the graph's pool)",
}

# ATen ops that are data-dependent only for some arguments (boolean indices, no output_size).
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "_unsafe_index"}
_REPEAT_INTERLEAVE = "repeat_interleave"
_COPIES = {"_to_copy", "copy_", "copy", "_copy_from", "_copy_from_and_resize"}

# Tensor methods / torch functions that leave the device (no ATen op on a CPU tensor, so checked here).
_FORBIDDEN_METHODS: dict[Any, str] = {
    torch.Tensor.item: _SYNC,
    torch.Tensor.tolist: _SYNC,
    torch.Tensor.numpy: "copies to host memory (a device-to-host sync)",
    torch.Tensor.cpu: "copies to host memory (a device-to-host sync)",
    torch.Tensor.pin_memory: "allocates pinned host memory (outside the graph's pool)",
    torch.Tensor.__bool__: _SYNC,
    torch.Tensor.__int__: _SYNC,
    torch.Tensor.__float__: _SYNC,
    torch.Tensor.__index__: _SYNC,
    torch.Tensor.__complex__: _SYNC,
    torch.Tensor.__repr__: _SYNC + " (printing reads the values)",
    torch.Tensor.__format__: _SYNC + " (formatting reads the values)",
}

# Factories whose device defaults to the host: inside the region they must be given device=.
_FACTORIES = (torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye,
              torch.scalar_tensor, torch.empty_strided)
_FACTORY_NAMES = {f: f"torch.{f.__name__}" for f in _FACTORIES}

_CUDA_SYNCS = (("synchronize", torch.cuda), ("synchronize", torch.cuda.Stream), ("synchronize", torch.cuda.Event),
               ("empty_cache", torch.cuda))


def _method_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    return f"Tensor.{name}" if not name.startswith("torch.") else name


def _is_mask(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


class _FunctionChecks(TorchFunctionMode):
    def __init__(self, owner: CaptureSafetyMode):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _FORBIDDEN_METHODS.get(func)
        if reason is not None and not self.owner._fail(_method_name(func), reason):
            with self.owner._suspended():  # an allowed method: what it runs underneath is allowed too
                return func(*args, **kwargs)
        name = _FACTORY_NAMES.get(func)
        if name is not None and kwargs.get("device") is None and not self.owner._default_device_set():
            self.owner._fail(name, "without device= creates a host tensor (outside the graph's pool; on the GPU a "
                                   "host-to-device copy from a fixed host address)")
        return func(*args, **kwargs)


class _DispatchChecks(TorchDispatchMode):
    def __init__(self, owner: CaptureSafetyMode):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket.__name__
        op = f"aten.{func._schema.name.split('::')[-1]}" + (f".{func._overloadname}" if func._overloadname != "default"
                                                            else "")
        reason = _FORBIDDEN_ATEN.get(packet)
        if reason is not None:
            self.owner._fail(op, reason)
        if packet in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_mask(i) for i in indices or ()):
                self.owner._fail(op, "with a boolean mask index " + _DYNAMIC)
        if packet == _REPEAT_INTERLEAVE and func._overloadname in ("Tensor", "self_Tensor") \
                and kwargs.get("output_size") is None:
            self.owner._fail(op, "with a tensor of repeats and no output_size " + _DYNAMIC)
        device = self.owner.device
        if device is not None and packet in _COPIES:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            target = kwargs.get("device")
            if target is not None and any(t.device != torch.device(target) for t in tensors) \
                    or len({t.device for t in tensors}) > 1:
                self.owner._fail(op, "copies between devices (a host sync / memory outside the graph's pool)")
        out = func(*args, **kwargs)
        if device is not None:
            for t in tree_leaves(out):
                # 0-dim int64 outputs off the device are exempt: SDPA's flash / efficient kernels return their
                # (unused without dropout) Philox seed and offset as host scalars outside a capture, by design.
                if isinstance(t, torch.Tensor) and t.device != device and not (t.dim() == 0 and t.dtype == torch.int64):
                    self.owner._fail(op, f"puts a tensor on {t.device} inside a region that runs on {device} "
                                         "(a cross-device copy: a host sync / memory outside the graph's pool)")
        return out


class CaptureSafetyMode:
    """Context manager: raise `CaptureSafetyError` on the first capture-unsafe operation (module docstring).

    device: the device the region runs on; op outputs elsewhere are errors (None: not checked, e.g. a CPU
        run standing in for a GPU one, where the factory check covers host tensors).
    allow: names to let through (as they appear in the error, e.g. "aten.nonzero", "Tensor.item").
    where: how the region is named in the error message.
    """

    def __init__(self, device: torch.device | str | None = None, *, allow: Iterable[str] = (),
                 where: str = "a region that a CUDA graph captures"):
        self.device = torch.device(device) if device is not None else None
        self.allow = frozenset(allow)
        self.where = where
        self._stack: contextlib.ExitStack | None = None
        self._suspend_depth = 0

    def _fail(self, op: str, reason: str) -> bool:
        """Raise for `op` unless it is allowed (returns False) or checks are suspended."""
        if self._suspend_depth or op in self.allow or op.rsplit(".", 1)[0] in self.allow:
            return False  # ("aten.index" in allow lets aten.index.Tensor through)
        raise CaptureSafetyError(op, reason, self.where)

    @contextlib.contextmanager
    def _suspended(self):
        self._suspend_depth += 1
        try:
            yield
        finally:
            self._suspend_depth -= 1

    @staticmethod
    def _default_device_set() -> bool:
        get = getattr(torch, "get_default_device", None)
        return get is not None and get().type != "cpu"

    def _stub(self, name: str):
        def refuse(*_a, **_k):
            self._fail(name, "waits for the device on the host (illegal while a stream is capturing)")

        return refuse

    def __enter__(self) -> CaptureSafetyMode:
        stack = contextlib.ExitStack()
        for attr, owner in _CUDA_SYNCS:
            original = getattr(owner, attr)
            label = f"torch.cuda.{attr}" if owner is torch.cuda else f"torch.cuda.{owner.__name__}.{attr}"
            setattr(owner, attr, self._stub(label))
            stack.callback(setattr, owner, attr, original)
        stack.enter_context(_FunctionChecks(self))
        stack.enter_context(_DispatchChecks(self))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> bool:
        stack, self._stack = self._stack, None
        return bool(stack.__exit__(*exc)) if stack is not None else False


def _first_device(args: Any) -> torch.device | None:
    return next((t.device for t in tree_leaves(args) if isinstance(t, torch.Tensor)), None)


def check_capture_safe(fn: Callable[..., Any], *args, device: torch.device | str | None = "inputs",
                       allow: Iterable[str] = (), **kwargs) -> Any:
    """``fn(*args, **kwargs)`` without gradient under `CaptureSafetyMode`; returns its output.

    device="inputs" (default) takes the region's device from the first tensor argument; on the CPU that
    makes the cross-device check vacuous, and the host-tensor check rests on the factory rule.
    """
    if isinstance(device, str) and device == "inputs":
        device = _first_device((args, kwargs))
    with torch.no_grad(), CaptureSafetyMode(device, allow=allow):
        return fn(*args, **kwargs)


def capture_checked(fn: Callable[..., Any], *, where: str | None = None, allow: Iterable[str] = (),
                    calls: list | None = None) -> Callable[..., Any]:
    """`fn` wrapped so every call runs under `CaptureSafetyMode` (device from its inputs).

    calls: a list that gets one entry per checked call (so a test can assert the region really ran).
    """
    label = where or f"the captured region {getattr(fn, '__name__', type(fn).__name__)}"

    def checked(*args, **kwargs):
        device = _first_device((args, kwargs))
        with CaptureSafetyMode(device, allow=allow, where=label):
            out = fn(*args, **kwargs)
        if calls is not None:
            calls.append(label)
        return out

    return checked
