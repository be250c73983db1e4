"""From a config to the three networks: the teacher (frozen), the student and the fake teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..cond import ModelAdapter
from ..errors import ConfigError
from ..schedule import Shift
from .base import quiet_diffusers

if TYPE_CHECKING:
    from ..config import Config


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


def resolve_shift(cfg: Config) -> Shift:
    """schedule.shift when set; else the model's own (its family's rule: the scheduler config in model.path,
    else the family's default: SD3 3.0, dynamic mu for Flux and LongCat)."""
    if cfg.schedule.shift is not None:
        return Shift(float(cfg.schedule.shift))
    return cfg.family.shift(cfg)


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


def build_teacher(cfg: Config, device: torch.device):
    """(teacher in fp32 on the device, adapter, cond sampler, latent shape) for the config's preset."""
    return cfg.family.build(cfg, device)


def build_models(cfg: Config, device: torch.device) -> Models:
    """Teacher (frozen), student and fake teacher (trainable copies of the teacher)."""
    teacher, adapter, sampler, latent = build_teacher(cfg, device)
    lora = cfg.lora.student or cfg.lora.fake
    with quiet_diffusers():  # diffusers warns on any .to(dtype); the casts here are deliberate
        teacher = teacher.float()
        # Only the full networks are copies; LoRA networks are adapters on the frozen teacher (lora.py).
        student = copy.deepcopy(teacher).train() if not cfg.lora.student else None
        fake = copy.deepcopy(teacher).train() if not cfg.lora.fake else None
        teacher = teacher.to(teacher_dtype(cfg, device)).eval().requires_grad_(False)
    for net in (student, fake):
        if net is not None:
            net.requires_grad_(True)
    if lora:
        from ..lora import attach

        student, fake, teacher = attach(cfg, teacher, student)
    return Models(student=student, fake=fake, teacher=teacher, adapter=adapter, sample_cond=sampler,
                  latent_shape=tuple(latent), shift=resolve_shift(cfg))
