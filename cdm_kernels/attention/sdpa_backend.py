"""The exact (bf16/fp16/fp32) attention backend for every pass: which SDPA kernel, chosen per device.

torch's own SDPA order picked FlashAttention-2 on the H200 here (281 TFLOP/s at D=64, 332 at D=128), although
cuDNN attention is the faster Hopper kernel (published H100: 408 / 609-631 forward, 417 / 499 backward): torch
2.11 prefers cuDNN on sm_90 only when the loaded cuDNN is newer than 9.15.0. So we state the priority
ourselves (``torch.nn.attention.sdpa_kernel(..., set_priority=True)``) from facts about the device:

- ``auto``: CUDA sm_90 with cuDNN >= 9.15.1 and no mask: cuDNN, then flash, efficient, math. FA3
  (``flash_attn_interface``) first on sm_90 where importable and no mask is passed (published H100 FA3 bf16
  476 / 638 against cuDNN's 408 / 609-631). Other CUDA GPUs: flash, efficient, math. Not CUDA: torch's
  default (the choice there does not matter for speed).
- ``sdpa-default``: no context at all, exactly what diffusers runs (the reference mode).
- ``cudnn`` | ``flash`` | ``efficient`` | ``math``: that SDPA kernel first, the others after it as fallbacks
  (SDPA skips a kernel that cannot take the inputs, e.g. flash with a mask).
- ``fa3`` | ``te``: FlashAttention-3 / Transformer Engine bf16 attention when importable (optional; neither has a
  wheel that can reach this project's machines).

Known cuDNN faults, encoded: before cuDNN 9.15.1 an illegal memory access for S not a multiple of 128 (SD3
1024 px has S = 4429), so cuDNN is dropped there (and where S is unknown); with an attention mask cuDNN gave NaN
gradients, so ``auto`` never takes cuDNN with a mask and ``cudnn`` refuses one (ValueError).

Pure decisions over a ``DeviceFacts`` value (tests fake it); ``run_attention`` executes a choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._common import log_once

BACKENDS = ("auto", "sdpa-default", "cudnn", "flash", "efficient", "math", "fa3", "te")
OPTIONAL = ("fa3", "te")
CUDNN_MIN_PREFERRED = 91501  # torch.backends.cudnn.version() of 9.15.1: "newer than 9.15.0"
CUDNN_MIN_ANY_LENGTH = 91501  # before 9.15.1: illegal memory access when S % 128 != 0

_ORDER = {
    "cudnn": (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "flash": (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    "efficient": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH),
    "math": (SDPBackend.MATH,),
}


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the backend choice depends on; ``device_facts`` reads them, tests construct them."""

    device_type: str = "cpu"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cudnn_version: int | None = None  # torch.backends.cudnn.version(), e.g. 91501 for 9.15.1
    optional: frozenset[str] = frozenset()  # importable optional backends among OPTIONAL


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    kind: str  # "sdpa-default" (no context) | "sdpa" (priority below) | "fa3" | "te"
    priority: tuple[SDPBackend, ...] = ()
    reason: str = ""

    @property
    def label(self) -> str:
        if self.kind != "sdpa":
            return self.kind
        return "sdpa[" + ">".join(b.name.lower().replace("_attention", "") for b in self.priority) + "]"


def optional_available() -> frozenset[str]:
    """Which optional bf16 backends are importable here (no CUDA check)."""
    found = set()
    if importlib.util.find_spec("flash_attn_interface") is not None:
        found.add("fa3")
    if importlib.util.find_spec("transformer_engine") is not None:
        found.add("te")
    return frozenset(found)


_FACTS: dict[tuple[str, int | None], DeviceFacts] = {}


def device_facts(device: torch.device | str) -> DeviceFacts:
    """The facts of `device`, read once per device (a plain dict, so torch.compile traces the lookup)."""
    device = torch.device(device)
    key = (device.type, device.index)
    facts = _FACTS.get(key)
    if facts is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
            facts = DeviceFacts("cuda", tuple(torch.cuda.get_device_capability(index)), cudnn, optional_available())
        else:
            facts = DeviceFacts(device.type, None, None, optional_available())
        _FACTS[key] = facts
    return facts


