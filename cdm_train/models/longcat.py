"""LongCat-Image (LongCatImageTransformer2DModel, LongCatImagePipeline): the paper's second model.

The transformer is Flux-like: 2x2-packed latents (16 channels -> 64 per token), rotary position ids for the
text and image tokens, ``timestep = sigma`` (the pipeline divides its 0..1000 timesteps by 1000 and the model
scales back), no pooled text vector, no guidance embedding (true CFG: a second pass on the empty prompt).
Its text encoder is Qwen2.5-VL: the last hidden state of the prompt inside the pipeline's chat template,
padded to 512 tokens (`LongCatImagePipeline.tokenizer_max_length`), the empty prompt included.

Position ids, as LongCatImagePipeline.prepare_pos_ids builds them: text token j is (0, j, j); image token
(r, c) of the packed grid is (1, 512 + r, 512 + c) -- the image offset is the pipeline's fixed 512 whatever
the text length.

Presets (the official ``longcat()`` of config/config.py where it says):
- ``longcat``: a local diffusers LongCat-Image directory (`model.path`) and `encode-prompts` embeddings;
  batch 8 per GPU, update ratio 2, learning rates 1e-5 (student) / 5e-6 (fake teacher), 1024 px,
  512-token text, the scheduler's dynamic shift (mu from the image token count, diffusers'
  calculate_shift with the directory's scheduler config). The official ``longcat()`` also sets
  ``config.random_sigma_min = 0.02`` / ``random_sigma_max = 0.98`` -- at the config *root*, where nothing
  reads them: the sampler reads ``config.sample.random_sigma_*``, so the official inner rollout sigmas
  stay U(0.25, 0.95). This preset reproduces what the official code does (our defaults 0.25 / 0.95),
  not what the line seems to mean.
- ``longcat-shape``: random-init LongCat-Image architecture (`model.layers`, `model.resolution`), random
  embeddings, for benchmarks.
- ``longcat-tiny``: random-init tiny LongCat for tests and CPU runs.
"""

from __future__ import annotations

import torch

from ..cond import cond_batch_size
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

# LongCat-Image (about 6 B parameters): 10 double-stream + 20 single-stream blocks, hidden 3072 (24 x 128), text
# width 3584 (Qwen2.5-VL-7B). Taken from a public port's constants (mflux), not read from the model's
# transformer/config.json (no network here); `longcat` loads the real config from model.path. The diffusers class
# defaults (19 + 38 blocks) are Flux-dev's depth, not LongCat's.
LONGCAT_ARCH = dict(patch_size=1, in_channels=64, num_layers=10, num_single_layers=20, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=3584, pooled_projection_dim=3584,
                    axes_dims_rope=(16, 56, 56))
LONGCAT_TEXT_TOKENS = 512  # LongCatImagePipeline.tokenizer_max_length
LONGCAT_IMAGE_ID_START = 512  # prepare_latents: start=(tokenizer_max_length, tokenizer_max_length), always 512
LONGCAT_TINY_ARCH = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                         axes_dims_rope=(2, 2, 4))
LONGCAT_TINY_TEXT_TOKENS = 6
LONGCAT_LATENT_CHANNELS = 16
LONGCAT_TINY_SIDE = 8
# The official LoRA targets (cdm/models/model_adapters.py LONGCAT_LORA_TARGET_MODULES / _FF_MODULES).
LONGCAT_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                   "attn.add_v_proj", "attn.to_add_out"]
LONGCAT_FF_TARGETS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def longcat_text_ids(num_tokens: int, device) -> torch.Tensor:
    """(L, 3) ids (0, j, j) of the text tokens (prepare_pos_ids(modality_id=0, type="text"))."""
    ids = torch.zeros(num_tokens, 3, device=device)
    ar = torch.arange(num_tokens, device=device, dtype=torch.float32)
    ids[:, 1], ids[:, 2] = ar, ar
    return ids


