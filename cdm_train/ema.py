"""Parameter averaging with fused multi-tensor ops (no per-parameter Python loops)."""

from __future__ import annotations

import torch


def _float_params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.is_floating_point()]


@torch.no_grad()
def lerp_params_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, for every parameter (fused foreach)."""
    if decay >= 1.0:
        return
    tgt = _float_params(target)
    src = _float_params(source)
    if len(tgt) != len(src):
        raise ValueError(f"parameter count mismatch: {len(tgt)} vs {len(src)}")
    if tgt and tgt[0].dtype != src[0].dtype:
        src = [s.to(t.dtype) for s, t in zip(src, tgt)]
    torch._foreach_lerp_(tgt, src, 1.0 - decay)


class EMA:
    """Exponential moving average of a module's parameters (kept in fp32)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def update(self, module: torch.nn.Module) -> None:
        lerp_params_(self.module, module, self.decay)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
