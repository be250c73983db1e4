"""Backend selection: which implementation of each op runs.

Backends: "reference" (plain PyTorch, always available), "triton" (fused kernels on
CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1), "cpp" (C++ CPU extension,
when built), and "auto" (triton on CUDA, cpp or else reference on CPU).

Accelerated backends register their ops here when `cdm_kernels.ops` is imported (done
lazily on first use, so `import cdm_kernels` stays cheap and never needs triton).
The selection is a plain module global, not a ContextVar, so torch.compile traces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("cdm_kernels")

BACKENDS = ("auto", "reference", "triton", "cpp")


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    # supports(device, dtype) -> bool: whether this backend can run the op on these inputs.
    supports: Callable[[torch.device, torch.dtype], bool]


_IMPLS: dict[str, dict[str, _Impl]] = {"reference": {}, "triton": {}, "cpp": {}}
_state = {"backend": os.environ.get("CDM_KERNELS_BACKEND", "auto"), "loaded": False}
if _state["backend"] not in BACKENDS:
    raise ValueError(f"CDM_KERNELS_BACKEND must be one of {BACKENDS}, got {_state['backend']!r}")


def register(backend: str, op: str, fn: Callable, supports: Callable | None = None) -> None:
    """Register `fn` as `backend`'s implementation of `op` (used by cdm_kernels.ops)."""
    if backend not in _IMPLS:
        raise ValueError(f"unknown backend {backend!r}")
    _IMPLS[backend][op] = _Impl(fn, supports or (lambda device, dtype: True))


def _load_accelerated() -> None:
    if _state["loaded"]:
        return
    _state["loaded"] = True
    try:
        import cdm_kernels.ops  # noqa: F401  (registers triton/cpp implementations)
    except Exception as exc:  # an accelerated backend must never break the reference path
        log.warning("cdm_kernels: accelerated ops unavailable (%s: %s); using reference", type(exc).__name__,
                    exc)


def available_backends(op: str | None = None) -> list[str]:
    _load_accelerated()
    names = []
    for name, impls in _IMPLS.items():
        if op is None and impls or op is not None and op in impls:
            names.append(name)
    return names


def get_backend() -> str:
    return _state["backend"]


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the ops inside with backend `name` ("auto" | "reference" | "triton" | "cpp")."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = _state["backend"]
    _state["backend"] = name
    try:
        yield
    finally:
        _state["backend"] = previous


@contextlib.contextmanager
def accepting_any_device(name: str):
    """Backend `name`'s ops accept tensors on any device and dtype (CPU, fake) while this is active: for
    recording kernels ahead of time (compile_check) or running their fake kernels (the cost model), never for
    real launches."""
    _load_accelerated()
    impls = _IMPLS[name]
    saved = dict(impls)
    for op, impl in saved.items():
        impls[op] = _Impl(impl.fn, lambda device, dtype: True)
    try:
        yield
    finally:
        impls.clear()
        impls.update(saved)


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The implementation of `op` for inputs on `device` with `dtype` under the current backend."""
    name = _state["backend"]
    if name == "reference":
        return _IMPLS["reference"][op].fn
    _load_accelerated()
    if name == "auto":
        order = ("triton",) if device.type == "cuda" else ("cpp", "triton_interpret")
        for candidate in order:
            if candidate == "triton_interpret":
                # Interpreted Triton is for testing, never faster than the reference: auto skips it.
                continue
            impl = _IMPLS[candidate].get(op)
            if impl is not None and impl.supports(device, dtype):
                return impl.fn
        return _IMPLS["reference"][op].fn
    impl = _IMPLS[name].get(op)
    if impl is None:
        raise RuntimeError(f"backend {name!r} has no implementation of {op!r} here "
                           f"(available for {op}: {available_backends(op)})")
    if not impl.supports(device, dtype):
        hint = " (set TRITON_INTERPRET=1 before importing to run Triton on CPU)" if name == "triton" else ""
        raise RuntimeError(f"backend {name!r} cannot run {op!r} on {device} with {dtype}{hint}")
    return impl.fn
