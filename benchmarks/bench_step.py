"""One CDM training iteration (rollout + fake step + student step): reference mode vs fast mode.

Both modes run the same iterations (same seeds, hence the same schedules, indices and
noise); the reference mode has every acceleration off, the fast mode every one on.

    python benchmarks/bench_step.py --device cpu --preset tiny
    python benchmarks/bench_step.py --device cuda --preset sd3-medium-shape --resolution 1024 --batch 4 --layers 10 \
        --only reference

On one 80 GB GPU run one mode per process (--only) at a depth that fits: full depth (24 layers)
does not fit even one trainer at 1024 px; `memory_distributed.py --bench-step` sizes --layers
(RESULTS_e2e.md lists the commands).

Prints a table, then as the last line a JSON object:
{"reference_ms", "fast_ms", "speedup", "nfe_reference", "nfe_fast", ...}.

Graphs / overlap / compile (docs/graphs.md, RESULTS_e2e.md):
    --all-switches   fast mode also turns on FP8 no-grad passes, CUDA graphs, two-stream overlap,
                     rollout graphs and (with --compile) regional compile of the student
    --compile        fast mode compiles every network's transformer blocks (speed.compile_blocks); compile
                     time is reported separately (see "Capture / compile in timed iterations" below)
    --reference-checkpointing full|none
                     the reference mode's memory plan: full (default: the official launch, gradient
                     checkpointing of student and fake teacher) or none (the 2026-12-04 GPU run's baseline)
    --ablate A,B|all one extra mode per switch: fast mode with that one switch off (run one mode at a
                     time after the main pair, so peak memory stays that of one trainer)
Per phase (rollout / fake step / student step) times come from CUDA events (host timers on CPU);
GPU utilisation comes from cdm_train.monitor (nvidia-ml-py) and is blank without it.

Capture / compile in timed iterations: every iteration k draws its own schedule length and
trajectory indices, hence its own rollout batch sizes, so a timed iteration can meet a shape
the --warmup iterations did not (a new CUDA graph, a recompile, an inductor CUDA-graph
recording). Each timed iteration counts the events that happen inside it: GraphedForward
captures (graph_stats) and torch.compile events (dynamo's compile-start callbacks: new frames,
lazy backward compiles, CUDA-graph-tree recordings). An iteration with any event is run again
(the same step, after the loop; --retime-passes, default 2) and its clean time replaces the
first; one still not clean after that is left out of the median. The counts are in the table
("events" column) and the JSON ("timed_events"); the first-time cost of the re-timed
iterations is added to compile_capture_ms.
"""

from __future__ import annotations

import argparse
import gc
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
             "compile_blocks", "compile_loss_block"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(mode: str, args) -> Trainer:
    overrides = [f"train.device={args.device}", f"train.batch_size={args.batch}", "train.progress=false",
                 "train.tensorboard=false", "optim.update_ratio=1", f"train.out_dir={args.out_dir}/{mode}"]
    if args.preset in ("sd3-medium-shape", "flux-shape", "longcat-shape"):
        overrides += [f"model.resolution={args.resolution}"]
        if args.layers is not None:
            overrides += [f"model.layers={args.layers}"]
    if mode != "reference":
        extra = (FAST_EXTRA if args.all_switches else []) + (["compile_blocks"] if args.compile else [])
        overrides += [f"speed.{name}=true" for name in extra]
        overrides += [f"speed.rollout_graph_mode={args.rollout_graph_mode}"]
    overrides += list(args.set or [])
    cfg = make_config(args.preset, overrides=overrides)
    if mode == "reference":
        reference_mode(cfg, official_memory_plan=args.reference_checkpointing == "full")
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


class EventWatch:
    """Counts capture / compile events: GraphedForward captures of a trainer, torch.compile events globally.

    Compile events come from dynamo's compile-start callbacks (one per outermost event: a frame
    traced, a lazy backward compile, an inductor CUDA-graph-tree recording), by trigger name.
    """

    def __init__(self):
        self.compiles: dict[str, int] = {}
        self.available = False
        try:
            from torch._dynamo.callback import callback_handler

            callback_handler.register_start_callback(self._on_start)
            self._handler = callback_handler
            self.available = True
        except Exception:  # noqa: BLE001 - older/newer torch without the hook: captures are still counted
            self._handler = None

    def _on_start(self, args) -> None:
        name = getattr(getattr(args, "callback_trigger", None), "name", "compile").lower()
        self.compiles[name] = self.compiles.get(name, 0) + 1

    def close(self) -> None:
        if self._handler is not None:
            try:
                self._handler.remove_start_callback(self._on_start)
            except ValueError:
                pass
            self._handler = None

    def snapshot(self, tr: Trainer) -> tuple[int, dict[str, int]]:
        captures = sum(int(s.get("captures", 0)) for s in graph_stats(tr.models).values())
        return captures, dict(self.compiles)

    @staticmethod
    def delta(before: tuple[int, dict], after: tuple[int, dict]) -> dict[str, int]:
        out = {"captures": after[0] - before[0]}
        for name, n in after[1].items():
            if n - before[1].get(name, 0):
                out[f"compile_{name}"] = n - before[1].get(name, 0)
        return {k: v for k, v in out.items() if v}


