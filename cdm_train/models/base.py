"""What every model family provides, and the pieces the families share.

A family (one file under cdm_train/models/) knows, for its transformer class: its presets (named config
overrides), how to build the teacher and the conditioning sampler, how the transformer is called (its
adapter), the LoRA target linears, the diffusers pipeline it exports to and samples with, how that pipeline
encodes prompts, and its scheduler's shift rule. Nothing outside the family file needs to know which
transformer it is: adding Qwen-Image or Wan means one new file here plus its tests.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cond import Cond
from ..errors import ConfigError
from ..schedule import Shift, flux_mu, shift_from_scheduler_config

if TYPE_CHECKING:  # annotations only: the families never import the config machinery
    from ..config import Config


class ModelFamily:
    """Defaults for a diffusers text-to-image family; each family file subclasses it."""

    name = ""
    presets: dict[str, dict[str, dict[str, Any]]] = {}  # preset name -> config overrides (section -> key -> value)
    pipeline_class_name: str | None = None  # the diffusers pipeline `export` writes and `sample` loads
    text_tensors: tuple[str, ...] = ("encoder_hidden_states",)  # what encode-prompts stores per prompt
    default_max_sequence_length = 256  # text tokens when the run's embeddings do not record their length
    lora_attention_targets: list[str] = []
    lora_ff_targets: list[str] = []
    model_dir_presets: tuple[str, ...] = ()  # presets that read model.path and model.prompt_embeds

    def input_problems(self, cfg: Config) -> list[str]:
        """Every problem with the files the preset would read, found without loading them (one report)."""
        return model_dir_problems(cfg, cfg.model.preset) if cfg.model.preset in self.model_dir_presets else []

    def build(self, cfg: Config, device: torch.device):
        """(teacher in fp32 on `device`, adapter, cond sampler, latent shape (C, H, W)) for the preset."""
        raise NotImplementedError

    def lora_targets(self, include_ff: bool) -> list[str]:
        return list(self.lora_attention_targets) + (list(self.lora_ff_targets) if include_ff else [])

    def shift(self, cfg: Config) -> Shift:
        """The scheduler's shift when schedule.shift is unset (the model directory's own, else a default)."""
        if cfg.model.path:
            found = shift_from_scheduler_config(cfg.model.path, image_seq_len=self.image_seq_len(cfg))
            if found is not None:
                return found
        return self.default_shift(cfg)

    def default_shift(self, cfg: Config) -> Shift:
        return Shift(1.0)

    def image_seq_len(self, cfg: Config) -> int | None:
        """Image tokens per sample (dynamic-shift families compute mu from it)."""
        return None

    def encode(self, pipe, prompts: list[str], device: torch.device, max_sequence_length: int) -> dict[str, Any]:
        """The pipeline's own prompt encoding, as the tensors `text_tensors` names."""
        raise NotImplementedError

    def load_text_pipeline(self, root: Path, device: torch.device, dtype: torch.dtype):
        """The family's pipeline from `root` with its text encoders only (no transformer, no VAE)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class_name)
        return cls.from_pretrained(str(root), transformer=None, vae=None, torch_dtype=dtype).to(device)

    def load_pipeline(self, root: Path, dtype: torch.dtype):
        """The whole exported pipeline, for `sample --pipeline`."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name).from_pretrained(str(root), torch_dtype=dtype)

    def sampling_cond(self, cfg: Config, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoded prompts as the student was trained to see them (extra per-sample inputs)."""
        return cond

    def pipeline_call_kwargs(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments of the pipeline's __call__ when sampling an export."""
        return {}

    def export_guidance_scale(self, cfg: Config) -> float:
        """guidance_scale the exported pipeline samples with: 1.0, the guidance is distilled into the student."""
        return 1.0

    def decode(self, latents: torch.Tensor, model_dir: Path) -> torch.Tensor:
        """VAE decode of trainer-space (B, C, H, W) latents to pixels in [-1, 1]: latents / scaling + shift."""
        from diffusers import AutoencoderKL

        if not (model_dir / "vae").is_dir():
            raise ConfigError(f"model.path: {str(model_dir)!r} has no vae/ to decode with")
        vae = AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae").to(latents.device).float().eval()
        scale = vae.config.scaling_factor
        shift = vae.config.shift_factor or 0.0
        with torch.no_grad():
            return vae.decode(latents.float() / scale + shift).sample.clamp(-1, 1)


class PackedLatentFamily(ModelFamily):
    """Flux-like families: 2x2-packed latent tokens and a dynamic shift whose mu grows with the image token
    count (diffusers' calculate_shift). Only the preset on a model directory reads its scheduler config; the
    random-init presets use diffusers' defaults."""

    directory_preset = ""  # the preset that loads model.path
    tiny_preset = ""
    tiny_side = 8  # the tiny preset's latent side

    @property
    def model_dir_presets(self) -> tuple[str, ...]:
        return (self.directory_preset,)

    def latent_side(self, cfg: Config) -> int:
        return self.tiny_side if cfg.model.preset == self.tiny_preset else cfg.model.resolution // 8

    def image_seq_len(self, cfg: Config) -> int:
        return (self.latent_side(cfg) // 2) ** 2

    def shift(self, cfg: Config) -> Shift:
        if cfg.model.preset != self.directory_preset:
            return self.default_shift(cfg)
        return super().shift(cfg)

    def default_shift(self, cfg: Config) -> Shift:
        return Shift(mu=flux_mu(self.image_seq_len(cfg)))


# ------------------------------------------------------------------------------------------ shared pieces
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


def random_bank(n: int, shapes: dict[str, tuple[int, ...]], device, seed: int = 1234):
    """(bank, null) of random embeddings for random-init models: `n` rows of each named per-row shape, and
    zeros as the null condition (a random-init model has no encoder to encode "" with)."""
    g = torch.Generator().manual_seed(seed)
    bank = {k: torch.randn(n, *shape, generator=g) for k, shape in shapes.items()}
    null = {k: torch.zeros_like(v[:1]) for k, v in bank.items()}
    return {k: v.to(device) for k, v in bank.items()}, {k: v.to(device) for k, v in null.items()}


def load_prompt_embeds(path: str, device, tensors: tuple[str, ...] = ("encoder_hidden_states", "pooled_projections")):
    """A .pt or .safetensors file with the `tensors` (N, ...) and null_<name> (1, ...): the encoded empty
    prompt."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.prompt_embeds: file {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(p))
    else:
        data = torch.load(p, map_location="cpu", weights_only=True)
    for key in tensors:
        if key not in data:
            raise ConfigError(f"model.prompt_embeds: {path!r} has no {key!r} tensor")
    bank = {k: data[k].float().to(device) for k in tensors}
    # The official unconditional input is the *encoded empty prompt*; zeros would be another model input.
    missing = [f"null_{k}" for k in bank if f"null_{k}" not in data]
    if missing:
        raise ConfigError(f"model.prompt_embeds: {path!r} has no {' / '.join(repr(k) for k in missing)} tensor: the "
                          f"CFG null condition must be the encoded empty prompt \"\" (zeros are not equivalent). "
                          f"Re-create the file with `cdm-train encode-prompts`, or add the empty prompt's embeddings "
                          f"under those keys")
    null = {k: data[f"null_{k}"].float().to(device) for k in bank}
    return bank, null


def prompt_source(cfg: Config, device, tensors: tuple[str, ...]):
    """(sampler, null) from model.prompt_embeds: an `encode-prompts` directory (memory-mapped) or one file."""
    if Path(cfg.model.prompt_embeds).is_dir():
        from ..prompts import StreamingPromptBank

        sampler = StreamingPromptBank(cfg.model.prompt_embeds, device, tensors=tensors)
        return sampler, sampler.null()
    bank, null = load_prompt_embeds(cfg.model.prompt_embeds, device, tensors)
    return PromptBank(bank), null


def model_dir_problems(cfg: Config, preset: str) -> list[str]:
    """Everything wrong with model.path and model.prompt_embeds, all at once (a user fixes both in one try)."""
    problems = []
    m = cfg.model
    if not m.path:
        problems.append(f"model.path: the {preset} preset needs a local diffusers directory")
    elif not Path(m.path).is_dir():
        problems.append(f"model.path: {m.path!r} is not a directory")
    elif not any((Path(m.path) / sub / "config.json").is_file() for sub in ("transformer", ".")):
        problems.append(f"model.path: {m.path!r} has no transformer/config.json (nor config.json): not a diffusers "
                        f"model directory (point it at the pipeline folder that holds transformer/)")
    if not m.prompt_embeds:
        problems.append(f"model.prompt_embeds: the {preset} preset needs precomputed prompt embeddings "
                        f"(`cdm-train encode-prompts`)")
    elif not Path(m.prompt_embeds).exists():
        problems.append(f"model.prompt_embeds: {m.prompt_embeds!r} does not exist")
    return problems


def require_model_dir(cfg: Config, preset: str) -> Path:
    """model.path and model.prompt_embeds, checked before anything is loaded; every problem in one error."""
    problems = model_dir_problems(cfg, preset)
    if problems:
        raise ConfigError(problems)
    return Path(cfg.model.path)


def transformer_subfolder(root: Path) -> str | None:
    return "transformer" if (root / "transformer").is_dir() else None


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): the 2x2 patch packing of Flux and LongCat (`_pack_latents`)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for latents of spatial size (h, w)."""
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers warns on any .to(dtype); the casts where this is used are deliberate."""
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