def longcat_image_ids(h: int, w: int, device) -> torch.Tensor:
    """(H/2 * W/2, 3) ids (1, 512 + row, 512 + col) of the packed image tokens (prepare_pos_ids type="image")."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 0] = 1
    ids[..., 1] += torch.arange(h // 2, device=device, dtype=torch.float32)[:, None] + LONGCAT_IMAGE_ID_START
    ids[..., 2] += torch.arange(w // 2, device=device, dtype=torch.float32)[None, :] + LONGCAT_IMAGE_ID_START
    return ids.reshape(-1, 3)


class LongCatAdapter:
    """diffusers LongCatImageTransformer2DModel on the trainer's unpacked (B, C, H, W) latents.

    cond = {"encoder_hidden_states": (B, L, D)}; ``uncond`` is the encoded empty prompt (true CFG, as the
    pipeline's second pass). The position ids are int64, as the official adapter passes them.
    """

    def __init__(self, null_cond: dict[str, torch.Tensor]):
        if "encoder_hidden_states" not in null_cond:
            raise ValueError("null_cond is missing ['encoder_hidden_states']")
        self.null_cond = null_cond
        self._ids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _position_ids(self, text_len: int, h: int, w: int, device):
        key = (text_len, h, w, str(device))
        if key not in self._ids:
            self._ids[key] = (longcat_text_ids(text_len, device).to(torch.int64),
                              longcat_image_ids(h, w, device).to(torch.int64))
        return self._ids[key]

    def __call__(self, model, x, sigma, cond):
        _, _, h, w = x.shape
        text = cond["encoder_hidden_states"]
        txt_ids, img_ids = self._position_ids(text.shape[1], h, w, x.device)
        out = model(hidden_states=pack_latents(x), encoder_hidden_states=text, timestep=sigma.to(torch.float32),
                    txt_ids=txt_ids, img_ids=img_ids, guidance=None, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def uncond(self, cond):
        b = cond_batch_size(cond)
        return {k: v.to(cond[k].device).expand(b, *v.shape[1:]) for k, v in self.null_cond.items()}


class LongCatFamily(PackedLatentFamily):
    name = "longcat"
    directory_preset, tiny_preset, tiny_side = "longcat", "longcat-tiny", LONGCAT_TINY_SIDE
    presets = {
        "longcat": {  # config/config.py longcat(): batch 8, update ratio 2, lr 1e-5 / 5e-6 (defaults), 1024 px
            "optim": {"update_ratio": 2},
            "train": {"batch_size": 8, "log_every": 10, "checkpoint_every": 500},
        },
        "longcat-shape": {  # random-init LongCat-Image architecture for benchmarks (model.layers, model.resolution)
            "train": {"batch_size": 4},
        },
        "longcat-tiny": {  # random-init tiny LongCat (packed latents, position ids, no pooled text) for tests
            "schedule": {"max_steps": 8},
            "optim": {"student_lr": 1e-4, "fake_lr": 3e-3, "student_warmup_steps": 2, "fake_warmup_steps": 4},
            "train": {"steps": 20, "batch_size": 4, "log_every": 5, "checkpoint_every": 10},
        },
    }
    pipeline_class_name = "LongCatImagePipeline"
    text_tensors = ("encoder_hidden_states",)
    default_max_sequence_length = LONGCAT_TEXT_TOKENS
    lora_attention_targets = LONGCAT_TARGETS
    lora_ff_targets = LONGCAT_FF_TARGETS

    def build(self, cfg, device):
        from diffusers import LongCatImageTransformer2DModel

        preset = cfg.model.preset
        if preset == "longcat":
            root = require_model_dir(cfg, preset)
            sampler, null = prompt_source(cfg, device, self.text_tensors)
            teacher = LongCatImageTransformer2DModel.from_pretrained(str(root), subfolder=transformer_subfolder(root),
                                                                     torch_dtype=torch.float32)
            channels = teacher.config.in_channels // 4
        else:
            tiny = preset == "longcat-tiny"
            arch = dict(LONGCAT_TINY_ARCH if tiny else LONGCAT_ARCH)
            if not tiny and cfg.model.layers is not None:  # double-stream blocks; single-stream twice as many
                arch["num_layers"], arch["num_single_layers"] = cfg.model.layers, 2 * cfg.model.layers
            torch.manual_seed(cfg.train.seed)  # diffusers initialises with the global RNG
            with torch.device(device):
                teacher = LongCatImageTransformer2DModel(**arch)
            tokens = LONGCAT_TINY_TEXT_TOKENS if tiny else LONGCAT_TEXT_TOKENS
            bank, null = random_bank(8 if tiny else 4, {"encoder_hidden_states": (tokens, arch["joint_attention_dim"])},
                                     device)
            sampler = PromptBank(bank)
            channels = LONGCAT_LATENT_CHANNELS
        side = self.latent_side(cfg)
        return teacher.to(device), LongCatAdapter(null), sampler, (channels, side, side)

    def encode(self, pipe, prompts, device, max_sequence_length):
        """LongCatImagePipeline.encode_prompt (the chat template, quotation-aware tokens, padded to
        `max_sequence_length`: the pipeline's 512 unless changed, which changes the model input)."""
        saved = pipe.tokenizer_max_length  # also the image position-id offset: restored for any later sampling
        pipe.tokenizer_max_length = int(max_sequence_length)
        try:
            embeds, _ = pipe.encode_prompt(prompt=prompts)
        finally:
            pipe.tokenizer_max_length = saved
        return {"encoder_hidden_states": embeds}

    def load_text_pipeline(self, root, device, dtype):
        from diffusers import LongCatImagePipeline

        kw = {} if (root / "text_processor").is_dir() else {"text_processor": None}  # only prompt rewriting uses it
        return LongCatImagePipeline.from_pretrained(str(root), transformer=None, vae=None, torch_dtype=dtype,
                                                    **kw).to(device)

    def load_pipeline(self, root, dtype):
        from diffusers import LongCatImagePipeline

        kw = {} if (root / "text_processor").is_dir() else {"text_processor": None}
        return LongCatImagePipeline.from_pretrained(str(root), torch_dtype=dtype, **kw)

    def pipeline_call_kwargs(self, meta):
        # No CFG renorm games at guidance 1, and no Qwen prompt rewriting (official: eval.enable_prompt_rewrite
        # False), so the exported student sees the prompt as it was encoded for training.
        return {"enable_prompt_rewrite": False}


FAMILY = LongCatFamily()
