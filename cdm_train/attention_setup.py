"""Which attention each network runs: the exact backend for every pass (speed.attention_backend) and the 8-bit
kernel for the passes without gradient (speed.fp8_attention_*), installed as diffusers processors.

``apply_attention(cfg, models)`` is self-contained (config in, processors installed, a report out) so it can
move into the trainer's acceleration setup as one call. In speed.attention_8bit=auto an 8-bit switch takes the
8-bit kernel only where cdm_kernels' speed table measured it faster than the best bf16 attention on this
device and head dim; elsewhere it declines (bf16 under the chosen backend) and says so.
"""

from __future__ import annotations

import logging

import torch

from .config import Config

log = logging.getLogger("cdm_train")


def _facts(net: torch.nn.Module):
    """cdm_kernels' DeviceFacts of the device `net`'s parameters live on (tests replace this)."""
    from cdm_kernels.attention.sdpa_backend import device_facts

    param = next(iter(net.parameters()), None)
    return device_facts(param.device if param is not None else torch.device("cpu"))


def _head_dim(net: torch.nn.Module) -> int | None:
    """The head dim of `net`'s first diffusers attention module (SD3: inner dim / heads; Flux, LongCat: head_dim)."""
    for module in net.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            if getattr(module, "head_dim", None):
                return int(module.head_dim)
            if getattr(module, "inner_dim", None) and getattr(module, "heads", None):
                return int(module.inner_dim) // int(module.heads)
    return None


def _eight_bit_mode(cfg: Config, net: torch.nn.Module) -> tuple[str, str]:
    """(processor mode, why) for a network whose 8-bit switch is on."""
    sp = cfg.speed
    fmt = "int8" if sp.attention_8bit == "int8" else "fp8"
    if sp.fp8_attention_emulate:
        return f"{fmt}_emulated_no_grad", "emulated (the kernel's PyTorch twin, for quality studies)"
    if sp.attention_8bit in ("fp8", "int8"):
        return f"{fmt}_no_grad", f"speed.attention_8bit={sp.attention_8bit} (asked for)"
    facts = _facts(net)
    if facts.device_type != "cuda":
        return "fp8_no_grad", f"{facts.device_type}: the Triton interpreter or SDPA (no speed to compare)"
    from cdm_kernels.attention.dispatch import cuda_auto_path
    from cdm_kernels.attention.speed_table import eight_bit_is_faster

    head_dim = _head_dim(net)
    path = cuda_auto_path(facts.capability, head_dim) if head_dim is not None else "sdpa"
    if path == "sdpa":
        return "bf16", f"declined: no 8-bit kernel for head dim {head_dim} on sm_{facts.capability[0]}" \
                       f"{facts.capability[1]}"
    kernel = "fp8" if path == "triton" else "int8"
    faster, why = eight_bit_is_faster(facts.capability, head_dim, kernel)
    if not faster:
        return "bf16", f"declined, {why}"
    return "fp8_no_grad", why


def apply_attention(cfg: Config, models) -> list[str]:
    """Install the attention processors the speed switches ask for on the teacher, fake teacher and student;
    return one human-readable line per network saying what runs there."""
    import cdm_kernels

    sp = cfg.speed
    targets = [("teacher", sp.fp8_attention_teacher, models.teacher), ("fake", sp.fp8_attention_fake, models.fake),
               ("student", sp.fp8_attention_rollout, models.student)]
    plans = []
    for name, eight_bit, net in targets:
        mode, why = _eight_bit_mode(cfg, net) if eight_bit else ("bf16", "")
        backend = sp.attention_backend
        if backend == "auto" and _facts(net).device_type != "cuda":
            backend = "sdpa-default"  # what auto means off CUDA: nothing to install for the exact passes
        plans.append((name, net, mode, backend, why))
    # 8-bit patches last: a module shared by two networks (LoRA) must not lose an 8-bit mode to a bf16 one
    # (lora.validate refuses 8-bit switches on a shared base, so this only orders identical bf16 patches).
    lines = []
    for name, net, mode, backend, why in sorted(plans, key=lambda p: p[2] != "bf16"):
        if mode == "bf16" and backend == "sdpa-default":
            line = f"{name}: diffusers' default attention (speed.attention_backend={sp.attention_backend})"
        else:
            report = cdm_kernels.patch_attention(net, mode=mode, backend=backend)
            patched = len(report["patched"]) if isinstance(report, dict) else "?"
            line = (f"{name}: exact attention backend={backend}" + (f", no-grad passes {mode}" if mode != "bf16"
                                                                     else "") + f" ({patched} modules)")
        if why:
            line += f"; 8-bit switch: {why}"
        lines.append(line)
    order = {"teacher": 0, "fake": 1, "student": 2}
    lines.sort(key=lambda text: order[text.split(":")[0]])
    for line in lines:
        log.info("attention: %s", line)
    return lines


__all__ = ["apply_attention"]
