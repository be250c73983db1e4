"""One CDM training iteration (rollout + fake step + student step): reference mode vs fast mode.

Both modes run the same iterations (same seeds, hence the same schedules, indices and
noise); the reference mode has every acceleration off, the fast mode every one on.

    python benchmarks/bench_step.py --device cpu --preset tiny
    python benchmarks/bench_step.py --device cuda --preset sd3-medium-shape --resolution 1024 --batch 4 --layers 24

Prints a table, then as the last line a JSON object:
{"reference_ms", "fast_ms", "speedup", "nfe_reference", "nfe_fast", ...}.

Graphs / overlap / compile (docs/graphs.md, RESULTS_e2e.md):
    --all-switches   fast mode also turns on FP8 no-grad passes, CUDA graphs, two-stream overlap,
                     rollout graphs and (with --compile) regional compile of the student
    --compile        fast mode compiles the student's transformer blocks; compile time is reported
                     separately (the warm-up iterations), never mixed into the steady-state median
    --ablate A,B|all one extra mode per switch: fast mode with that one switch off (run one mode at a
                     time after the main pair, so peak memory stays that of one trainer)
Per phase (rollout / fake step / student step) times come from CUDA events (host timers on CPU);
GPU utilisation comes from cdm_train.monitor (nvidia-ml-py) and is blank without it.
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

import cdm_train.trainer as trainer_mod  # noqa: E402
from cdm_train.config import make_config, reference_mode  # noqa: E402
from cdm_train.graphs import graph_stats  # noqa: E402
from cdm_train.monitor import GpuMonitor  # noqa: E402
from cdm_train.trainer import Trainer  # noqa: E402

# Switches the fast mode turns on with --all-switches (besides the exact savings, on by default).
FAST_EXTRA = ["fp8_attention_teacher", "fp8_attention_fake", "fp8_attention_rollout", "fp8_linear_teacher",
              "cuda_graphs_teacher", "overlap_teacher_calls", "rollout_graphs"]
ABLATABLE = ["shared_student_forward", "early_exit_rollout", "batched_teacher_calls", "backend", *FAST_EXTRA,
             "compile_student"]


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
    if mode != "reference":
        extra = (FAST_EXTRA if args.all_switches else []) + (["compile_student"] if args.compile else [])
        overrides += [f"speed.{name}=true" for name in extra]
        overrides += [f"speed.rollout_graph_mode={args.rollout_graph_mode}"]
    cfg = make_config(args.preset, overrides=overrides)
    if mode == "reference":
        reference_mode(cfg)
    elif mode.startswith("fast-no-"):
        switch = mode[len("fast-no-"):]
        if switch == "backend":
            cfg.speed.backend = "reference"
        else:
            setattr(cfg.speed, switch, False)
    return Trainer(cfg)


class PhaseMarks:
    """Marks at the phase boundaries of Trainer.train_step: CUDA events (no sync) or host times.

    The trainer's module-level `rollout` and `student_losses` are wrapped (benchmark only), so
    rollout = [start, rollout returned], fake step = [rollout returned, student_losses called]
    (sigmas, fake loss, backward, AdamW, merge), student step = [student_losses called, end].
    """

    def __init__(self):
        self.marks: dict[str, object] = {}
        self.device = None
        self._orig = (trainer_mod.rollout, trainer_mod.student_losses)
        rollout_fn, student_fn = self._orig

        def rollout(*a, **k):
            out = rollout_fn(*a, **k)
            self.mark("rollout_end")
            return out

        def student_losses(*a, **k):
            self.mark("student_start")
            return student_fn(*a, **k)

        trainer_mod.rollout, trainer_mod.student_losses = rollout, student_losses

    def mark(self, name):
        if self.device is not None and self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def phases_ms(self) -> dict[str, float]:
        m = self.marks

        def span(a, b):
            if a not in m or b not in m:
                return 0.0
            if isinstance(m[a], float):
                return (m[b] - m[a]) * 1e3
            return m[a].elapsed_time(m[b])

        return {"rollout": span("start", "rollout_end"), "fake_step": span("rollout_end", "student_start"),
                "student_step": span("student_start", "end")}


PHASES = PhaseMarks()


def time_step(tr: Trainer, k: int, monitor: GpuMonitor | None = None) -> tuple[float, int, int, dict]:
    tr.step = k  # the same per-step randomness in both modes
    before = tr.counters["nfe_total"]
    _sync(tr.device)
    if monitor is not None:
        monitor.read()  # start this step's utilisation window
    PHASES.device, PHASES.marks = tr.device, {}
    t0 = time.perf_counter()
    PHASES.mark("start")
    stats = tr.train_step()
    PHASES.mark("end")
    _sync(tr.device)
    ms = (time.perf_counter() - t0) * 1e3
    extra = PHASES.phases_ms()
    if monitor is not None:
        extra.update(monitor.read())
    return ms, tr.counters["nfe_total"] - before, stats["nfe_rollout"], extra


def run(args) -> dict:
    """Both modes, interleaved iteration by iteration so that load drift hits both alike."""
    modes = (args.only,) if args.only else ("reference", "fast")
    out = _run_modes(args, modes)
    for switch in _ablations(args):  # one trainer at a time: its peak memory is its own
        out.update(_run_modes(args, (f"fast-no-{switch}",)))
    return out


def _ablations(args) -> list[str]:
    if not args.ablate:
        return []
    names = ABLATABLE if args.ablate == "all" else [a.strip() for a in args.ablate.split(",") if a.strip()]
    bad = [n for n in names if n not in ABLATABLE]
    if bad:
        raise SystemExit(f"--ablate: unknown switch(es) {bad}; choose from {ABLATABLE}")
    if args.ablate == "all":  # only the switches the fast mode has on
        on = set(ABLATABLE[:4]) | (set(FAST_EXTRA) if args.all_switches else set())
        on |= {"compile_student"} if args.compile else set()
        names = [n for n in names if n in on]
    return names


def _run_modes(args, modes) -> dict:
    trainers = {mode: build(mode, args) for mode in modes}
    rec = {mode: {"t": [], "nfe": [], "ro": [], "warm": [], "extra": []} for mode in trainers}
    monitor = None
    for tr in trainers.values():
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tr.device)
            monitor = monitor or GpuMonitor(tr.device)
    for k in range(args.warmup + args.iters):
        for mode, tr in trainers.items():
            ms, nfe, ro, extra = time_step(tr, k, monitor)
            if k >= args.warmup:
                rec[mode]["t"].append(ms)
                rec[mode]["nfe"].append(nfe)
                rec[mode]["ro"].append(ro)
                rec[mode]["extra"].append(extra)
            else:  # compile, graph capture, autotuning and lazy init land here
                rec[mode]["warm"].append(ms)
    out = {}
    for mode, r in rec.items():
        # With both modes on one GPU the peak is the pair's; use --only MODE for one mode's peak memory.
        tr = trainers[mode]
        peak = torch.cuda.max_memory_allocated(tr.device) / 2**30 if tr.device.type == "cuda" else None
        median = statistics.median(r["t"])
        keys = sorted({k for e in r["extra"] for k in e})
        extra = {k: statistics.median([e[k] for e in r["extra"] if k in e]) for k in keys}
        out[mode] = {"median_ms": median, "mean_ms": statistics.fmean(r["t"]),
                     "total_ms": sum(r["t"]), "nfe": statistics.fmean(r["nfe"]),
                     "nfe_rollout": statistics.fmean(r["ro"]), "peak_gib": peak, "backend": tr.cfg.speed.backend,
                     "warmup_ms": r["warm"],
                     # first-iterations cost beyond steady state: compile + capture + autotune (+ lazy init)
                     "compile_capture_ms": sum(r["warm"]) - median * len(r["warm"]),
                     "phases_ms": {k: extra[k] for k in ("rollout", "fake_step", "student_step")},
                     "gpu": {k: v for k, v in extra.items() if k.startswith(("gpu_", "torch_"))},
                     "graphs": graph_stats(tr.models)}
    del trainers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
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
    p.add_argument("--all-switches", action="store_true",
                   help="fast mode: also FP8 no-grad passes, CUDA graphs, overlap, rollout graphs")
    p.add_argument("--compile", action="store_true",
                   help="fast mode: regional torch.compile of the student (compile time reported separately)")
    p.add_argument("--rollout-graph-mode", choices=["capture", "compile"], default="capture")
    p.add_argument("--ablate", default=None, help="comma-separated switches, or 'all': fast mode with each one off")
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
    print(f"\n{'mode':<34} {'rollout ms':>10} {'fake ms':>9} {'student ms':>10} {'warm-up ms':>11} "
          f"{'GPU util %':>10} {'util min %':>10} {'power W':>8}")
    for mode, r in results.items():
        ph, g = r["phases_ms"], r["gpu"]
        cells = [f"{g[k]:.0f}" if k in g else "-" for k in ("gpu_util_pct", "gpu_util_min_pct", "gpu_power_w")]
        print(f"{mode:<34} {ph['rollout']:>10.2f} {ph['fake_step']:>9.2f} {ph['student_step']:>10.2f} "
              f"{sum(r['warmup_ms']):>11.1f} {cells[0]:>10} {cells[1]:>10} {cells[2]:>8}")
    if len(results) > 2 or args.only is None:
        base = results.get("fast")
        for mode, r in results.items():
            if mode.startswith("fast-no-") and base is not None:
                print(f"ablation {mode}: {r['median_ms']:.2f} ms ({r['median_ms'] / base['median_ms']:.3f}x fast)")
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
               "peak_gib_fast": fast["peak_gib"],
               "phases_ms": {mode: r["phases_ms"] for mode, r in results.items()},
               "compile_capture_ms": {mode: r["compile_capture_ms"] for mode, r in results.items()},
               "gpu": {mode: r["gpu"] for mode, r in results.items()},
               "ablation_ms": {mode: r["median_ms"] for mode, r in results.items() if mode.startswith("fast-no-")}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
