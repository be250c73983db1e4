"""A finished or running training run, read back: its checkpoint, its student, its sampling schedule.

Shared by `export`, `sample` and evaluation (none of which imports another).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .errors import ConfigError
from .models.build import build_teacher

OFFICIAL_INFERENCE_SIGMAS = [1.0, 0.75, 0.5, 0.25]
META_NAME = "cdm_export.json"  # written by `cdm-train export` next to the pipeline


def load_run(run: str | Path) -> dict[str, Any]:
    """The checkpoint of a run directory or file: checkpoint.pt, or an FSDP2 DCP directory (converted)."""
    from .distributed import DCP_DIR, DCP_META

    path = Path(run)
    if path.is_file():
        return ckpt.load(path)
    if (path / ckpt.CHECKPOINT_NAME).is_file():
        return ckpt.load(path)
    dcp_dir = path if (path / DCP_META).is_file() else path / DCP_DIR
    if (dcp_dir / DCP_META).is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            flat = Path(tmp) / "full.pt"
            dcp_to_torch_save(str(dcp_dir), str(flat))
            state = torch.load(flat, map_location="cpu", weights_only=False)
        state.update(ckpt.load(dcp_dir / DCP_META))
        return state
    raise ConfigError(f"--checkpoint: no {ckpt.CHECKPOINT_NAME} or {DCP_DIR}/ in {str(path)!r}")


def trained_sigmas(cfg) -> list[float]:
    """The few-step schedule the student is meant to be sampled with (before the scheduler's shift)."""
    if cfg.schedule.fixed is not None:
        return [float(s) for s in cfg.schedule.fixed]
    return list(OFFICIAL_INFERENCE_SIGMAS)


def load_student(state: dict[str, Any], cfg, *, ema: bool, device=None):
    """(transformer with the student's (EMA) weights, LoRA merged; adapter; cond sampler; latent shape).

    Builds one copy of the model only (the teacher's architecture, the student's weights), not the
    trainer's three.
    """
    device = device or torch.device("cpu")
    model, adapter, sample_cond, latent = build_teacher(cfg, device)
    model = model.float()
    weights = state["ema"] if ema else state["student"]
    if cfg.lora.student:
        from .lora import FAKE, STUDENT, attach

        student, _, _ = attach(cfg, model.eval().requires_grad_(False), None)
        student.load_state_dict(weights)
        peft_model = student.peft_model
        peft_model.delete_adapter(FAKE)
        peft_model.set_adapter(STUDENT)
        model = peft_model.merge_and_unload()
    else:
        model.load_state_dict(weights)
    return model.eval(), adapter, sample_cond, tuple(latent)


def student_transformer(state: dict[str, Any], cfg, *, ema: bool) -> torch.nn.Module:
    """A plain diffusers transformer holding the student's (EMA) weights, LoRA merged."""
    return load_student(state, cfg, ema=ema)[0]


def prompt_max_sequence_length(cfg) -> int:
    """The text length the run's embeddings were encoded with (`encode-prompts` records it in index.json), so
    prompts encoded at sampling time look like the training conditioning; else the family's default."""
    emb = Path(cfg.model.prompt_embeds or "")
    if cfg.model.prompt_embeds and (emb / "index.json").is_file():
        n = json.loads((emb / "index.json").read_text()).get("max_sequence_length")
        if isinstance(n, int) and n > 0:
            return n
    return cfg.family.default_max_sequence_length
