"""Flux (FluxTransformer2DModel, FluxPipeline): packed 2x2 latents, a guidance embedding, dynamic shift.

Presets: ``flux`` (a local diffusers Flux directory + precomputed embeddings), ``flux-shape`` (random-init
Flux-dev architecture for benchmarks: `model.layers`, `model.resolution`), ``flux-tiny`` (random-init tiny
Flux for tests and CPU runs). Shift: dynamic, mu from the image token count (diffusers' calculate_shift
with the directory's scheduler config, else its defaults). Rationale of the CFG semantics: docs/flux.md.
"""

from __future__ import annotations

import torch

from ..cond import Cond, cond_batch_size
from .base import (
    PackedLatentFamily,
    PromptBank,
    pack_latents,
    prompt_source,
    random_bank,
    require_model_dir,
    transformer_subfolder,
    unpack_latents,
)

FLUX_DEV_ARCH = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56))
FLUX_TEXT_TOKENS = 512  # T5 tokens (FluxPipeline max_sequence_length)
FLUX_TINY_ARCH = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                      axes_dims_rope=(2, 2, 4))
FLUX_TINY_TEXT_TOKENS = 6
FLUX_LATENT_CHANNELS = 16  # unpacked; the transformer sees 2x2 packs of 64
FLUX_TINY_SIDE = 8


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


class WithGuidance:
    """Flux conditioning carries the per-sample guidance embedding value (FluxAdapter)."""

    def __init__(self, sampler, value: float):
        self.sampler, self.value = sampler, float(value)
        self.size = sampler.size

    def _add(self, cond: Cond) -> Cond:
        batch = cond["pooled_projections"].shape[0]
        return {**cond, "guidance": torch.full((batch,), self.value, device=cond["pooled_projections"].device)}

    def __call__(self, batch, generator):
        return self._add(self.sampler(batch, generator))

    def take(self, rows) -> Cond:
        return self._add(self.sampler.take(rows))


class FluxFamily(PackedLatentFamily):
    name = "flux"
    directory_preset, tiny_preset, tiny_side = "flux", "flux-tiny", FLUX_TINY_SIDE
    presets = {
        "flux": {  # a local diffusers Flux directory (model.path) + precomputed embeddings; dynamic shift
            "train": {"batch_size": 4, "log_every": 10, "checkpoint_every": 500},
        },
        "flux-shape": {  # random-init Flux-dev architecture for benchmarks (model.layers, model.resolution)
            "train": {"batch_size": 4},
        },
        "flux-tiny": {  # random-init tiny Flux (guidance embedding, packed latents) for tests and CPU runs
            "schedule": {"max_steps": 8},
            "optim": {"student_lr": 1e-4, "fake_lr": 3e-3, "student_warmup_steps": 2, "fake_warmup_steps": 4},
            "train": {"steps": 20, "batch_size": 4, "log_every": 5, "checkpoint_every": 10},
        },
    }
    pipeline_class_name = "FluxPipeline"
    text_tensors = ("encoder_hidden_states", "pooled_projections")
    default_max_sequence_length = 512  # FluxPipeline's T5 default
    # peft's defaults for Flux in the SD3 names (the attention linears of both block kinds).
    lora_attention_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                              "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
    lora_ff_targets = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

    def build(self, cfg, device):
        from diffusers import FluxTransformer2DModel

        preset = cfg.model.preset
        if preset == "flux":
            root = require_model_dir(cfg, preset)
            bank_sampler, null = prompt_source(cfg, device, self.text_tensors)
            teacher = FluxTransformer2DModel.from_pretrained(str(root), subfolder=transformer_subfolder(root),
                                                             torch_dtype=torch.float32)
            channels = teacher.config.in_channels // 4
        else:
            tiny = preset == "flux-tiny"
            arch = dict(FLUX_TINY_ARCH if tiny else FLUX_DEV_ARCH)
            if not tiny and cfg.model.layers is not None:  # double-stream blocks; single-stream blocks twice as many
                arch["num_layers"], arch["num_single_layers"] = cfg.model.layers, 2 * cfg.model.layers
            torch.manual_seed(cfg.train.seed)
            with torch.device(device):
                teacher = FluxTransformer2DModel(**arch)
            tokens = FLUX_TINY_TEXT_TOKENS if tiny else FLUX_TEXT_TOKENS
            bank, null = random_bank(8 if tiny else 4, {"encoder_hidden_states": (tokens, arch["joint_attention_dim"]),
                                                        "pooled_projections": (arch["pooled_projection_dim"],)}, device)
            bank_sampler = PromptBank(bank)
            channels = FLUX_LATENT_CHANNELS
        side = self.latent_side(cfg)
        adapter = FluxAdapter(null, guidance_embeds=teacher.config.guidance_embeds)
        return teacher.to(device), adapter, WithGuidance(bank_sampler, cfg.model.flux_guidance), (channels, side, side)

    def encode(self, pipe, prompts, device, max_sequence_length):
        """FluxPipeline.encode_prompt: CLIP-L pooled + T5."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sampling_cond(self, cfg, cond):
        # FluxAdapter: the guidance embedding the student was trained with
        n = cond["encoder_hidden_states"].shape[0]
        device = cond["encoder_hidden_states"].device
        return {**cond, "guidance": torch.full((n,), float(cfg.model.flux_guidance), device=device)}

    def pipeline_call_kwargs(self, meta):
        n = meta.get("max_sequence_length")
        return {"max_sequence_length": n} if n else {}

    def export_guidance_scale(self, cfg) -> float:
        # A Flux student keeps the guidance embedding it was trained with (FluxPipeline feeds guidance_scale to it).
        return float(cfg.model.flux_guidance)


FAMILY = FluxFamily()