def check_backend(backend: str, facts: DeviceFacts | None = None) -> None:
    """ValueError naming `backend` for an unknown name or an optional backend that is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in OPTIONAL:
        have = facts.optional if facts is not None else optional_available()
        if backend not in have:
            package = {"fa3": "flash_attn_interface (FlashAttention-3)", "te": "transformer_engine"}[backend]
            raise ValueError(f"backend={backend!r} needs {package}, which is not importable here")


def _cudnn_length_safe(facts: DeviceFacts, seq_len: int | None) -> bool:
    if facts.cudnn_version is not None and facts.cudnn_version >= CUDNN_MIN_ANY_LENGTH:
        return True
    return seq_len is not None and seq_len % 128 == 0


def choose_backend(backend: str, facts: DeviceFacts, *, seq_len: int | None = None,
                   has_mask: bool = False) -> BackendChoice:
    """The attention to run for `backend` on a device with `facts`, for key length `seq_len` (None: unknown)."""
    check_backend(backend, facts)
    if backend == "sdpa-default":
        return BackendChoice("sdpa-default", reason="diffusers' default (torch's own SDPA order)")
    cuda = facts.device_type == "cuda"
    hopper = cuda and facts.capability is not None and tuple(facts.capability) == (9, 0)
    if backend == "auto":
        if not cuda:
            return BackendChoice("sdpa-default", reason=f"{facts.device_type}: torch's own SDPA order")
        if hopper and "fa3" in facts.optional and not has_mask:
            return BackendChoice("fa3", reason="sm_90 with FlashAttention-3 importable")
        if (hopper and not has_mask and facts.cudnn_version is not None
                and facts.cudnn_version >= CUDNN_MIN_PREFERRED):
            return BackendChoice("sdpa", _ORDER["cudnn"], f"sm_90, cuDNN {facts.cudnn_version} >= 9.15.1")
        why = ("a mask is passed (cuDNN gives NaN gradients with masks)" if has_mask and hopper
               else f"cuDNN {facts.cudnn_version} older than 9.15.1" if hopper
               else f"sm_{facts.capability[0]}{facts.capability[1]}" if facts.capability else "CUDA")
        return BackendChoice("sdpa", _ORDER["flash"], f"flash first: {why}")
    if backend in OPTIONAL:
        if has_mask:
            return BackendChoice("sdpa", _ORDER["efficient"], f"{backend} takes no mask: efficient first")
        return BackendChoice(backend, reason="asked for by name")
    if backend == "cudnn":
        if has_mask:
            raise ValueError("attention_mask: backend='cudnn' takes no attention mask (cuDNN attention gave NaN "
                             "gradients with masks); use backend='auto' or 'flash'")
        if cuda and not _cudnn_length_safe(facts, seq_len):
            return BackendChoice("sdpa", _ORDER["flash"],
                                 f"cuDNN {facts.cudnn_version} < 9.15.1 with S={seq_len} not a multiple of 128 "
                                 "(illegal memory access): flash instead")
        return BackendChoice("sdpa", _ORDER["cudnn"], "asked for by name")
    return BackendChoice("sdpa", _ORDER[backend], "asked for by name")


_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def sdpa_context(choice: BackendChoice):
    """The context manager that makes F.scaled_dot_product_attention follow `choice` (a no-op for sdpa-default)."""
    if choice.kind != "sdpa":
        return contextlib.nullcontext()
    if _HAS_SET_PRIORITY:
        return sdpa_kernel(list(choice.priority), set_priority=True)
    return sdpa_kernel(list(choice.priority))  # older torch: these kernels enabled, in torch's order


def _fa3(q, k, v, scale):
    import flash_attn_interface

    res = flash_attn_interface.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               softmax_scale=scale, causal=False)
    out = res[0] if isinstance(res, tuple) else res  # some releases also return the LSE
    return out.transpose(1, 2)


def _te(q, k, v, scale):
    from transformer_engine.pytorch import DotProductAttention

    b, h, s, d = q.shape
    mod = DotProductAttention(h, d, attn_mask_type="no_mask", qkv_format="bshd", softmax_scale=scale)
    out = mod(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))  # (B, S, H*D)
    return out.view(b, s, h, d).transpose(1, 2)


def run_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto",
                  attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Exact non-causal attention on (B, H, S, D) tensors through the backend `backend` chooses here; with
    gradients. ``backend="sdpa-default"`` is plain ``F.scaled_dot_product_attention``."""
    choice = choose_backend(backend, device_facts(q.device), seq_len=k.shape[-2], has_mask=attn_mask is not None)
    log_once(f"bf16-{backend}-{choice.label}-{q.device}", "cdm_kernels attention backend=%s on %s: %s (%s)",
             backend, q.device, choice.label, choice.reason)
    if choice.kind == "fa3":
        return _fa3(q, k, v, scale)
    if choice.kind == "te":
        return _te(q, k, v, scale)
    with sdpa_context(choice):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                              scale=scale)


__all__ = ["BACKENDS", "DeviceFacts", "BackendChoice", "device_facts", "choose_backend", "check_backend",
           "sdpa_context", "run_attention", "optional_available"]
