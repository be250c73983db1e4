"""`cdm-train export`: a trained student as files the usual tools load.

    cdm-train export --checkpoint RUN --out DIR [--format pipeline|transformer|lora] [--no-ema] [--dtype bf16]

- ``pipeline``: a diffusers pipeline directory: the teacher's other components (text encoders,
  tokenizers, VAE: copied, or symlinked with --link) from ``model.path``, the student transformer,
  a scheduler config carrying the model's shift, and ``cdm_export.json`` with the few-step sigmas the
  student was trained for. ``StableDiffusion3Pipeline.from_pretrained(DIR)`` loads it; pass
  ``sigmas=`` from cdm_export.json (the official inference: ``[1.0, 0.75, 0.5, 0.25]``, which the
  scheduler shifts).
- ``transformer``: the student transformer alone (``SD3Transformer2DModel.from_pretrained(DIR)``).
- ``lora``: a LoRA student's adapter as ``pytorch_lora_weights.safetensors``, loadable with the base
  pipeline's ``load_lora_weights(DIR)``. For a full student, a LoRA is extracted by truncated SVD of
  (student - teacher) on the LoRA target linears (``--lora-rank``, default ``lora.rank``): an
  approximation, whose errors are measured and recorded in cdm_export.json (``lora_extraction``).

Weights: the student EMA by default (the official save.py does the same), ``--no-ema`` the raw
student; LoRA students are merged into the base for ``pipeline``/``transformer``. Reads single-process
and DDP runs (``checkpoint.pt``) and FSDP2 runs (``checkpoint_dcp/``, converted on the fly).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import config_from_dict
from .errors import ConfigError
from .lora import adapter_state_dict, attach, target_modules
from .models.build import build_teacher, resolve_shift
from .runs import (  # noqa: F401 (load_run / load_student / META_NAME are also imported from here)
    META_NAME,
    OFFICIAL_INFERENCE_SIGMAS,
    load_run,
    load_student,
    prompt_max_sequence_length,
    student_transformer,
    trained_sigmas,
)

FORMATS = ("pipeline", "transformer", "lora")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pipeline_class(cfg):
    """The diffusers pipeline class of the run's model family."""
    import diffusers

    name = cfg.family.pipeline_class_name
    if name is None:
        raise ConfigError(f"--checkpoint: preset {cfg.model.preset!r} has no diffusers pipeline to export to")
    return getattr(diffusers, name)


def export(run: str | Path, out: str | Path, *, fmt: str = "pipeline", ema: bool = True, dtype: str = "bf16",
           link: bool = False, lora_rank: int | None = None) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    state = load_run(run)
    cfg = config_from_dict(state["config"])
    if cfg.family.pipeline_class_name is None:
        raise ConfigError(f"--checkpoint: a {cfg.model.preset} run has no diffusers pipeline to export; use "
                          f"`cdm-train sample`")
    out = Path(out)
    if fmt == "pipeline" and not cfg.model.path:
        raise ConfigError(f"--format pipeline: the run's model.path is unset (preset {cfg.model.preset!r}), so "
                          f"there are no text encoders / VAE to ship; use --format transformer")
    if lora_rank is not None and (fmt != "lora" or cfg.lora.student):
        raise ConfigError("--lora-rank: only for --format lora of a full student (a LoRA student's file has its "
                          f"trained rank, lora.rank={cfg.lora.rank})")
    if lora_rank is not None and lora_rank < 1:
        raise ConfigError("--lora-rank: must be >= 1")
    shift = resolve_shift(cfg)
    # guidance_scale: SD3 / LongCat students have the guidance distilled in (no CFG, 1.0); a Flux student keeps
    # the guidance embedding it was trained with (FluxPipeline feeds guidance_scale to that embedding).
    meta = {"pipeline": pipeline_class(cfg).__name__, "sigmas": trained_sigmas(cfg),
            "num_inference_steps": len(trained_sigmas(cfg)),
            "guidance_scale": cfg.family.export_guidance_scale(cfg),
            "shift": shift.value if shift.mu is None else None, "dynamic_shift_mu": shift.mu, "ema": ema,
            "max_sequence_length": prompt_max_sequence_length(cfg),  # T5 tokens the training embeddings had
            "step": int(state.get("step", 0)), "source": str(Path(run).resolve()), "preset": cfg.model.preset,
            "lora": {"student": cfg.lora.student, "fake": cfg.lora.fake, "rank": cfg.lora.rank,
                     "alpha": cfg.lora.alpha}}
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "lora" and cfg.lora.student:
        _export_lora(state, cfg, out, ema=ema, dtype=DTYPES[dtype])
    elif fmt == "lora":
        meta["lora_extraction"] = _export_lora_from_full(state, cfg, out, ema=ema, dtype=DTYPES[dtype],
                                                         rank=lora_rank or cfg.lora.rank)
    else:
        transformer = student_transformer(state, cfg, ema=ema).to(DTYPES[dtype])
        target = out / "transformer" if fmt == "pipeline" else out
        transformer.save_pretrained(str(target))
        if fmt == "pipeline":
            _copy_components(Path(cfg.model.path), out, link=link, shift=shift)
    (out / META_NAME).write_text(json.dumps(meta, indent=1))
    return out


