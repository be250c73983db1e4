"""FP8 linear layers (torchao) for frozen networks: the real teacher in CDM.

``quantize_frozen(model)`` swaps the weights of the model's large ``nn.Linear`` layers for
torchao float8 tensors: float8 e4m3 weights with one scale per output row, activations
quantised dynamically per row (token) at every call, ``torch._scaled_mm`` underneath. Only on
CUDA devices with FP8 tensor cores (sm_89+: Ada, Hopper, Blackwell) and with torchao installed
(the ``[fp8]`` extra); anywhere else it changes nothing and says so in one log line.

Which layers are left in bf16, and why:

- ``in_features`` or ``out_features`` not divisible by 16: ``torch._scaled_mm`` needs both
  GEMM dims aligned to 16 bytes of float8.
- ``min(in_features, out_features) < min_features`` (default 512): a thin GEMM is bandwidth
  bound; the per-call activation quantisation costs more than FP8 saves (SD3's ``proj_out``,
  1536 -> 64; timestep MLPs, 256 -> 1536).
- Linear layers inside AdaLayerNorm modulation and timestep/pooled-text/guidance embedders:
  they see one row per sample (M = batch), so FP8 cannot win, and the scale/shift/gate they
  produce multiply every token, so their error is not averaged out.
- Weights not in bf16: torchao's row-wise float8 expects bf16 weights (cast the model first).

The model must be frozen (no weight requires grad): torchao's float8 weights have no backward
here, and the student and fake teacher change every step (re-quantising them per rollout is
not wired: its pay-off is not measured yet, see docs/fp8.md).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("cdm_kernels")

# Ancestor module classes whose Linear layers see one row per sample (AdaLN modulation, embedders).
PER_SAMPLE_MODULE_CLASSES = ("AdaLayerNorm", "Timestep", "TextProjection", "GuidanceEmbed", "PixArtAlphaTextProjection")


@dataclass
class FP8LinearReport:
    applied: bool
    reason: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{'applied' if self.applied else 'not applied'} ({self.reason}): {len(self.quantized)} linear layers "
                f"{'quantised' if self.applied else 'eligible'}, {len(self.skipped)} left in high precision")


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def plan_fp8_linears(model: torch.nn.Module, *, min_features: int = 512,
                     require_bf16: bool = True) -> tuple[list[str], dict[str, str]]:
    """Which nn.Linear layers of `model` FP8 would replace: (eligible names, {skipped name: reason}).

    Pure inspection (no torchao, any device), so the selection is testable anywhere.
    """
    classes = {name: type(m).__name__ for name, m in model.named_modules()}
    eligible: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        ancestors = [classes.get(".".join(parts[:i]), "") for i in range(1, len(parts))]
        per_sample = next((c for c in ancestors if any(p in c for p in PER_SAMPLE_MODULE_CLASSES)), None)
        k, n = module.in_features, module.out_features
        if per_sample:
            skipped[name] = f"inside {per_sample}: one row per sample, precision-sensitive modulation"
        elif k % 16 or n % 16:
            skipped[name] = f"{k} -> {n}: dims not divisible by 16"
        elif min(k, n) < min_features:
            skipped[name] = f"{k} -> {n}: thinner than {min_features}, bandwidth bound"
        elif require_bf16 and module.weight.dtype != torch.bfloat16:
            skipped[name] = f"weight dtype {module.weight.dtype}, row-wise FP8 needs bf16"
        else:
            eligible.append(name)
    return eligible, skipped


def _fp8_device_reason(model: torch.nn.Module) -> str | None:
    """None when FP8 linears can run on the model's device, else why not."""
    param = next(model.parameters(), None)
    if param is None:
        return "model has no parameters"
    dev = param.device
    if dev.type != "cuda":
        return f"model on {dev.type}, FP8 GEMMs need CUDA sm_89+"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        return f"{torch.cuda.get_device_name(dev)} is sm_{cap[0]}{cap[1]}, FP8 tensor cores need sm_89+"
    if not torchao_available():
        return "torchao not installed (pip install 'cdm-kernels[fp8]')"
    return None


