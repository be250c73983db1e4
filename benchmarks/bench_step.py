"""One CDM training iteration (rollout + fake step + student step): reference mode vs fast mode.

Both modes run the same iterations (same seeds, hence the same schedules, indices and
noise); the reference mode has every acceleration off, the fast mode every one on.

    python benchmarks/bench_step.py --device cpu --preset tiny
    python benchmarks/bench_step.py --device cuda --preset sd3-medium-shape --resolution 1024 --batch 4 --layers 24

Prints a table, then as the last line a JSON object:
{"reference_ms", "fast_ms", "speedup", "nfe_reference", "nfe_fast", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdm_train.config import make_config, reference_mode  # noqa: E402
from cdm_train.trainer import Trainer  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(mode: str, args) -> Trainer:
    overrides = [f"train.device={args.device}", f"train.batch_size={args.batch}", "train.progress=false",
                 "train.tensorboard=false", "optim.update_ratio=1", f"train.out_dir={args.out_dir}/{mode}"]
    if args.preset == "sd3-medium-shape":
        overrides += [f"model.resolution={args.resolution}"]
        if args.layers is not None:
            overrides += [f"model.layers={args.layers}"]
    cfg = make_config(args.preset, overrides=overrides)
    if mode == "reference":
        reference_mode(cfg)
    return Trainer(cfg)


def time_step(tr: Trainer, k: int) -> tuple[float, int, int]:
    tr.step = k  # the same per-step randomness in both modes
    before = tr.counters["nfe_total"]
    _sync(tr.device)
    t0 = time.perf_counter()
    stats = tr.train_step()
    _sync(tr.device)
    return (time.perf_counter() - t0) * 1e3, tr.counters["nfe_total"] - before, stats["nfe_rollout"]


def run(args) -> dict:
    """Both modes, interleaved iteration by iteration so that load drift hits both alike."""
    modes = (args.only,) if args.only else ("reference", "fast")
    trainers = {mode: build(mode, args) for mode in modes}
    rec = {mode: {"t": [], "nfe": [], "ro": []} for mode in trainers}
    for tr in trainers.values():
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tr.device)
    for k in range(args.warmup + args.iters):
        for mode, tr in trainers.items():
            ms, nfe, ro = time_step(tr, k)
            if k >= args.warmup:
                rec[mode]["t"].append(ms)
                rec[mode]["nfe"].append(nfe)
                rec[mode]["ro"].append(ro)
    out = {}
    for mode, r in rec.items():
        # With both modes on one GPU the peak is the pair's; use --only MODE for one mode's peak memory.
        tr = trainers[mode]
        peak = torch.cuda.max_memory_allocated(tr.device) / 2**30 if tr.device.type == "cuda" else None
        out[mode] = {"median_ms": statistics.median(r["t"]), "mean_ms": statistics.fmean(r["t"]),
                     "total_ms": sum(r["t"]), "nfe": statistics.fmean(r["nfe"]),
                     "nfe_rollout": statistics.fmean(r["ro"]), "peak_gib": peak, "backend": tr.cfg.speed.backend}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "sd3-medium-shape"])
    p.add_argument("--layers", type=int, default=None, help="sd3-medium-shape depth (default 24)")
    p.add_argument("--resolution", type=int, default=1024, help="sd3-medium-shape image side in pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=30, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", default="/tmp/cdm-bench-step")
    p.add_argument("--only", choices=["reference", "fast"], default=None,
                   help="run one mode only (its peak GPU memory is then its own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(f"preset={args.preset} device={args.device} batch={args.batch} iters={args.iters} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'mode':<10} {'median ms':>10} {'mean ms':>10} {'NFE/it':>8} {'rollout NFE':>12} {'peak GiB':>9} backend")
    for mode, r in results.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{mode:<10} {r['median_ms']:>10.2f} {r['mean_ms']:>10.2f} {r['nfe']:>8.1f} {r['nfe_rollout']:>12.1f} "
              f"{peak:>9} {r['backend']}")
    if args.only:
        r = results[args.only]
        print(json.dumps({f"{args.only}_ms": r["median_ms"], f"nfe_{args.only}": r["nfe"],
                          f"peak_gib_{args.only}": r["peak_gib"]}))
        return 0
    ref, fast = results["reference"], results["fast"]
    summary = {"reference_ms": ref["median_ms"], "fast_ms": fast["median_ms"],
               "speedup": ref["median_ms"] / fast["median_ms"],
               "speedup_total_time": ref["total_ms"] / fast["total_ms"],
               "nfe_reference": ref["nfe"], "nfe_fast": fast["nfe"], "peak_gib_reference": ref["peak_gib"],
               "peak_gib_fast": fast["peak_gib"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
