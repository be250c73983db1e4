"""What `cdm-train eval` samples: a run's student, an exported pipeline, a teacher baseline; and the seeds.

Seeds come from the prompt, as the official evaluation derives them (scripts/eval.py, cdm/pipeline/
inference.py): seed = MD5(prompt) mod 2^32 for a prompt's first use; when N exceeds the number of prompts
the list is cycled and the k-th repeat takes seed + 7919 k (the official diversity generators' offset).
One generator per sample (the official code seeds one per batch from the batch's joined prompts, so its
noise depends on the batch size; per sample it does not), on the CPU, drawing a (1, C, h, w) latent: the
noise diffusers' pipelines draw from a list of generators, so a run's student and its exported pipeline
see the same noise and any two evaluations of the same prompts are paired.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..models import PIPELINE_CLASSES, family_of_pipeline
from .errors import EvalInputError

REPEAT_SEED_STRIDE = 7919
SEED_RULE = "md5(prompt) mod 2^32, + 7919 k for the k-th repeat of a prompt"


def prompt_seed(prompt: str, repeat: int = 0) -> int:
    base = int(hashlib.md5(prompt.encode("utf-8")).hexdigest(), 16) % 2**32
    return (base + REPEAT_SEED_STRIDE * repeat) % 2**32


def assign_prompts(prompts: list[str], num: int) -> tuple[list[str], list[int]]:
    """The `num` (prompt, seed) pairs to sample: the prompt list cycled, seeds from the prompts."""
    if not prompts:
        raise EvalInputError("--prompts: no prompts")
    chosen = [prompts[i % len(prompts)] for i in range(num)]
    return chosen, [prompt_seed(p, i // len(prompts)) for i, p in enumerate(chosen)]


def seeded_noise(seeds: list[int], latent: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *latent), generator=torch.Generator().manual_seed(s)) for s in seeds])


def _has_text_encoders(root: Path) -> bool:
    return (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir()


class RunSampler:
    """A training run's student (EMA weights by default) on its trained few-step schedule, as `cdm-train sample`
    samples it: prompts encoded with the teacher's text encoders, Euler with the model's shift, VAE decode."""

    def __init__(self, run: str | Path, *, ema: bool, steps: int | None, device: torch.device):
        from ..config import config_from_dict
        from ..encode import load_text_pipeline
        from ..models.build import resolve_shift
        from ..runs import load_run, load_student, prompt_max_sequence_length, trained_sigmas
        from ..sampling import uniform_sigmas

        state = load_run(run)
        cfg = config_from_dict(state["config"])
        model_dir = Path(cfg.model.path or "")
        if not cfg.model.path or not _has_text_encoders(model_dir) or not (model_dir / "vae").is_dir():
            raise EvalInputError(f"--checkpoint: the run's model.path {str(cfg.model.path)!r} has no text encoders "
                                 "and VAE (a diffusers pipeline directory); eval encodes --prompts and decodes images")
        self.cfg, self.device = cfg, device
        self.model, self.adapter, _, self.latent = load_student(state, cfg, ema=ema, device=device)
        from ..accelerations import compile_for_sampling

        compile_for_sampling(cfg, self.model, device)  # the run's speed.compile_blocks, on CUDA
        self.text = load_text_pipeline(model_dir, device, torch.float32)
        self.max_sequence_length = prompt_max_sequence_length(cfg)
        trained = trained_sigmas(cfg)
        self.sigmas = trained if steps is None or steps == len(trained) else uniform_sigmas(steps)[:-1]
        self.shift = resolve_shift(cfg)
        self.vae = _load_vae(model_dir, device)
        self.info = {"source": "checkpoint", "path": str(Path(run).resolve()), "step": int(state.get("step", 0)),
                     "weights": "ema" if ema else "student", "steps": len(self.sigmas), "sigmas": list(self.sigmas),
                     "shift": self.shift.value if self.shift.mu is None else None,
                     "dynamic_shift_mu": self.shift.mu, "guidance_scale": None}

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """(B, 3, H, W) float images in [-1, 1] on the CPU."""
        from ..encode import encode_batch
        from ..sampling import sample_euler

        cond = {k: v.float() for k, v in encode_batch(self.text, prompts, self.device,
                                                       max_sequence_length=self.max_sequence_length).items()}
        cond = self.cfg.family.sampling_cond(self.cfg, cond)  # e.g. Flux's guidance embedding
        noise = seeded_noise(seeds, self.latent).to(self.device)
        latents = sample_euler(self.model, self.adapter, cond, noise, len(self.sigmas),
                               sigmas=list(self.sigmas) + [0.0], shift=self.shift)
        return _decode(self.vae, latents).cpu()


def _load_vae(model_dir: Path, device: torch.device):
    # sample_images.decode loads the VAE on every call; an evaluation decodes many batches, so it is loaded once.
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(model_dir), subfolder="vae").to(device).float().eval()


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Trainer-space latents -> pixels in [-1, 1], as sample_images.decode (latents / scaling + shift)."""
    shift = vae.config.shift_factor or 0.0
    return vae.decode(latents.float() / vae.config.scaling_factor + shift).sample.clamp(-1, 1)


class PipelineSampler:
    """A diffusers pipeline directory: an exported student (`cdm-train export`: its recorded sigmas, guidance and
    T5 length) or a teacher (its own scheduler at `steps` with CFG `guidance`)."""

    def __init__(self, root: str | Path, *, steps: int | None, guidance: float | None, device: torch.device,
                 role: str = "student"):
        from ..runs import META_NAME
        from ..sampling import uniform_sigmas

        self.root = Path(root)
        flag = "--pipeline" if role == "student" else "--teacher"
        if not (self.root / "model_index.json").is_file():
            raise EvalInputError(f"{flag}: {str(self.root)!r} is not a diffusers pipeline directory")
        if not _has_text_encoders(self.root):
            raise EvalInputError(f"{flag}: {str(self.root)!r} has no text encoders to encode --prompts with")
        meta_path = self.root / META_NAME
        self.kwargs: dict[str, Any] = {}
        if role == "student":
            if not meta_path.is_file():
                raise EvalInputError(f"--pipeline: {str(self.root)!r} has no {META_NAME} (not written by "
                                     f"`cdm-train export`); a teacher goes in --teacher")
            meta = json.loads(meta_path.read_text())
            sigmas = meta["sigmas"] if steps is None or steps == len(meta["sigmas"]) else uniform_sigmas(steps)[:-1]
            self.kwargs = {"sigmas": list(sigmas), "num_inference_steps": len(sigmas),
                           "guidance_scale": meta.get("guidance_scale", 1.0) if guidance is None else guidance}
        else:
            meta = {}
            self.kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
        name = json.loads((self.root / "model_index.json").read_text()).get("_class_name", "")
        family = family_of_pipeline(name)
        if family is None:
            raise EvalInputError(f"{flag}: pipeline {name!r} is not supported ({', '.join(PIPELINE_CLASSES)})")
        self.kwargs.update(family.pipeline_call_kwargs(meta))  # e.g. the T5 length the student's embeddings had
        self.pipe = family.load_pipeline(self.root, torch.float32).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.info = {"source": "pipeline" if role == "student" else "teacher", "path": str(self.root.resolve()),
                     "steps": self.kwargs["num_inference_steps"], "sigmas": self.kwargs.get("sigmas"),
                     "guidance_scale": self.kwargs["guidance_scale"]}

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        images = self.pipe(prompt=list(prompts), generator=gens, output_type="pt", **self.kwargs).images
        return (images.float() * 2 - 1).clamp(-1, 1).cpu()