WATCH = EventWatch()


def time_step(tr: Trainer, k: int, monitor: GpuMonitor | None = None) -> tuple[float, int, int, dict, dict]:
    tr.step = k  # the same per-step randomness in both modes
    before = tr.counters["nfe_total"]
    _sync(tr.device)
    if monitor is not None:
        monitor.read()  # start this step's utilisation window
    PHASES.device, PHASES.marks = tr.device, {}
    events_before = WATCH.snapshot(tr)
    t0 = time.perf_counter()
    PHASES.mark("start")
    stats = tr.train_step()
    PHASES.mark("end")
    _sync(tr.device)
    ms = (time.perf_counter() - t0) * 1e3
    events = EventWatch.delta(events_before, WATCH.snapshot(tr))
    extra = PHASES.phases_ms()
    if monitor is not None:
        extra.update(monitor.read())
    return ms, tr.counters["nfe_total"] - before, stats["nfe_rollout"], extra, events


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
        on |= {"compile_blocks"} if args.compile else set()
        names = [n for n in names if n in on]
    return names


def _run_modes(args, modes) -> dict:
    trainers = {mode: build(mode, args) for mode in modes}
    rec = {mode: {"t": [], "nfe": [], "ro": [], "warm": [], "extra": [], "steps": [], "events": []}
           for mode in trainers}
    monitor = None
    for tr in trainers.values():
        if tr.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(tr.device)
            monitor = monitor or GpuMonitor(tr.device)
    for k in range(args.warmup + args.iters):
        for mode, tr in trainers.items():
            ms, nfe, ro, extra, events = time_step(tr, k, monitor)
            if k >= args.warmup:
                r = rec[mode]
                r["t"].append(ms)
                r["nfe"].append(nfe)
                r["ro"].append(ro)
                r["extra"].append(extra)
                r["steps"].append(k)
                r["events"].append(events)
            else:  # compile, graph capture, autotuning and lazy init land here
                rec[mode]["warm"].append(ms)
    out = {}
    for mode, r in rec.items():
        tr = trainers[mode]
        timed_events = _retime(args, tr, r, monitor)
        clean = [i for i, e in enumerate(r["events"]) if not e]
        if not clean:  # every timed iteration had a capture / compile: report them all, flagged
            clean = list(range(len(r["t"])))
        times = [r["t"][i] for i in clean]
        # With both modes on one GPU the peak is the pair's; use --only MODE for one mode's peak memory.
        peak = torch.cuda.max_memory_allocated(tr.device) / 2**30 if tr.device.type == "cuda" else None
        median = statistics.median(times)
        extras = [r["extra"][i] for i in clean]
        keys = sorted({k for e in extras for k in e})
        extra = {k: statistics.median([e[k] for e in extras if k in e]) for k in keys}
        out[mode] = {"median_ms": median, "mean_ms": statistics.fmean(times),
                     "total_ms": sum(times), "nfe": statistics.fmean(r["nfe"]),
                     "nfe_rollout": statistics.fmean(r["ro"]), "peak_gib": peak, "backend": tr.cfg.speed.backend,
                     "warmup_ms": r["warm"],
                     # first-iterations cost beyond steady state: compile + capture + autotune (+ lazy init),
                     # in the warm-up and in timed iterations that met a new shape (their re-timed difference)
                     "compile_capture_ms": sum(r["warm"]) - median * len(r["warm"]) + timed_events["first_time_ms"],
                     "timed_events": timed_events,
                     "phases_ms": {k: extra.get(k, 0.0) for k in ("rollout", "fake_step", "student_step")},
                     "gpu": {k: v for k, v in extra.items() if k.startswith(("gpu_", "torch_"))},
                     "graphs": graph_stats(tr.models)}
    del tr, trainers
    gc.collect()  # trainers hold reference cycles (adapters, graphs): free them before the next mode is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _retime(args, tr: Trainer, r: dict, monitor) -> dict:
    """Re-run the timed iterations that had a capture / compile (same step) until clean; summarise.

    Replaces r's entries of an iteration that comes out clean; one that never does keeps its
    events and is left out of the median by the caller.
    """
    flagged = [i for i, e in enumerate(r["events"]) if e]
    totals: dict[str, int] = {}
    for i in flagged:
        for name, n in r["events"][i].items():
            totals[name] = totals.get(name, 0) + n
    first_time_ms = 0.0
    retimed = 0
    for _ in range(args.retime_passes):
        pending = [i for i in flagged if r["events"][i]]
        for i in pending:
            first = r["t"][i]
            ms, nfe, ro, extra, events = time_step(tr, r["steps"][i], monitor)
            if events:
                for name, n in events.items():
                    totals[name] = totals.get(name, 0) + n
                r["events"][i] = events
                continue
            first_time_ms += first - ms
            retimed += 1
            r["t"][i], r["nfe"][i], r["ro"][i], r["extra"][i], r["events"][i] = ms, nfe, ro, extra, {}
    excluded = sum(1 for e in r["events"] if e)
    return {"iterations": len(flagged), "events": totals, "retimed": retimed,
            "excluded": excluded if excluded < len(r["events"]) else 0,
            "all_flagged": excluded == len(r["events"]) and excluded > 0,
            "first_time_ms": first_time_ms, "compile_hook": WATCH.available}


