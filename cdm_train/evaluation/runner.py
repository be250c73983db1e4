"""`cdm-train eval`: sample N prompts with a student (and optionally the teacher), score FID and CLIP score.

Writes to --out: report.json (every metric, N, steps, sigmas, the seeds, the inputs), report.md (the same as
a table) and samples.png (a grid of the first student samples; teacher_samples.png for the baseline row).

Under torchrun (WORLD_SIZE > 1) each rank samples the indices i with i % world == rank, on cuda:LOCAL_RANK
(gloo on the CPU); features and CLIP cosines are gathered on rank 0, which scores and writes the report. The
seeds depend on the sample only, so any world size gives the same samples.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..jsonutil import dumps
from .errors import EvalInputError

log = logging.getLogger("cdm_train")
GRID_SAMPLES = 16


@dataclass
class EvalOptions:
    prompts: str
    out: str = "eval_out"
    checkpoint: str | None = None
    pipeline: str | None = None
    num: int = 1000
    steps: int | None = None
    weights: str = "ema"
    inception: str | None = None
    reference: str | None = None
    reference_stats: str | None = None
    max_reference: int | None = None
    stats_cache: str | None = None  # None: the default cache dir; "" : no cache
    clip: str | None = None
    teacher: str | None = None
    teacher_steps: int = 50
    teacher_guidance: float = 4.5
    batch_size: int = 8
    device: str = "auto"
    progress: bool = True


def _validate(o: EvalOptions) -> None:
    if (o.checkpoint is None) == (o.pipeline is None):
        raise EvalInputError("give exactly one of --checkpoint RUN and --pipeline DIR")
    if o.num < 2:
        raise EvalInputError("--num must be >= 2 (FID needs a covariance)")
    if o.steps is not None and o.steps < 1 or o.teacher_steps < 1 or o.batch_size < 1:
        raise EvalInputError("--steps, --teacher-steps and --batch-size must be >= 1")
    if o.max_reference is not None and o.max_reference < 2:
        raise EvalInputError("--max-reference must be >= 2")
    if o.inception is None and o.clip is None:
        raise EvalInputError("nothing to measure: give --inception FILE (FID) and/or --clip DIR (CLIP score)")
    if o.inception is not None and (o.reference is None) == (o.reference_stats is None):
        raise EvalInputError("FID needs exactly one of --reference DIR (your images) and --reference-stats FILE.npz")
    if o.inception is None and (o.reference or o.reference_stats):
        raise EvalInputError("--reference/--reference-stats need --inception FILE (the Inception weights)")
    if o.inception is not None and not Path(o.inception).is_file():
        raise EvalInputError(f"--inception: weights file {o.inception!r} does not exist")
    if o.clip is not None and not Path(o.clip).is_dir():
        raise EvalInputError(f"--clip: {o.clip!r} is not a directory")


class _Shard:
    """This process's share of the samples under torchrun (all of them in a single process)."""

    def __init__(self, device_name: str):
        from ..distributed import env_world_size
        from ..models.build import resolve_device

        self.world = env_world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.started = False
        if self.world > 1:
            import torch.distributed as dist

            use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
            self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if use_cuda else \
                torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
                self.started = True
        else:
            self.device = resolve_device(device_name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, num: int) -> list[int]:
        return list(range(self.rank, num, self.world))

    def gather(self, obj):
        """A list of every rank's `obj` on rank 0 (None elsewhere); [obj] in a single process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[-1, 1] (B, 3, H, W) -> (H, W, 3) uint8 arrays, rounded as the PNGs `cdm-train sample` writes."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return list(arr)


def _score_samples(sampler, indices: list[int], prompts: list[str], seeds: list[int], features, clip,
                   batch_size: int, desc: str, progress: bool) -> dict:
    """Sample `indices` in batches; keep features, CLIP cosines and the grid's first images, not the images."""
    from tqdm.auto import tqdm

    out = {"index": [], "features": [], "cosines": [], "grid": {}, "non_finite": 0}
    bar = tqdm(total=len(indices), desc=desc, disable=not progress, dynamic_ncols=True, unit="img")
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        images = sampler([prompts[i] for i in idx], [seeds[i] for i in idx])
        finite = torch.isfinite(images.flatten(1)).all(1)
        out["non_finite"] += int((~finite).sum())
        pix = _to_uint8(torch.nan_to_num(images))
        if features is not None:
            out["features"].append(features(pix))
        if clip is not None:
            out["cosines"].append(clip.cosines(pix, [prompts[i] for i in idx]))
        out["grid"].update({i: im for i, im in zip(idx, pix) if i < GRID_SAMPLES})
        out["index"] += idx
        bar.update(len(idx))
    bar.close()
    return out


