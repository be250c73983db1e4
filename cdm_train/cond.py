"""Conditioning and the model-adapter protocol: the one interface through which a network is called.

The trainer only ever computes ``v = adapter(model, x, sigma, cond)``: the predicted
flow-matching velocity (eps - x0) at latents ``x`` (B, ...) and noise level ``sigma``
(a (B,) float32 tensor in [0, 1]). ``cond`` is opaque to the trainer apart from being
a tensor or a dict of tensors whose first dim is the batch, so it can be indexed and
concatenated (see cond_select / cond_cat). ``adapter.uncond(cond)`` returns the null
conditioning (empty prompt, null class) with the same batch size, for CFG.

Each model family's adapter lives in its home under cdm_train/models/ (sd3, flux, longcat, class_label).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Cond = Any  # torch.Tensor | dict[str, torch.Tensor], batch dim first


def cond_select(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """Rows `index` of every tensor in cond."""
    if isinstance(cond, dict):
        return {k: cond_select(v, index) for k, v in cond.items()}
    return cond[index]


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch dim."""
    first = conds[0]
    if isinstance(first, dict):
        return {k: cond_cat([c[k] for c in conds]) for k in first}
    return torch.cat(conds, dim=0)


def cond_batch_size(cond: Cond) -> int:
    if isinstance(cond, dict):
        return cond_batch_size(next(iter(cond.values())))
    return int(cond.shape[0])


def cond_to(cond: Cond, device) -> Cond:
    if isinstance(cond, dict):
        return {k: cond_to(v, device) for k, v in cond.items()}
    return cond.to(device, non_blocking=True)


class ModelAdapter(Protocol):
    def __call__(self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        ...

    def uncond(self, cond: Cond) -> Cond:
        ...
