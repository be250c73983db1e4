"""Presets: named config overrides plus how each one builds its networks and prompts.

- ``digits``: the embedded default (sklearn handwritten digits, class-conditional
  teacher shipped in the package; see docs/demo.md).
- ``tiny``: random-init tiny SD3-architecture model with random text embeddings, for
  tests and quick CPU runs. Shorter rollouts (Nmax 8), no shift, larger learning rates
  and short LR warm-ups than the SD3 recipe so that 20 CPU steps show learning.
- ``sd3-medium``: a local diffusers SD3-Medium directory (`model.path`) and
  precomputed prompt embeddings (`model.prompt_embeds`); the official recipe (batch size and length aside: README).
- ``sd3-medium-shape``: random-init SD3-Medium architecture (`model.layers`,
  `model.resolution`) with random embeddings, for benchmarks.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import ClassLabelAdapter, Cond, ModelAdapter, SD3Adapter
from .config import Config, ConfigError
from .schedule import Shift, shift_from_scheduler_config

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "schedule": {"max_steps": 8, "shift": 1.0},
        "optim": {"student_lr": 1e-4, "fake_lr": 3e-3, "student_warmup_steps": 2, "fake_warmup_steps": 4},
        "train": {"steps": 20, "batch_size": 4, "log_every": 5, "checkpoint_every": 10},
    },
    "digits": {  # tuned on the shipped digits teacher; the reasons are in docs/demo.md
        "schedule": {"max_steps": 12, "shift": 1.0},  # the digits teacher was trained on unshifted sigmas
        "loss": {"guidance_scale": 0.5},
        "optim": {"student_lr": 2e-5, "fake_lr": 2e-4, "ema_decay": 0.95, "fake_merge_decay": 1.0},
        "train": {"steps": 400, "batch_size": 32, "log_every": 10, "checkpoint_every": 200},
    },
    "sd3-medium": {
        "train": {"batch_size": 4, "log_every": 10, "checkpoint_every": 500},
    },
    "sd3-medium-shape": {
        "train": {"batch_size": 4},
    },
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
FLUX_PRESETS = ("flux", "flux-shape", "flux-tiny")

SD3_MEDIUM_ARCH = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens
TINY_ARCH = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
TINY_TEXT_TOKENS = 6
FLUX_DEV_ARCH = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56))
FLUX_TEXT_TOKENS = 512  # T5 tokens (FluxPipeline max_sequence_length)
FLUX_TINY_ARCH = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                      axes_dims_rope=(2, 2, 4))
FLUX_LATENT_CHANNELS = 16  # unpacked; the transformer sees 2x2 packs of 64


class PromptBank:
    """Conditioning drawn uniformly from a fixed set of prompt embeddings kept on the device."""

    def __init__(self, embeddings: dict[str, torch.Tensor]):
        self.embeddings = embeddings
        self.size = next(iter(embeddings.values())).shape[0]

    def __call__(self, batch: int, generator: torch.Generator) -> Cond:
        return self.take(torch.randint(self.size, (batch,), generator=generator))

    def take(self, rows) -> Cond:
        """The embeddings of these rows (a list or an int64 tensor): the official order's path."""
        device = next(iter(self.embeddings.values())).device
        index = torch.as_tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        return {k: v.index_select(0, index) for k, v in self.embeddings.items()}


@dataclass
class Models:
    """Everything the trainer needs to know about the networks and the conditioning."""

    student: torch.nn.Module
    fake: torch.nn.Module
    teacher: torch.nn.Module
    adapter: ModelAdapter
    sample_cond: Any  # (batch, host_generator) -> cond on the device
    latent_shape: tuple[int, ...]
    shift: Shift = Shift(1.0)  # how the model's scheduler shifts the rollout / sampling schedule


SD3_SHIFT = 3.0  # SD3-Medium's scheduler_config.json
FLUX_TINY_SIDE = 8


def resolve_shift(cfg: Config) -> Shift:
    """schedule.shift when set; else the model's own: the scheduler config in model.path, else SD3's 3.0."""
    if cfg.schedule.shift is not None:
        return Shift(float(cfg.schedule.shift))
    if cfg.model.preset in FLUX_PRESETS:  # resolution-dependent (dynamic) shift, as FluxPipeline computes it
        from .schedule import flux_mu

        side = FLUX_TINY_SIDE if cfg.model.preset == "flux-tiny" else cfg.model.resolution // 8
        seq_len = (side // 2) ** 2
        if cfg.model.preset == "flux" and cfg.model.path:
            found = shift_from_scheduler_config(cfg.model.path, image_seq_len=seq_len)
            if found is not None:
                return found
        return Shift(mu=flux_mu(seq_len))
    if cfg.model.preset == "sd3-medium" and cfg.model.path:
        found = shift_from_scheduler_config(cfg.model.path)
        if found is not None:
            return found
    return Shift(SD3_SHIFT)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return device


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.teacher_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.teacher_dtype]


