"""Class-conditional models called as ``model(x, timestep, labels)``: the embedded digits default.

Preset ``digits``: sklearn's handwritten digits and the class-conditional SD3-architecture teacher shipped
in the package (docs/demo.md). No diffusers pipeline: sample and evaluate with `cdm-train sample` / digits/eval.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..schedule import Shift
from .base import ModelFamily


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


class ClassLabelFamily(ModelFamily):
    name = "class_label"
    presets = {
        "digits": {  # tuned on the shipped digits teacher; the reasons are in docs/demo.md
            "schedule": {"max_steps": 12, "shift": 1.0},  # the digits teacher was trained on unshifted sigmas
            "loss": {"guidance_scale": 0.5},
            "optim": {"student_lr": 2e-5, "fake_lr": 2e-4, "ema_decay": 0.95, "fake_merge_decay": 1.0},
            "train": {"steps": 400, "batch_size": 32, "log_every": 10, "checkpoint_every": 200},
        },
    }
    # The digits teacher is an SD3 transformer inside a class-embedding wrapper: the SD3 linear names.
    lora_attention_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                              "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
    lora_ff_targets = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

    def input_problems(self, cfg) -> list[str]:
        path = cfg.model.teacher_path
        if path is not None and not Path(path).is_file():
            return [f"model.teacher_path: {path!r} does not exist (train one with `cdm-train train-teacher`, or "
                    f"leave it unset for the shipped teacher)"]
        return []

    def default_shift(self, cfg) -> Shift:
        return Shift(3.0)  # unused by the preset (it sets schedule.shift 1.0); SD3's value, as before

    def build(self, cfg, device):
        from .. import digits

        teacher = digits.load_teacher(cfg.model.teacher_path).to(device)
        sampler = lambda batch, generator: digits.class_sampler(batch, generator, device)  # noqa: E731
        return teacher, ClassLabelAdapter(digits.NULL_CLASS), sampler, tuple(digits.LATENT_SHAPE)


FAMILY = ClassLabelFamily()