def _merge(parts: list[dict]) -> dict:
    """Every rank's results in sample order."""
    index = np.array([i for p in parts for i in p["index"]])
    order = np.argsort(index, kind="stable")
    merged = {"index": index[order].tolist(), "non_finite": sum(p["non_finite"] for p in parts), "grid": {}}
    for key in ("features", "cosines"):
        chunks = [c for p in parts for c in p[key]]
        merged[key] = np.concatenate(chunks)[order] if chunks else None
    for p in parts:
        merged["grid"].update(p["grid"])
    return merged


def _row_metrics(name: str, info: dict, merged: dict, ref, seconds: float) -> dict:
    from .clip_score import clip_summary
    from .frechet import frechet_distance_from_stats, gaussian_stats

    row = {"name": name, **info, "num": len(merged["index"]), "non_finite_samples": merged["non_finite"],
           "seconds": round(seconds, 2)}
    bad = merged["non_finite"] > 0  # a diverged student scores inf / NaN (null in JSON), never a number
    if merged["features"] is not None:
        row["fid"] = math.inf if bad else frechet_distance_from_stats(*gaussian_stats(merged["features"]), *ref)
    if merged["cosines"] is not None:
        row.update({k: math.nan for k in ("clip_score", "clip_cosine")} if bad else clip_summary(merged["cosines"]))
    return row


def _save_grid(grid: dict, path: Path) -> str | None:
    from ..images import save_grid

    if not grid:
        return None
    images = torch.stack([torch.from_numpy(grid[i]).permute(2, 0, 1) for i in sorted(grid)]).float() / 127.5 - 1
    save_grid(images, path, nrow=min(len(grid), 8), tile=max(64, min(256, images.shape[-1])))
    return path.name


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else f"{value:.{digits}f}")
    return str(value)