def _random_bank(n: int, tokens: int, dim: int, pooled: int, device, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    bank = {
        "encoder_hidden_states": torch.randn(n, tokens, dim, generator=g),
        "pooled_projections": torch.randn(n, pooled, generator=g),
    }
    null = {k: torch.zeros_like(v[:1]) for k, v in bank.items()}  # random-init models: no encoder to encode ""
    return {k: v.to(device) for k, v in bank.items()}, {k: v.to(device) for k, v in null.items()}


def _sd3_from_arch(arch: dict[str, Any], seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)  # diffusers initialises with the global RNG
    return SD3Transformer2DModel(**arch)


def _load_prompt_embeds(path: str, device):
    """A .pt or .safetensors file with encoder_hidden_states (N, L, D), pooled_projections (N, P)
    and null_encoder_hidden_states (1, L, D), null_pooled_projections (1, P): the encoded empty prompt."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.prompt_embeds: file {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(p))
    else:
        data = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("encoder_hidden_states", "pooled_projections"):
        if key not in data:
            raise ConfigError(f"model.prompt_embeds: {path!r} has no {key!r} tensor")
    bank = {k: data[k].float().to(device) for k in ("encoder_hidden_states", "pooled_projections")}
    # The official unconditional input is the *encoded empty prompt*; zeros would be another model input.
    missing = [f"null_{k}" for k in bank if f"null_{k}" not in data]
    if missing:
        raise ConfigError(f"model.prompt_embeds: {path!r} has no {' / '.join(repr(k) for k in missing)} tensor: the "
                          f"CFG null condition must be the encoded empty prompt \"\" (zeros are not equivalent). "
                          f"Re-create the file with `cdm-train encode-prompts`, or add the empty prompt's embeddings "
                          f"under those keys")
    null = {k: data[f"null_{k}"].float().to(device) for k in bank}
    return bank, null


def build_teacher(cfg: Config, device: torch.device):
    """(teacher in fp32 on the device, adapter, cond sampler, latent shape) for the config's preset."""
    preset = cfg.model.preset
    seed = cfg.train.seed
    if preset == "tiny":
        teacher = _sd3_from_arch(TINY_ARCH, seed)
        bank, null = _random_bank(8, TINY_TEXT_TOKENS, TINY_ARCH["joint_attention_dim"],
                                  TINY_ARCH["pooled_projection_dim"], device)
        latent = (TINY_ARCH["in_channels"], TINY_ARCH["sample_size"], TINY_ARCH["sample_size"])
        return teacher.to(device), SD3Adapter(null), PromptBank(bank), latent
    if preset == "sd3-medium-shape":
        arch = dict(SD3_MEDIUM_ARCH)
        if cfg.model.layers is not None:
            arch["num_layers"] = cfg.model.layers
        side = cfg.model.resolution // 8
        arch["sample_size"] = side
        with torch.device(device):
            teacher = _sd3_from_arch(arch, seed)
        bank, null = _random_bank(4, SD3_TEXT_TOKENS, arch["joint_attention_dim"], arch["pooled_projection_dim"],
                                  device)
        return teacher, SD3Adapter(null), PromptBank(bank), (arch["in_channels"], side, side)
    if preset == "sd3-medium":
        if not cfg.model.path:
            raise ConfigError("model.path: the sd3-medium preset needs a local diffusers directory")
        if not cfg.model.prompt_embeds:
            raise ConfigError("model.prompt_embeds: the sd3-medium preset needs precomputed prompt embeddings")
        from diffusers import SD3Transformer2DModel

        root = Path(cfg.model.path)
        if not root.is_dir():
            raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory")
        # The embeddings first: a bad file fails in a second, not after loading billions of weights.
        if Path(cfg.model.prompt_embeds).is_dir():  # `cdm-train encode-prompts` output: sharded, memory-mapped
            from .prompts import StreamingPromptBank

            sampler = StreamingPromptBank(cfg.model.prompt_embeds, device)
            null = sampler.null()
        else:
            bank, null = _load_prompt_embeds(cfg.model.prompt_embeds, device)
            sampler = PromptBank(bank)
        sub = "transformer" if (root / "transformer").is_dir() else None
        teacher = SD3Transformer2DModel.from_pretrained(str(root), subfolder=sub, torch_dtype=torch.float32)
        side = cfg.model.resolution // 8
        latent = (teacher.config.in_channels, side, side)
        return teacher.to(device), SD3Adapter(null), sampler, latent
    if preset in FLUX_PRESETS:
        return _build_flux(cfg, device)
    if preset == "digits":
        from . import digits

        teacher = digits.load_teacher(cfg.model.teacher_path).to(device)
        sampler = lambda batch, generator: digits.class_sampler(batch, generator, device)  # noqa: E731
        return teacher, ClassLabelAdapter(digits.NULL_CLASS), sampler, tuple(digits.LATENT_SHAPE)
    raise ConfigError(f"model.preset: unknown preset {preset!r}")


class _WithGuidance:
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


def _build_flux(cfg: Config, device: torch.device):
    from diffusers import FluxTransformer2DModel

    from .adapters import FluxAdapter

    preset = cfg.model.preset
    if preset == "flux":
        if not cfg.model.path:
            raise ConfigError("model.path: the flux preset needs a local diffusers directory")
        if not cfg.model.prompt_embeds:
            raise ConfigError("model.prompt_embeds: the flux preset needs precomputed prompt embeddings")
        root = Path(cfg.model.path)
        if not root.is_dir():
            raise ConfigError(f"model.path: {cfg.model.path!r} is not a directory")
        if Path(cfg.model.prompt_embeds).is_dir():
            from .prompts import StreamingPromptBank

            bank_sampler = StreamingPromptBank(cfg.model.prompt_embeds, device)
            null = bank_sampler.null()
        else:
            bank, null = _load_prompt_embeds(cfg.model.prompt_embeds, device)
            bank_sampler = PromptBank(bank)
        sub = "transformer" if (root / "transformer").is_dir() else None
        teacher = FluxTransformer2DModel.from_pretrained(str(root), subfolder=sub, torch_dtype=torch.float32)
        side = cfg.model.resolution // 8
        channels = teacher.config.in_channels // 4
    else:
        tiny = preset == "flux-tiny"
        arch = dict(FLUX_TINY_ARCH if tiny else FLUX_DEV_ARCH)
        if not tiny and cfg.model.layers is not None:  # double-stream blocks; single-stream blocks twice as many
            arch["num_layers"], arch["num_single_layers"] = cfg.model.layers, 2 * cfg.model.layers
        torch.manual_seed(cfg.train.seed)
        with torch.device(device):
            teacher = FluxTransformer2DModel(**arch)
        tokens = TINY_TEXT_TOKENS if tiny else FLUX_TEXT_TOKENS
        bank, null = _random_bank(8 if tiny else 4, tokens, arch["joint_attention_dim"],
                                  arch["pooled_projection_dim"], device)
        bank_sampler = PromptBank(bank)
        side = FLUX_TINY_SIDE if tiny else cfg.model.resolution // 8
        channels = FLUX_LATENT_CHANNELS
    adapter = FluxAdapter(null, guidance_embeds=teacher.config.guidance_embeds)
    return teacher.to(device), adapter, _WithGuidance(bank_sampler, cfg.model.flux_guidance), (channels, side, side)


@contextlib.contextmanager
def _quiet_diffusers():
    try:
        from diffusers.utils import logging as dlog
    except ImportError:
        yield
        return
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def build_models(cfg: Config, device: torch.device) -> Models:
    """Teacher (frozen), student and fake teacher (trainable copies of the teacher)."""
    teacher, adapter, sampler, latent = build_teacher(cfg, device)
    lora = cfg.lora.student or cfg.lora.fake
    with _quiet_diffusers():  # diffusers warns on any .to(dtype); the casts here are deliberate
        teacher = teacher.float()
        # Only the full networks are copies; LoRA networks are adapters on the frozen teacher (lora.py).
        student = copy.deepcopy(teacher).train() if not cfg.lora.student else None
        fake = copy.deepcopy(teacher).train() if not cfg.lora.fake else None
        teacher = teacher.to(teacher_dtype(cfg, device)).eval().requires_grad_(False)
    for net in (student, fake):
        if net is not None:
            net.requires_grad_(True)
    if lora:
        from .lora import attach

        student, fake, teacher = attach(cfg, teacher, student)
    return Models(student=student, fake=fake, teacher=teacher, adapter=adapter, sample_cond=sampler,
                  latent_shape=tuple(latent), shift=resolve_shift(cfg))
