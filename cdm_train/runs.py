"""A finished or running training run, read back: its checkpoint, its student, its sampling schedule.

Shared by `export`, `sample` and evaluation (none of which imports another).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .errors import CheckpointError, ConfigError
from .models.build import build_teacher

OFFICIAL_INFERENCE_SIGMAS = [1.0, 0.75, 0.5, 0.25]
META_NAME = "cdm_export.json"  # written by `cdm-train export` next to the pipeline


def load_run(run: str | Path) -> dict[str, Any]:
    """The checkpoint of a run directory or file: checkpoint.pt, or an FSDP2 DCP directory (converted)."""
    from .distributed import DCP_DIR, DCP_META

    path = Path(run)
    if path.is_file() or (path / ckpt.CHECKPOINT_NAME).is_file():
        return _a_run_state(ckpt.load(path), path)
    dcp_dir = path if (path / DCP_META).is_file() else path / DCP_DIR
    if (dcp_dir / DCP_META).is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        meta = ckpt.load(dcp_dir / DCP_META)
        with tempfile.TemporaryDirectory() as tmp:
            flat = Path(tmp) / "full.pt"
            try:
                dcp_to_torch_save(str(dcp_dir), str(flat))
            except Exception as exc:  # noqa: BLE001 - a missing or damaged shard, in whatever form DCP reports it
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise CheckpointError(f"distributed checkpoint {str(dcp_dir)!r} cannot be read: a shard is missing "
                                      f"or damaged ({type(exc).__name__}: {detail})") from exc
            state = torch.load(flat, map_location="cpu", weights_only=False)
        state.update(meta)
        return _a_run_state(state, dcp_dir)
    raise ConfigError(f"--checkpoint: no {ckpt.CHECKPOINT_NAME} or {DCP_DIR}/ in {str(path)!r}")


def _a_run_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """`state`, when it is a training checkpoint (another torch file fails here, not as a KeyError later)."""
    missing = [k for k in ("config", "step", "student", "ema") if k not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a cdm-train training checkpoint (no {', '.join(missing)})")
    return state


# What a training run writes into its directory (train.out_dir). The DCP names: distributed.DCP_DIR and the
# .old/.tmp copies its atomic swap leaves behind (kept literal here: importing distributed pulls in
# torch.distributed for a directory listing).
CHECKPOINT_FILES = (ckpt.CHECKPOINT_NAME, "checkpoint_dcp", "checkpoint_dcp.old")
RUN_FILES = (*CHECKPOINT_FILES, "checkpoint_dcp.tmp", "log.jsonl", ckpt.RUN_CONFIG_NAME, "tensorboard",
             "wandb_run_id", "wandb")  # the last two: train.wandb (a resumed run continues that W&B run)
REPLACED_PREFIX = "replaced-"


def run_files(out_dir: str | Path) -> list[str]:
    """The names of a previous run's files in `out_dir` (empty: nothing a new run would overwrite or append to)."""
    out = Path(out_dir)
    return [name for name in RUN_FILES if (out / name).exists()]


def guard_run_dir(out_dir: str | Path, *, overwrite: bool, is_main: bool = True) -> Path | None:
    """Before a new (not resumed) run: refuse a directory that holds a run, or with `overwrite` move its files
    aside into `out_dir/replaced-<UTC time>/` (returned; nothing is deleted). Touches nothing when it refuses.

    Only the main process moves files (under torchrun every rank calls this before any joins the process group,
    so the others must not race it); every rank refuses alike, as they all see the same directory."""
    found = run_files(out_dir)
    if not found:
        return None
    if not overwrite:
        has_checkpoint = any(name in CHECKPOINT_FILES for name in found)
        what = "a checkpoint" if has_checkpoint else "the log of an earlier run (no checkpoint)"
        hint = "--resume to continue it, or " if has_checkpoint else ""
        raise ConfigError(f"--out {str(out_dir)!r} holds {what} ({', '.join(found)}); a new run would overwrite "
                          f"it. Pass {hint}--overwrite to move the old run's files aside into "
                          f"{str(out_dir)}/{REPLACED_PREFIX}<time>/ and start afresh, or choose another --out")
    if not is_main:
        return None
    out = Path(out_dir)
    dest = out / (REPLACED_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    suffix = 1
    while dest.exists():  # two --overwrite runs in the same second
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{suffix}")
        suffix += 1
    dest.mkdir(parents=True)
    for name in found:
        os.replace(out / name, dest / name)  # a rename within one file system: no copy, nothing lost
    return dest


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
