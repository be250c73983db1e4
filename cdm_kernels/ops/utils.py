"""Shared helpers of the fused ops: op definition for both backends, memory layout, sigma
arguments, launch sizes and small Triton device functions.

Every op is defined twice with the same schema: ``cdm_kernels::<name>`` (a
``torch.library.custom_op`` whose implementation launches Triton kernels: CUDA tensors,
or CPU tensors under ``TRITON_INTERPRET=1``) and ``cdm_kernels_cpp::<name>`` (schema and
CPU kernel defined by the C++ extension ``cdm_kernels._C``, when built). Both get the
same fake (meta) function and the same autograd formula, whose backward calls the
backward ops of its own namespace; so both are compile-safe and differentiable.

Layout: kernels index a tensor as ``base + b * batch_stride + i`` (``i`` the row-major
index inside a sample), so any batch stride is free (batch slices, ``chunk`` of a
cond/uncond batch); a tensor whose per-sample part is not contiguous (permuted,
channels-last, strided inner slices) is copied with ``.contiguous()`` first. Outputs are
always contiguous, and the fake functions say so.

Sigma: a Python float travels as a float argument, a tensor as a pointer plus a batch
stride (0 when it holds one value); ``split_sigma`` turns the public form into the
``(Tensor? sigma_t, float sigma)`` pair of the op schemas.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a Linux/x86 dependency
    triton = None
    tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 is accepted by the accelerated backends only to hand it to the reference (fp64 is a
# testing dtype): the public functions of ops/*.py fall back when any data input is fp64.
SUPPORTED_DTYPES = FAST_DTYPES + (torch.float64,)
NS_TRITON = "cdm_kernels"
F64 = torch.float64
NS_CPP = "cdm_kernels_cpp"

# GPU launch sizes: one 1024-element block per program for elementwise kernels; reductions
# walk a chunk (a multiple of the block) per program and write one partial sum per chunk. The
# chunk is sized so that a reduction launches about PROGRAMS_PER_SM programs per SM: fixed
# 16,384-element chunks gave 256 programs at SD3 1024 px batch 16 and 128 for one video latent,
# under two per SM on a 132-SM H200, too few to reach the memory bandwidth.
GPU_BLOCK = 1024
PROGRAMS_PER_SM = 4
DEFAULT_SM_COUNT = 132  # H100/H200 SXM: used when no CUDA device is visible (the compile check)
# The interpreter costs ~0.5 ms per program instance: one big block per sample.
INTERPRET_MAX_BLOCK = 1 << 16

_cpp_state = {"loaded": None}


def cpp_available() -> bool:
    """Whether the C++ extension is built and its ops are registered (imported once)."""
    if _cpp_state["loaded"] is None:
        try:
            import cdm_kernels._C  # noqa: F401  (static initialisers register cdm_kernels_cpp::*)

            _cpp_state["loaded"] = hasattr(torch.ops, NS_CPP) and hasattr(getattr(torch.ops, NS_CPP), "sigma_lincomb")
        except ImportError:
            _cpp_state["loaded"] = False
    return _cpp_state["loaded"]


def triton_supports(device: torch.device, dtype: torch.dtype) -> bool:
    if not HAS_TRITON or dtype not in SUPPORTED_DTYPES:
        return False
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


def cpp_supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in SUPPORTED_DTYPES and cpp_available()


def any_float64(*args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args)


# The eager fast path (see define_op): the same implementations and autograd formulas as the custom ops,
# called without the torch.library dispatcher. ops_namespace(EAGER).<name> mirrors torch.ops.cdm_kernels.<name>.
EAGER = "eager"
_EAGER_OPS = types.SimpleNamespace()


def ops_namespace(ns: str):
    return _EAGER_OPS if ns == EAGER else getattr(torch.ops, ns)


_functorch_stack = torch._C._functorch.peek_interpreter_stack
_dispatch_stack_len = torch._C._len_torch_dispatch_stack


def eager_path(t: torch.Tensor) -> bool:
    """Whether a Triton op on `t` may skip the torch.library dispatcher (and its ~15-30 us of Python per call).

    Only in plain eager execution: not while dynamo traces (it must see the custom op, whose fake function
    and autograd formula it compiles), not under a dispatch mode (FakeTensorMode, make_fx, the capture-safety
    checker: they must see the op, not the launch), not for tensor subclasses, not under functorch transforms.
    `is_compiling()` comes first: dynamo folds it to True and never traces the rest.
    """
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor and _dispatch_stack_len() == 0
            and _functorch_stack() is None)


# ----------------------------------------------------------------------------- definition


def define_op(name: str, schema: str, triton_impl: Callable, fake: Callable,
              setup_context: Callable | None = None, make_backward: Callable | None = None,
              grad_args: tuple[int, ...] = (), eager_impl: Callable | None = None):
    """Define ``cdm_kernels::name`` (Triton) and attach fake/autograd to ``cdm_kernels_cpp::name``.

    ``make_backward(ns)`` returns the backward function for the ops of namespace ``ns``. Also defines the
    eager twin ``ops_namespace(EAGER).name``: the implementation called directly, through a
    ``torch.autograd.Function`` with the same setup_context/backward (whose backward calls the eager twins)
    when one of the inputs at ``grad_args`` requires a gradient (``eager_impl``, when given, replaces the
    implementation there: the loss forwards reuse a cached ticket counter only on this path). The public
    functions use it when
    ``eager_path`` allows; compiled code, fake tensors and dispatch modes always get the custom op.
    """
    _define_eager(name, eager_impl or triton_impl, setup_context, make_backward, grad_args)
    op = torch.library.custom_op(f"{NS_TRITON}::{name}", triton_impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if make_backward is not None:
        op.register_autograd(make_backward(NS_TRITON), setup_context=setup_context)
    if cpp_available():
        qualname = f"{NS_CPP}::{name}"
        torch.library.register_fake(qualname)(fake)
        if make_backward is not None:
            torch.library.register_autograd(qualname, make_backward(NS_CPP), setup_context=setup_context)
    return op


def _define_eager(name, impl, setup_context, make_backward, grad_args):
    if make_backward is None:
        setattr(_EAGER_OPS, name, impl)
        return

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    # Old-style forward(ctx, ...): a Function with a separate setup_context binds its arguments with
    # inspect.signature on every call (~20 us). apply is _FunctionBase.apply itself: the Python wrapper only
    # adds that binding and functorch's dead-wrapper unwrapping (eager_path excludes functorch).
    fn_cls = type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(make_backward(EAGER))})
    apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, fn_cls)
    is_grad_enabled = torch.is_grad_enabled

    def eager(*args):
        if is_grad_enabled():
            for i in grad_args:
                a = args[i]
                if a is not None and a.requires_grad:
                    return apply(*args)
        return impl(*args)

    eager.__name__ = name
    setattr(_EAGER_OPS, name, eager)


# ----------------------------------------------------------------------------- host helpers


def split_sigma(sigma) -> tuple[torch.Tensor | None, float]:
    """Public sigma (float or tensor) -> the (Tensor? sigma_t, float sigma) pair of the schemas."""
    if isinstance(sigma, torch.Tensor):
        return sigma.detach(), 0.0
    return None, float(sigma)


def sigma_launch_args(sigma_t: torch.Tensor | None, sigma: float, dummy: torch.Tensor):
    """(pointer, value, batch stride, has_tensor) for a kernel's sigma arguments."""
    if sigma_t is None:
        return dummy, float(sigma), 0, False
    stride = sigma_t.stride(0) if sigma_t.dim() > 0 and sigma_t.numel() > 1 else 0
    return sigma_t, 0.0, stride, True


def cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: that is a @jit function, and calling it from the host costs ~10 us.
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def inner_contiguous(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def as_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor, batch stride) with each sample's elements contiguous (copy only if they are not)."""
    if not inner_contiguous(t):
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def row_size(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= int(s)
    return n


def elementwise_block(n: int) -> int:
    if INTERPRET:
        return max(16, min(next_power_of_2(n), INTERPRET_MAX_BLOCK))
    return GPU_BLOCK


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device | None) -> int:
    """Streaming multiprocessors of a CUDA device (cached); DEFAULT_SM_COUNT for anything else."""
    if device is None or device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


@functools.lru_cache(maxsize=256)
def gpu_reduce_geometry(n: int, batch: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, chunks per sample) for a GPU reduction of `batch` rows of `n` elements.

    Enough chunks per sample that batch x chunks reaches PROGRAMS_PER_SM x sms (but never a chunk
    below one block). Depends only on the shape and the SM count: deterministic on a given GPU.
    """
    chunks_wanted = max(1, -(-PROGRAMS_PER_SM * sms // max(batch, 1)))
    per_chunk = -(-n // chunks_wanted)
    chunk = max(GPU_BLOCK, -(-per_chunk // GPU_BLOCK) * GPU_BLOCK)
    return GPU_BLOCK, chunk, -(-n // chunk)


def reduce_programs(batch: int, n: int, sms: int) -> int:
    """Programs of the first (partials) kernel of a reduction on a GPU with `sms` SMs."""
    return batch * gpu_reduce_geometry(n, batch, sms)[2]


def reduce_sizes(n: int, batch: int = 1, device: torch.device | None = None) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, number of chunks per sample) of a row reduction."""
    if INTERPRET:
        block = max(16, min(next_power_of_2(n), INTERPRET_MAX_BLOCK))
        chunk = block * cdiv(n, block)  # one program per sample
        return block, chunk, cdiv(n, chunk)
    return gpu_reduce_geometry(n, batch, sm_count(device))


