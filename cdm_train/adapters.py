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


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux's 2x2 patch packing (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for latents of spatial size (h, w)."""
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def flux_image_ids(h: int, w: int, device, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids (0, row, col) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxAdapter:
    """diffusers FluxTransformer2DModel on the trainer's unpacked (B, C, H, W) latents.

    The adapter packs 2x2 patches into tokens, adds image / text position ids, passes
    ``timestep = sigma`` (FluxPipeline divides its 0..1000 timesteps by 1000; the model scales
    back internally) and, for guidance-distilled teachers (``guidance_embeds``), the per-sample
    guidance ``cond["guidance"]``; the output is unpacked back. Euler steps, re-noising and the
    losses are per element, so the layout never matters to them.

    CFG augmentation with a guidance-distilled teacher (Flux-dev): there is no unconditional pass.
    ``uncond(cond)`` is the *same prompt* at guidance 1.0 (the embedding's "no extra guidance"), so the
    CA target shift is ``alpha * (x0(prompt, g) - x0(prompt, 1))``: the direction the guidance
    embedding moves the teacher, scaled by ``loss.guidance_scale`` like the CFG direction of SD3. The
    conditional passes (student, fake teacher, CA cond, DM) all use ``cond["guidance"]``
    (``model.flux_guidance``, 3.5 by default). A teacher without a guidance embedding falls back to
    SD3's semantics: the null (empty-prompt) embeddings, guidance ignored. Rationale and the scale of
    ``alpha`` relative to SD3: docs/flux.md.
    """

    def __init__(self, null_cond: dict[str, torch.Tensor], guidance_embeds: bool):
        self.null_cond = null_cond
        self.guidance_embeds = bool(guidance_embeds)
        self._ids: dict[tuple, torch.Tensor] = {}

    def _img_ids(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._ids:
            self._ids[key] = flux_image_ids(h, w, device)
        return self._ids[key]

    def __call__(self, model, x, sigma, cond):
        b, _, h, w = x.shape
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=torch.float32)
        guidance = cond["guidance"].to(torch.float32) if self.guidance_embeds else None
        out = model(hidden_states=pack_latents(x), encoder_hidden_states=text,
                    pooled_projections=cond["pooled_projections"], timestep=sigma.to(torch.float32),
                    img_ids=self._img_ids(h, w, x.device), txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def uncond(self, cond):
        b = cond_batch_size(cond)
        if self.guidance_embeds:  # the same prompt without extra guidance (see the class docstring)
            return {**cond, "guidance": torch.ones_like(cond["guidance"])}
        null = {k: v.to(cond[k].device).expand(b, *v.shape[1:]) for k, v in self.null_cond.items()}
        return {**null, "guidance": cond["guidance"]}
