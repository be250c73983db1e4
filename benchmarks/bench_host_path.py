"""Host cost of the fused ops' Python path, launches stubbed out (issue 25, item 1): tracked without a GPU.

For every public op, the time per call from the public function to the (stubbed) kernel launch: argument
checks, backend resolution, the torch.library custom op and its autograd node, the launcher's sizes and
allocations. Forward for every op; forward + backward (``loss.backward()``) for the losses. Next to it, the
eager reference's own host cost: the same op written in plain PyTorch (``cdm_kernels.reference``) on the same
tiny CPU tensors, where the arithmetic is negligible and the time is PyTorch's per-op dispatch.

The triton backend runs with its GPU launch sizes (no interpreter: kernels are never run) on CPU tensors
standing in for CUDA tensors (`backend.accepting_any_device`); `record_launches(run=False)` replaces each
kernel by a stub that only counts its launches, so "launches" is what a GPU call would launch.

    .venv/bin/python benchmarks/bench_host_path.py                  # all ops, median of 31 runs
    .venv/bin/python benchmarks/bench_host_path.py --runs 9 --calls 100 --json out.json

Targets (issue 25): <= 25 us per forward call, <= 50 us per forward+backward, and below the eager
reference. Timings on a shared machine are noisy: the clock is this thread's CPU time (time.thread_time: time
spent descheduled while other processes run does not count), fused and eager runs alternate (both see the same
load), and each figure is the median of many runs; comparable only on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter changes the launch sizes (one block per sample); the GPU path is what is measured here.
    print("bench_host_path: unset TRITON_INTERPRET (kernels are stubbed, never run)", file=sys.stderr)
    raise SystemExit(2)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cdm_kernels as ck  # noqa: E402
from cdm_kernels import backend  # noqa: E402
from cdm_kernels import reference as ref  # noqa: E402

SHAPE = (2, 4, 8, 8)
TARGET_FWD_US = 25.0
TARGET_FWD_BWD_US = 50.0


def cases():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(SHAPE, generator=g) for _ in range(5)]
    b = SHAPE[0]
    s, st = torch.rand(b, generator=g) * 0.9 + 0.05, torch.rand(b, generator=g) * 0.9 + 0.05
    sv = t[0].clone().requires_grad_(True)
    pv = t[1].clone().requires_grad_(True)

    def fwd_bwd(loss_fn, leaf):
        def run(m):
            loss_fn(m).backward()
            leaf.grad = None

        return run

    dm = lambda m, v=None: m.dm_loss(v if v is not None else t[0], t[1], t[2], t[3], t[4], s, st)  # noqa: E731
    cfg = lambda m, v=None: m.cfg_loss(v if v is not None else t[0], t[1], t[2], t[3], t[4], s, st,  # noqa: E731
                                       guidance_scale=7.0)
    return [
        ("euler_extrapolate", "fwd", lambda m: m.euler_extrapolate(t[0], t[1], s, st)),
        ("euler_step", "fwd", lambda m: m.euler_step(t[0], t[1], s, st)),
        ("renoise (noise)", "fwd", lambda m: m.renoise(t[0], st, t[1])),
        ("renoise (seeded)", "fwd", lambda m: m.renoise(t[0], st, seed=1)),
        ("predict_x0_renoise (seeded)", "fwd", lambda m: m.predict_x0_renoise(t[0], t[1], s, st, seed=1)),
        ("dm_loss", "fwd", dm),
        ("cfg_loss", "fwd", cfg),
        ("flow_matching_loss (seeded)", "fwd", lambda m: m.flow_matching_loss(t[0], t[1], seed=1)),
        ("dm_loss", "fwd+bwd", fwd_bwd(lambda m: dm(m, sv), sv)),
        ("cfg_loss", "fwd+bwd", fwd_bwd(lambda m: cfg(m, sv), sv)),
        ("flow_matching_loss (seeded)", "fwd+bwd", fwd_bwd(lambda m: m.flow_matching_loss(pv, t[1], seed=1), pv)),
    ]


class _EmptyLoss(torch.autograd.Function):
    """A loss that computes nothing: saves its input, returns an empty scalar, an empty gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(ctx.saved_tensors[0])


def autograd_floor_us(runs: int, calls: int) -> float:
    """Host cost of `loss = Function.apply(leaf); loss.backward()` with empty forward and backward.

    Every fused loss pays it (the autograd node, the engine, the scalar's ones_like gradient, the leaf's
    gradient accumulation), whatever its kernels: the floor under the forward+backward rows.
    """
    leaf = torch.zeros(SHAPE, requires_grad=True)

    def run():
        _EmptyLoss.apply(leaf).backward()
        leaf.grad = None

    run()
    return statistics.median(one_run_us(run, calls) for _ in range(runs))


def one_run_us(fn, calls: int) -> float:
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) / calls * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=31, help="timed runs per case (the median is reported)")
    ap.add_argument("--calls", type=int, default=200, help="calls per run")
    ap.add_argument("--ops", default="", help="comma-separated op names to keep (default: all)")
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from cdm_kernels.ops.utils import record_launches

    rows = []
    keep = [o for o in args.ops.split(",") if o]
    for name, kind, fn in cases():
        if keep and not any(name.startswith(k) for k in keep):
            continue
        fused_runs, eager_runs = [], []
        with backend.accepting_any_device("triton"), ck.use_backend("triton"), record_launches(run=False) as log:
            fn(ck)
            launches = len(log)
            for i in range(args.runs + 2):  # alternating, the first pair is a warm-up
                f = one_run_us(lambda fn=fn: fn(ck), args.calls)
                e = one_run_us(lambda fn=fn: fn(ref), args.calls)
                if i >= 2:
                    fused_runs.append(f)
                    eager_runs.append(e)
        fused, eager = statistics.median(fused_runs), statistics.median(eager_runs)
        target = TARGET_FWD_US if kind == "fwd" else TARGET_FWD_BWD_US
        rows.append({"op": name, "pass": kind, "fused_us": round(fused, 2), "eager_reference_us": round(eager, 2),
                     "launches": launches, "target_us": target,
                     "meets_target": fused <= target and fused < eager})
    floor = autograd_floor_us(args.runs, args.calls)
    rows.append({"op": "autograd floor (empty Function)", "pass": "fwd+bwd", "fused_us": round(floor, 2),
                 "eager_reference_us": None, "launches": 0, "target_us": None, "meets_target": None})
    print(f"host path per call, launches stubbed (median of {args.runs} runs x {args.calls} calls; "
          f"torch {torch.__version__}, shape {SHAPE}, 1 thread)")
    print(f"{'op':30s} {'pass':8s} {'fused us':>9s} {'eager ref us':>13s} {'launches':>9s} {'target':>7s}  ok")
    for r in rows:
        if r["target_us"] is None:  # the floor row: no reference, no target
            print(f"{r['op']:30s} {r['pass']:8s} {r['fused_us']:9.1f} {'-':>13s} {r['launches']:9d} {'-':>7s}  -")
            continue
        print(f"{r['op']:30s} {r['pass']:8s} {r['fused_us']:9.1f} {r['eager_reference_us']:13.1f} "
              f"{r['launches']:9d} {r['target_us']:7.0f}  {'yes' if r['meets_target'] else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
