"""Stable Diffusion 3 (SD3Transformer2DModel, StableDiffusion3Pipeline): the paper's first model.

Presets:
- ``sd3-medium``: a local diffusers SD3-Medium directory (`model.path`) and precomputed prompt embeddings
  (`model.prompt_embeds`); the official recipe (batch size and length aside: docs/algorithm.md).
- ``sd3-medium-shape``: random-init SD3-Medium architecture (`model.layers`, `model.resolution`) with random
  embeddings, for benchmarks.
- ``tiny``: random-init tiny SD3-architecture model with random text embeddings, for tests and quick CPU
  runs. Shorter rollouts (Nmax 8), no shift, larger learning rates and short LR warm-ups than the SD3 recipe
  so that 20 CPU steps show learning.
Shift: static, the directory's scheduler_config.json, else SD3-Medium's 3.0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cond import cond_batch_size
from ..schedule import Shift
from .base import ModelFamily, PromptBank, prompt_source, random_bank, require_model_dir, transformer_subfolder

SD3_MEDIUM_ARCH = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens
TINY_ARCH = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
TINY_TEXT_TOKENS = 6
SD3_SHIFT = 3.0  # SD3-Medium's scheduler_config.json
# The official LoRA targets (cdm/models/model_adapters.py SD3_LORA_TARGET_MODULES / SD3_LORA_FF_MODULES).
SD3_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
               "attn.to_out.0", "attn.to_q", "attn.to_v"]
SD3_FF_TARGETS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


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


def sd3_from_arch(arch: dict[str, Any], seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)  # diffusers initialises with the global RNG
    return SD3Transformer2DModel(**arch)


class SD3Family(ModelFamily):
    name = "sd3"
    model_dir_presets = ("sd3-medium",)
    presets = {
        "tiny": {
            "schedule": {"max_steps": 8, "shift": 1.0},
            "optim": {"student_lr": 1e-4, "fake_lr": 3e-3, "student_warmup_steps": 2, "fake_warmup_steps": 4},
            "train": {"steps": 20, "batch_size": 4, "log_every": 5, "checkpoint_every": 10},
        },
        "sd3-medium": {
            "train": {"batch_size": 4, "log_every": 10, "checkpoint_every": 500},
        },
        "sd3-medium-shape": {
            "train": {"batch_size": 4},
        },
    }
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_tensors = ("encoder_hidden_states", "pooled_projections")
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's T5 default
    lora_attention_targets = SD3_TARGETS
    lora_ff_targets = SD3_FF_TARGETS

    def shift(self, cfg) -> Shift:
        if cfg.model.preset != "sd3-medium":  # random-init presets: SD3-Medium's value
            return self.default_shift(cfg)
        return super().shift(cfg)

    def default_shift(self, cfg) -> Shift:
        return Shift(SD3_SHIFT)

    def build(self, cfg, device):
        preset, seed = cfg.model.preset, cfg.train.seed
        pooled_dim = "pooled_projection_dim"
        if preset == "tiny":
            teacher = sd3_from_arch(TINY_ARCH, seed)
            bank, null = random_bank(8, {"encoder_hidden_states": (TINY_TEXT_TOKENS, TINY_ARCH["joint_attention_dim"]),
                                         "pooled_projections": (TINY_ARCH[pooled_dim],)}, device)
            latent = (TINY_ARCH["in_channels"], TINY_ARCH["sample_size"], TINY_ARCH["sample_size"])
            return teacher.to(device), SD3Adapter(null), PromptBank(bank), latent
        if preset == "sd3-medium-shape":
            arch = dict(SD3_MEDIUM_ARCH)
            if cfg.model.layers is not None:
                arch["num_layers"] = cfg.model.layers
            side = cfg.model.resolution // 8
            arch["sample_size"] = side
            with torch.device(device):
                teacher = sd3_from_arch(arch, seed)
            bank, null = random_bank(4, {"encoder_hidden_states": (SD3_TEXT_TOKENS, arch["joint_attention_dim"]),
                                         "pooled_projections": (arch[pooled_dim],)}, device)
            return teacher, SD3Adapter(null), PromptBank(bank), (arch["in_channels"], side, side)
        # sd3-medium
        from diffusers import SD3Transformer2DModel

        root = require_model_dir(cfg, preset)
        sampler, null = prompt_source(cfg, device, self.text_tensors)
        teacher = SD3Transformer2DModel.from_pretrained(str(root), subfolder=transformer_subfolder(root),
                                                        torch_dtype=torch.float32)
        side = cfg.model.resolution // 8
        return teacher.to(device), SD3Adapter(null), sampler, (teacher.config.in_channels, side, side)

    def encode(self, pipe, prompts, device, max_sequence_length):
        """StableDiffusion3Pipeline.encode_prompt: CLIP-L + CLIP-G + T5 (prompt_2/3 default to prompt)."""
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def pipeline_call_kwargs(self, meta):
        n = meta.get("max_sequence_length")
        return {"max_sequence_length": n} if n else {}


FAMILY = SD3Family()
