"""Model adapters: the one place that knows how a network is called.

The trainer only ever computes ``v = adapter(model, x, sigma, cond)``: the predicted
flow-matching velocity (eps - x0) at latents ``x`` (B, ...) and noise level ``sigma``
(a (B,) float32 tensor in [0, 1]). ``cond`` is opaque to the trainer apart from being
a tensor or a dict of tensors whose first dim is the batch, so it can be indexed and
concatenated (see cond_select / cond_cat). ``adapter.uncond(cond)`` returns the null
conditioning (empty prompt, null class) with the same batch size, for CFG.

New model families (Flux, LongCat, ...) add an adapter here; nothing else changes.
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


class SD3Adapter:
    """diffusers SD3Transformer2DModel: timestep = 1000 * sigma, text embeddings as cond.

    cond = {"encoder_hidden_states": (B, L, D), "pooled_projections": (B, P)}.
    `null_cond` holds the embeddings of the empty prompt with batch 1 (broadcast to B).
    """

    def __init__(self, null_cond: dict[str, torch.Tensor]):
        missing = {"encoder_hidden_states", "pooled_projections"} - set(null_cond)
        if missing:
            raise ValueError(f"null_cond is missing {sorted(missing)}")
        self.null_cond = null_cond

    def __call__(self, model, x, sigma, cond):
        out = model(
            hidden_states=x,
            timestep=sigma.to(torch.float32) * 1000.0,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
        return out

    def uncond(self, cond):
        b = cond_batch_size(cond)
        return {k: v.to(cond[k].device).expand(b, *v.shape[1:]) for k, v in self.null_cond.items()}


class ClassLabelAdapter:
    """A class-conditional model called as ``model(x, timestep, labels)``; null class for CFG.

    Used by the digits preset, where the model owns learned class embeddings that it
    feeds to the SD3 transformer as encoder hidden states and pooled projections.
    """

    def __init__(self, null_class: int):
        self.null_class = int(null_class)

    def __call__(self, model, x, sigma, cond):
        return model(x, sigma.to(torch.float32) * 1000.0, cond)

    def uncond(self, cond):
        return torch.full_like(cond, self.null_class)