def _events_cell(te: dict) -> str:
    if not te["iterations"]:
        return "0" if te["compile_hook"] else "0 (captures only)"
    what = ",".join(f"{k}={v}" for k, v in sorted(te["events"].items()))
    if te["all_flagged"]:
        return f"{te['iterations']} it ({what}) ALL FLAGGED, median includes them"
    return f"{te['iterations']} it ({what}) {te['retimed']} re-timed {te['excluded']} excluded"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "sd3-medium-shape", "flux-tiny", "flux-shape",
                                                             "longcat-tiny", "longcat-shape"])
    p.add_argument("--layers", type=int, default=None,
                   help="sd3-medium-shape depth (default 24); flux-shape: L double + 2L single blocks (default 19)")
    p.add_argument("--resolution", type=int, default=1024, help="sd3-medium-shape / flux-shape image side in pixels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the summary (reference vs fast) to this JSON file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra config override for both modes, e.g. schedule.max_steps=28 (the official Nmax)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--retime-passes", type=int, default=2,
                   help="re-runs of a timed iteration that had a graph capture / compile (0: just exclude it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out-dir", default="/tmp/cdm-bench-step")
    p.add_argument("--only", choices=["reference", "fast"], default=None,
                   help="run one mode only (its peak GPU memory is then its own)")
    p.add_argument("--all-switches", action="store_true",
                   help="fast mode: also FP8 no-grad passes, CUDA graphs, overlap, rollout graphs")
    p.add_argument("--reference-checkpointing", choices=["full", "none"], default="full",
                   help="the reference mode's memory plan (full: the official launch)")
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
          f"{'GPU util %':>10} {'util min %':>10} {'power W':>8}  capture/compile events in timed iterations")
    for mode, r in results.items():
        ph, g = r["phases_ms"], r["gpu"]
        cells = [f"{g[k]:.0f}" if k in g else "-" for k in ("gpu_util_pct", "gpu_util_min_pct", "gpu_power_w")]
        print(f"{mode:<34} {ph['rollout']:>10.2f} {ph['fake_step']:>9.2f} {ph['student_step']:>10.2f} "
              f"{sum(r['warmup_ms']):>11.1f} {cells[0]:>10} {cells[1]:>10} {cells[2]:>8}  "
              f"{_events_cell(r['timed_events'])}")
    if len(results) > 2 or args.only is None:
        base = results.get("fast")
        for mode, r in results.items():
            if mode.startswith("fast-no-") and base is not None:
                print(f"ablation {mode}: {r['median_ms']:.2f} ms ({r['median_ms'] / base['median_ms']:.3f}x fast)")
    if args.only:
        r = results[args.only]
        print(json.dumps({f"{args.only}_ms": r["median_ms"], f"nfe_{args.only}": r["nfe"],
                          f"peak_gib_{args.only}": r["peak_gib"], "layers": args.layers,
                          "phases_ms": {mode: x["phases_ms"] for mode, x in results.items()},
                          "compile_capture_ms": {mode: x["compile_capture_ms"] for mode, x in results.items()},
                          "timed_events": {mode: x["timed_events"] for mode, x in results.items()},
                          "ablation_ms": {mode: x["median_ms"] for mode, x in results.items()
                                          if mode.startswith("fast-no-")}}))
        return 0
    ref, fast = results["reference"], results["fast"]
    summary = {"reference_ms": ref["median_ms"], "fast_ms": fast["median_ms"],
               "speedup": ref["median_ms"] / fast["median_ms"],
               "speedup_total_time": ref["total_ms"] / fast["total_ms"],
               "nfe_reference": ref["nfe"], "nfe_fast": fast["nfe"], "peak_gib_reference": ref["peak_gib"],
               "peak_gib_fast": fast["peak_gib"],
               "phases_ms": {mode: r["phases_ms"] for mode, r in results.items()},
               "compile_capture_ms": {mode: r["compile_capture_ms"] for mode, r in results.items()},
               "timed_events": {mode: r["timed_events"] for mode, r in results.items()},
               "gpu": {mode: r["gpu"] for mode, r in results.items()},
               "ablation_ms": {mode: r["median_ms"] for mode, r in results.items() if mode.startswith("fast-no-")}}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"figure": "bench_step", "preset": args.preset, "device": args.device,
                                               "batch": args.batch, "layers": args.layers, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
