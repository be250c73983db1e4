"""The class-conditional digits teacher: a tiny diffusers SD3Transformer2DModel.

Classes play the role of prompts: learned class embeddings (10 digits + the null class)
become the encoder hidden states (CONTEXT_TOKENS tokens) and the pooled projection, so
the model exercises the same transformer as the real SD3 path. Called as
``model(x, timestep, labels) -> v`` (timestep = 1000 * sigma), which is what
``cdm_train.models.class_label.ClassLabelAdapter`` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import LATENT_SHAPE, NULL_CLASS, NUM_CLASSES

# 16 image tokens (8x8, patch 2) + 1 class token, width 64: ~0.3 M parameters, about
# 2 MFLOP per image per forward, so CPU distillation finishes in minutes.
DEFAULT_ARCH: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=1, num_layers=2, attention_head_dim=32, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32, out_channels=1,
    pos_embed_max_size=4,
)
CONTEXT_TOKENS = 1
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TEACHER_PATH = ASSET_DIR / "digits_teacher.pt"


class DigitsTransformer(nn.Module):
    """SD3Transformer2DModel plus learned class embeddings; forward(x, timestep, labels) -> velocity."""

    def __init__(self, arch: dict[str, Any] | None = None, context_tokens: int = CONTEXT_TOKENS):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.arch = dict(DEFAULT_ARCH if arch is None else arch)
        self.context_tokens = int(context_tokens)
        self.transformer = SD3Transformer2DModel(**self.arch)
        ctx_dim, pooled_dim = self.arch["joint_attention_dim"], self.arch["pooled_projection_dim"]
        self.class_context = nn.Embedding(NUM_CLASSES + 1, self.context_tokens * ctx_dim)
        self.class_pooled = nn.Embedding(NUM_CLASSES + 1, pooled_dim)
        nn.init.normal_(self.class_context.weight, std=1.0)
        nn.init.normal_(self.class_pooled.weight, std=1.0)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        labels = labels.to(x.device, torch.long)
        ctx = self.class_context(labels).view(b, self.context_tokens, -1).to(x.dtype)
        pooled = self.class_pooled(labels).to(x.dtype)
        timestep = torch.as_tensor(timestep, device=x.device, dtype=torch.float32).expand(b)
        return self.transformer(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                                timestep=timestep, return_dict=False)[0]

    def config(self) -> dict[str, Any]:
        return {"arch": dict(self.arch), "context_tokens": self.context_tokens}


def build_digits_model(seed: int = 0, arch: dict[str, Any] | None = None) -> DigitsTransformer:
    """A randomly initialised digits model (deterministic in `seed`; diffusers uses the global RNG)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return DigitsTransformer(arch)
    finally:
        torch.random.set_rng_state(state)


def save_checkpoint(model: DigitsTransformer, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Atomic write (temp file in the same directory, then os.replace): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "cdm-digits-teacher/1", "config": model.config(),
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               "meta": dict(meta or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike) -> tuple[DigitsTransformer, dict[str, Any]]:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "cdm-digits-teacher/1":
        raise ValueError(f"{str(path)!r} is not a digits teacher checkpoint (written by train_teacher)")
    cfg = payload["config"]
    model = DigitsTransformer(cfg["arch"], cfg["context_tokens"])
    model.load_state_dict(payload["state_dict"])
    return model, payload.get("meta", {})


def load_teacher(path: str | os.PathLike | None = None) -> DigitsTransformer:
    """The trained digits teacher in fp32 eval mode. path None: the checkpoint shipped in the package."""
    p = Path(path) if path is not None else DEFAULT_TEACHER_PATH
    if not p.is_file():
        where = "the checkpoint shipped in the package" if path is None else "the given checkpoint"
        raise FileNotFoundError(
            f"digits teacher not found: {where} {str(p)!r} does not exist. Train one with "
            f"`cdm-train train-teacher --out {p}` (a few minutes on a CPU), or pass its path.")
    model, _ = load_checkpoint(p)
    return model.float().eval()


__all__ = ["DigitsTransformer", "build_digits_model", "load_teacher", "save_checkpoint", "load_checkpoint",
           "DEFAULT_TEACHER_PATH", "DEFAULT_ARCH", "LATENT_SHAPE", "NULL_CLASS", "NUM_CLASSES"]