# The finalize runs in the last program of a loss forward, beside the hot loop's registers: a fixed small tile
# (4 samples x 32 chunks per step, 4 accumulator tiles of 128 fp32 = 4 registers each per thread at 4 warps)
# keeps the fused kernel free of spills and adds no compile variants; it walks a few hundred partial sums.
FINALIZE_TILE = (4, 32)


def finalize_block_sizes(batch: int, n_chunks: int) -> tuple[int, int]:
    """(samples, chunks) per step of the finalize loop (fixed; tests shrink it to cover several steps)."""
    return FINALIZE_TILE


REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


# ----------------------------------------------------------------------------- last-program finalize
#
# A loss forward is ONE launch: every program of the partial-sums grid stores its partials, then takes a
# ticket from an int32 counter (atomic add); the program drawing the last ticket sums all partials (in a
# fixed order: deterministic) and writes the loss, then resets the counter to zero. In plain eager code (the
# fast path) the counter is reused across calls: one per (device, stream), since kernels on one stream never
# overlap, so a counter is always back at zero when the next launch on its stream starts. Everywhere else a
# fresh zeroed counter per call (one small fill): inside a CUDA-graph capture (a graph may be replayed on any
# stream, concurrently with eager work on the stream it was captured on) and on the custom-op path that
# compiled code takes (torch.compile's CUDA-graph trees run warm-ups inside the graph memory pool, where a
# long-lived cached tensor would be an unaccounted allocation that a later replay may overwrite).

_TICKETS: dict[tuple, torch.Tensor] = {}
_cuda_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_cuda_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)


def ticket_counter(device: torch.device, cached: bool) -> torch.Tensor:
    """A zero int32 for the last-program finalize of a launch on `device`'s current stream (see above:
    `cached` only on the eager fast path)."""
    if not cached:
        return torch.zeros(1, dtype=torch.int32, device=device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _cuda_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (index, _cuda_raw_stream(index))
    else:  # the interpreter runs programs one after the other
        key = (device.type,)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def loss_shape(batch: int, reduction: str) -> tuple[int, ...]:
    return (batch,) if reduction == "none" else ()


def round_bf16_needed(dtype: torch.dtype) -> bool:
    # The interpreter truncates fp32 -> bf16; round to nearest even by hand there.
    return INTERPRET and dtype == torch.bfloat16


# ----------------------------------------------------------------------------- launch recording


class _RecordedKernel:
    """Stands in for one @triton.jit kernel: logs each launch by name, then runs it (or not)."""

    def __init__(self, name: str, kernel, log: list[str], run: bool):
        self.name, self.kernel, self.log, self.run = name, kernel, log, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.name)
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch


@contextlib.contextmanager
def record_launches(*, run: bool = True):
    """Yield a list that receives ``"module.kernel"`` for every Triton launch of the fused ops inside.

    ``run=False`` stubs the launches out (outputs stay uninitialised): the host-path benchmark times
    everything but the kernel. Kernels are module globals named ``*_kernel`` that the launchers look
    up at call time, so swapping the module attributes is enough (device functions are left alone).
    Not thread-safe; for tests and benchmarks only.
    """
    log: list[str] = []
    saved = []
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("cdm_kernels.ops.") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if attr.endswith("_kernel") and HAS_TRITON and isinstance(value, triton.runtime.jit.KernelInterface):
                saved.append((mod, attr, value))
                setattr(mod, attr, _RecordedKernel(f"{mod_name.rsplit('.', 1)[-1]}.{attr}", value, log, run))
    try:
        yield log
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


# ----------------------------------------------------------------------------- device helpers

if HAS_TRITON:

    @triton.jit
    def load_sigma(ptr, value, stride, b, HAS_T: tl.constexpr):
        if HAS_T:
            s = tl.load(ptr + b * stride).to(tl.float32)
        else:
            s = value  # an fp32 scalar argument (a Python float under the interpreter)
        return s

    @triton.jit
    def to_output(x, ROUND_BF16: tl.constexpr):
        """fp32 -> value ready to store; with ROUND_BF16, rounded to nearest even on the bf16 grid."""
        if ROUND_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        return x

    @triton.jit
    def is_finite(x):
        return tl.abs(x) < float("inf")

    @triton.jit
    def is_last_program(COUNTER, n_programs):
        """Take a ticket after this program's partial sums are stored; True for the last one of the grid.

        The barrier orders every thread's stores of this program before the ticket; the atomic's acq_rel
        semantics (GPU scope) publish them and, for the last program, make every other program's visible.
        """
        tl.debug_barrier()
        ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel")
        return ticket == n_programs - 1

    @triton.jit
    def reset_ticket(COUNTER):
        tl.atomic_xchg(COUNTER, 0, sem="relaxed")