def _export_lora(state, cfg, out: Path, *, ema: bool, dtype: torch.dtype) -> None:
    base, _, _, _ = build_teacher(cfg, torch.device("cpu"))
    view, _, _ = attach(cfg, base.float().eval().requires_grad_(False), None)
    weights = state["ema"] if ema else state["student"]
    layers = {k: v.to(dtype) for k, v in adapter_state_dict(view, weights).items()}
    _save_lora(cfg, out, layers, rank=cfg.lora.rank, alpha=_num(cfg.lora.alpha))


LORA_FILE = "pytorch_lora_weights.safetensors"


def _save_lora(cfg, out: Path, layers: dict[str, torch.Tensor], *, rank: int, alpha) -> None:
    """The adapter in diffusers' LoRA file layout: the pipeline's own save_lora_weights where it has one; else
    (LongCatImagePipeline has no LoRA loader) the same file written directly: "transformer."-prefixed keys and
    peft's adapter config as metadata, loadable with peft / `transformer.load_lora_adapter(DIR)`."""
    targets = sorted({k.rsplit(".lora_", 1)[0].split(".", 2)[-1] for k in layers})
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    cls = pipeline_class(cfg)
    if hasattr(cls, "save_lora_weights"):
        cls.save_lora_weights(str(out), transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
        return
    from safetensors.torch import save_file

    save_file({f"transformer.{k}": v.contiguous() for k, v in layers.items()}, str(out / LORA_FILE),
              metadata={"format": "pt",  # diffusers' layout: the adapter config under "transformer."-prefixed keys
                        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in meta.items()})})


def _matches(name: str, targets: list[str]) -> bool:
    """peft's rule for a string target: the module's full name, or its dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets)


@torch.no_grad()
def _export_lora_from_full(state, cfg, out: Path, *, ema: bool, dtype: torch.dtype, rank: int) -> dict[str, Any]:
    """A full student as a LoRA on the teacher: per target linear (lora.target_modules / include_ff), the
    rank-`rank` truncated SVD of (W_student - W_teacher), B = U sqrt(S), A = sqrt(S) V^T, alpha = rank (scale 1).

    Not exact: the truncation drops the delta's smaller singular directions, and parameters outside the
    target linears (biases, norms, embeddings, the final layer) keep the teacher's values. Both losses are
    measured and returned (written to cdm_export.json); --format pipeline/transformer are exact.
    """
    teacher = build_teacher(cfg, torch.device("cpu"))[0].float()
    student = state["ema"] if ema else state["student"]
    targets = target_modules(cfg)
    layers: dict[str, torch.Tensor] = {}
    kept = err = other = 0.0
    covered = set()
    for name, mod in teacher.named_modules():
        if not (isinstance(mod, torch.nn.Linear) and _matches(name, targets)):
            continue
        delta = student[f"{name}.weight"].float() - mod.weight.float()
        covered.add(f"{name}.weight")
        u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        r = min(rank, sv.numel())
        root = sv[:r].sqrt()
        b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
        b[:, :r] = u[:, :r] * root
        a[:r] = root[:, None] * vh[:r]
        layers[f"{name}.lora_A.weight"] = a.to(dtype).contiguous()
        layers[f"{name}.lora_B.weight"] = b.to(dtype).contiguous()
        kept += float(delta.double().square().sum())
        err += float((delta.double() - b @ a).square().sum())
    if not layers:
        raise ConfigError(f"--format lora: no linear layer of the model matches lora.target_modules {targets}")
    for key, w in teacher.state_dict().items():
        if key not in covered and key in student and w.is_floating_point():
            other += float((student[key].double() - w.double()).square().sum())
    _save_lora(cfg, out, layers, rank=rank, alpha=rank)
    total = kept + other
    return {"rank": rank, "modules": len(layers) // 2,
            "target_delta_relative_error": (err / kept) ** 0.5 if kept > 0 else 0.0,
            "untargeted_delta_fraction": (other / total) ** 0.5 if total > 0 else 0.0}


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _copy_components(src: Path, out: Path, *, link: bool, shift) -> None:
    """Everything of the teacher's pipeline directory except its transformer; the scheduler carries the shift."""
    if not (src / "model_index.json").is_file():
        raise ConfigError(f"--format pipeline: {str(src)!r} has no model_index.json (not a diffusers pipeline "
                          f"directory); use --format transformer")
    for item in src.iterdir():
        if item.name in ("transformer", META_NAME):
            continue
        dst = out / item.name
        if dst.exists() or dst.is_symlink():
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            else:
                dst.unlink()
        if link:
            dst.symlink_to(item.resolve(), target_is_directory=item.is_dir())
        elif item.is_dir():
            shutil.copytree(item, dst)
        else:
            shutil.copy2(item, dst)
    sched = out / "scheduler" / "scheduler_config.json"
    if sched.is_file() and shift.mu is None:
        conf = json.loads(sched.read_text())
        if conf.get("shift") != shift.value:
            if sched.is_symlink():  # never edit the teacher's own file through a link
                sched.parent.unlink() if sched.parent.is_symlink() else sched.unlink()
                shutil.copytree(src / "scheduler", out / "scheduler")
            conf["shift"] = shift.value
            sched.write_text(json.dumps(conf, indent=1))