def _markdown(report: dict) -> str:
    lines = [f"# Evaluation ({report['date']})", "",
             f"N = {report['num']} samples from `{report['prompts']['file']}` ({report['prompts']['count']} prompts; "
             f"seeds: {report['seed_rule']}); device {report['device']}.", ""]
    if report.get("fid"):
        ref = report["fid"]["reference"]
        src = f"`{ref['dir']}` ({ref['num_images']} images)" if ref.get("dir") else f"`{ref['stats']}`"
        lines += [f"FID: Inception `{report['fid']['inception']}` ({report['fid']['format']}), reference {src}"
                  + ("; statistics from the cache" if ref.get("cached") else "") + ".", ""]
    if report.get("clip"):
        lines += [f"CLIP: `{report['clip']['model']}`; clip_score = max(100 mean cos, 0) (torchmetrics' "
                  "CLIPScore), clip_cosine = mean cos.",
                  ""]
    lines += ["| row | steps | sigmas | guidance | FID | CLIP score | CLIP cosine | N | non-finite | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        sig = ", ".join(f"{s:g}" for s in r["sigmas"]) if r.get("sigmas") else "scheduler's"
        lines.append(f"| {r['name']} | {r['steps']} | {sig} | {_fmt(r.get('guidance_scale'), 2)} | "
                     f"{_fmt(r.get('fid'))} | {_fmt(r.get('clip_score'))} | {_fmt(r.get('clip_cosine'), 4)} | "
                     f"{r['num']} | {r['non_finite_samples']} | {r['seconds']} |")
    lines += ["", "Samples: " + ", ".join(f"`{g}`" for g in report["grids"].values()), ""]
    return "\n".join(lines)


def evaluate(o: EvalOptions) -> dict:
    """Run the evaluation; returns the report (also written to o.out on rank 0)."""
    from ..prompts import read_prompts
    from .samplers import SEED_RULE, assign_prompts

    _validate(o)
    prompt_list = read_prompts(o.prompts)
    prompts, seeds = assign_prompts(prompt_list, o.num)
    if o.reference is not None:  # fail on a bad folder before any model is loaded
        from .references import list_images

        found = len(list_images(o.reference, o.max_reference))
        if found < o.num:
            raise EvalInputError(f"--reference: {o.reference!r} has {found} images, fewer than --num {o.num}; add "
                                 f"images or lower --num")
    shard = _Shard(o.device)
    try:
        return _evaluate(o, shard, prompts, seeds, len(prompt_list), SEED_RULE)
    finally:
        shard.close()


def _evaluate(o: EvalOptions, shard: _Shard, prompts: list[str], seeds: list[int], num_prompts: int,
              seed_rule: str) -> dict:
    from .references import default_cache_dir, folder_stats, load_stats

    device, progress = shard.device, o.progress and shard.is_main
    features = ref = ref_info = clip = None
    if o.inception is not None:
        from .inception import InceptionFeatures

        features = InceptionFeatures(o.inception, device)
        if shard.is_main:
            if o.reference_stats is not None:
                mu, sigma, _ = load_stats(o.reference_stats)
                dim = features([np.zeros((8, 8, 3), np.uint8)]).shape[1]
                if mu.shape[0] != dim:  # caught before any sampling, not after
                    raise EvalInputError(f"--reference-stats: {mu.shape[0]}-d statistics, but the Inception network "
                                         f"gives {dim}-d features (statistics of another network?)")
                ref_info = {"stats": str(Path(o.reference_stats).resolve()), "cached": None}
            else:
                cache = None if o.stats_cache == "" else Path(o.stats_cache or default_cache_dir())
                mu, sigma, ref_info = folder_stats(o.reference, features, features.digest, min_images=o.num,
                                                   limit=o.max_reference, cache_dir=cache, batch_size=o.batch_size,
                                                   progress=progress)
            ref = (mu, sigma)
        shard.broadcast(None)  # the others wait while rank 0 reads the references
    if o.clip is not None:
        from .clip_score import ClipScorer

        clip = ClipScorer(o.clip, device)

    from .samplers import PipelineSampler, RunSampler

    makers = [("student", lambda: RunSampler(o.checkpoint, ema=o.weights == "ema", steps=o.steps, device=device)
               if o.checkpoint else PipelineSampler(o.pipeline, steps=o.steps, guidance=None, device=device))]
    if o.teacher is not None:
        makers.append(("teacher", lambda: PipelineSampler(o.teacher, steps=o.teacher_steps,
                                                          guidance=o.teacher_guidance, device=device, role="teacher")))
    rows, grids = [], {}
    mine = shard.indices(o.num)
    for name, make in makers:
        t0 = time.perf_counter()
        sampler = make()
        part = _score_samples(sampler, mine, prompts, seeds, features, clip, o.batch_size, name, progress)
        info = sampler.info
        del sampler
        if device.type == "cuda":
            torch.cuda.empty_cache()
        parts = shard.gather(part)
        if shard.is_main:
            merged = _merge(parts)
            rows.append(_row_metrics(name, info, merged, ref, time.perf_counter() - t0))
            grids[name] = _save_grid(merged["grid"], Path(o.out) / ("samples.png" if name == "student"
                                                                    else f"{name}_samples.png"))
    if not shard.is_main:
        return {}
    report = {"format": "cdm-eval/1", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "num": o.num, "prompts": {"file": str(Path(o.prompts).resolve()), "count": num_prompts},
              "seed_rule": seed_rule, "seeds": seeds, "batch_size": o.batch_size, "world_size": shard.world,
              "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "fid": None if features is None else {"inception": str(features.path.resolve()),
                                                    "format": features.format, "sha256": features.digest,
                                                    "reference": ref_info},
              "clip": None if clip is None else {"model": str(clip.path.resolve())},
              "rows": rows, "grids": grids}
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report