def quantize_frozen(model: torch.nn.Module, *, min_features: int = 512) -> FP8LinearReport:
    """FP8 (torchao float8 dynamic activation, float8 row-wise weight) for a frozen model's linears.

    In place; returns what was done. A no-op (one log line) off sm_89+ or without torchao.
    Raises ValueError if an eligible layer's weight requires grad (the model must be frozen).
    """
    eligible, skipped = plan_fp8_linears(model, min_features=min_features)
    modules = dict(model.named_modules())
    trainable = [n for n in eligible if modules[n].weight.requires_grad]
    if trainable:
        raise ValueError(f"model: quantize_frozen needs frozen weights, but {len(trainable)} linear layers require "
                         f"grad (e.g. {trainable[0]!r}); call model.requires_grad_(False) first")
    reason = _fp8_device_reason(model)
    if reason is not None:
        report = FP8LinearReport(False, reason, eligible, skipped)
        log.info("cdm_kernels.quantize_frozen: no-op, %s", reason)
        return report
    if eligible:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        selected = set(eligible)
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, fqn: fqn in selected)
    report = FP8LinearReport(True, "torchao float8 row-wise", eligible, skipped)
    log.info("cdm_kernels.quantize_frozen: %s", report.summary())
    return report


E4M3_MAX = 448.0


def fake_quantize_rows_e4m3(t: torch.Tensor) -> torch.Tensor:
    """`t` rounded as row-wise float8 e4m3 quantisation rounds it: one scale per row (amax / 448, in fp32),
    a round-to-nearest-even cast to e4m3, and back to `t`'s dtype. What torchao's row-wise float8 does to a
    weight (rows = output features) or an activation (rows = tokens) before ``torch._scaled_mm``."""
    x = t.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).to(t.dtype)


class _EmulatedFP8Linear:
    """The forward of an nn.Linear with both operands rounded as torchao's row-wise float8 rounds them,
    computed in the input's dtype (any device): FP8 linears' numerical effect without FP8 hardware."""

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        # The model is frozen: its weight is rounded once, as quantize_frozen quantises it once.
        self.weight = fake_quantize_rows_e4m3(module.weight.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.to(x.dtype), self.module.bias
        return torch.nn.functional.linear(fake_quantize_rows_e4m3(x), w, None if b is None else b.to(x.dtype))


def emulate_fp8_linears(model: torch.nn.Module, *, min_features: int = 0) -> FP8LinearReport:
    """quantize_frozen's row-wise float8 linears, emulated in PyTorch on any device (for measuring their effect
    on quality without FP8 hardware, e.g. on the digits default). In place, frozen models only.

    The selection is plan_fp8_linears' without the bf16 requirement, and min_features defaults to 0 so that
    small models (the digits teacher is 64 wide) have layers to quantise: a harsher test than the real
    selection, which leaves thin layers in bf16.
    """
    eligible, skipped = plan_fp8_linears(model, min_features=min_features, require_bf16=False)
    modules = dict(model.named_modules())
    trainable = [n for n in eligible if modules[n].weight.requires_grad]
    if trainable:
        raise ValueError(f"model: emulate_fp8_linears needs frozen weights, but {len(trainable)} linear layers "
                         f"require grad (e.g. {trainable[0]!r}); call model.requires_grad_(False) first")
    for name in eligible:
        modules[name].forward = _EmulatedFP8Linear(modules[name])
    report = FP8LinearReport(True, "emulated row-wise float8 e4m3 (PyTorch)", eligible, skipped)
    log.info("cdm_kernels.emulate_fp8_linears: %s", report.summary())
    return report


__all__ = ["quantize_frozen", "emulate_fp8_linears", "fake_quantize_rows_e4m3", "plan_fp8_linears",
           "FP8LinearReport", "torchao_available"]
