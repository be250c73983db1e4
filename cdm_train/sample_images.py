"""`cdm-train sample` for diffusers runs (SD3 / Flux / LongCat checkpoints, exported pipelines): PNG images.

Conditioning: prompts (`--prompt`, `--prompts FILE`) encoded with the teacher's text encoders when the
model directory has them; otherwise rows of the run's precomputed embeddings (`model.prompt_embeds`).
Schedule: the sigmas the student was trained for (the official 4-step `[1, .75, .5, .25]`, or the run's
fixed schedule), shifted by the model's shift, exactly as the exported pipeline samples them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import config_from_dict
from .encode import encode_batch, load_text_pipeline
from .errors import ConfigError
from .models import family_of, family_of_pipeline
from .models.build import resolve_shift
from .runs import META_NAME, load_run, load_student, prompt_max_sequence_length, trained_sigmas


def _has_text_encoders(model_dir: Path) -> bool:
    return (model_dir / "text_encoder").is_dir() and (model_dir / "tokenizer").is_dir()


def conditioning(cfg, prompts: list[str] | None, num: int, generator: torch.Generator, device,
                 sample_cond) -> tuple[dict, list]:
    """(cond dict, labels): encoded prompts when given (needs text encoders), else precomputed rows."""
    if prompts:
        model_dir = Path(cfg.model.path or "")
        if not _has_text_encoders(model_dir):
            raise ConfigError(f"--prompt: {str(model_dir)!r} has no text encoders to encode prompts with; drop "
                              f"--prompt to sample from the run's precomputed embeddings (model.prompt_embeds)")
        pipe = load_text_pipeline(model_dir, device, torch.float32)
        with torch.no_grad():
            cond = {k: v.float() for k, v in encode_batch(pipe, prompts, device,
                                                              max_sequence_length=prompt_max_sequence_length(cfg)).items()}
        return cfg.family.sampling_cond(cfg, cond), list(prompts)
    return sample_cond(num, generator), [f"embedding row (draw {i})" for i in range(num)]


def decode(latents: torch.Tensor, model_dir: Path, cfg=None) -> torch.Tensor:
    """VAE decode of trainer-space latents to pixels in [-1, 1] (the family's rule: latents / scaling + shift)."""
    family = cfg.family if cfg is not None else family_of("sd3-medium")
    return family.decode(latents, model_dir)


def save_pngs(images: torch.Tensor, out: Path, labels: list[str]) -> list[Path]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        arr = ((img.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = out / f"{i:04d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    (out / "prompts.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    return paths


def sample_checkpoint(run: str | Path, out: str | Path, *, num: int, steps: int | None, seed: int, ema: bool,
                      prompts: list[str] | None, device: torch.device) -> list[Path]:
    from .sampling import sample_euler, uniform_sigmas

    state = load_run(run)
    cfg = config_from_dict(state["config"])
    if not cfg.model.path:
        raise ConfigError(f"--checkpoint: preset {cfg.model.preset!r} has no model directory with a VAE; "
                          f"this command decodes images for runs on a diffusers model (model.path)")
    model, adapter, sample_cond, latent = load_student(state, cfg, ema=ema, device=device)
    g = torch.Generator().manual_seed(seed)
    n = len(prompts) if prompts else num
    cond, labels = conditioning(cfg, prompts, n, g, device, sample_cond)
    noise = torch.randn((n, *latent), generator=g).to(device)
    sigmas = trained_sigmas(cfg) if steps is None or steps == len(trained_sigmas(cfg)) else uniform_sigmas(steps)[:-1]
    with torch.no_grad():
        latents = sample_euler(model, adapter, cond, noise, len(sigmas), sigmas=list(sigmas) + [0.0],
                               shift=resolve_shift(cfg))
    return save_pngs(decode(latents, Path(cfg.model.path), cfg), Path(out), labels)


def sample_pipeline(pipeline_dir: str | Path, out: str | Path, *, prompts: list[str], seed: int,
                    device: torch.device) -> list[Path]:
    """An exported pipeline (`cdm-train export`), sampled with the sigmas recorded in its cdm_export.json."""
    import json

    root = Path(pipeline_dir)
    meta_path = root / META_NAME
    if not meta_path.is_file():
        raise ConfigError(f"--pipeline: {str(root)!r} has no {META_NAME} (not written by `cdm-train export`)")
    if not prompts:
        raise ConfigError("--pipeline: give --prompt TEXT (repeatable) or --prompts FILE")
    if not _has_text_encoders(root):
        raise ConfigError(f"--pipeline: {str(root)!r} has no text encoders; sample the run's checkpoint instead "
                          f"(--checkpoint RUN uses its precomputed embeddings)")
    meta = json.loads(meta_path.read_text())
    family = family_of_pipeline(meta.get("pipeline", ""))
    if family is None:
        raise ConfigError(f"--pipeline: {META_NAME} names pipeline {meta.get('pipeline')!r}, not one cdm-train exports")
    pipe = family.load_pipeline(root, torch.float32).to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    extra = family.pipeline_call_kwargs(meta)
    images = pipe(prompt=prompts, sigmas=meta["sigmas"], num_inference_steps=len(meta["sigmas"]),
                  guidance_scale=meta.get("guidance_scale", 1.0), generator=g, output_type="pt", **extra).images
    return save_pngs(images * 2 - 1, Path(out), list(prompts))
