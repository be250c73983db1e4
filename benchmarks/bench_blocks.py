"""One transformer block per model family at 1024 px: eager vs compiled vs compiled + FP8 linears (GPU).

What `speed.compile_blocks` and `speed.fp8_linear_teacher` buy per model evaluation, measured where they act:
one block of SD3-Medium, Flux-dev (double and single) and LongCat-Image (double and single), bf16, batch 4 (the
issue's shape), in the two passes training runs:

- no-grad forward (the real teacher, the fake teacher's scoring, the student's rollout);
- forward + backward with gradient (the student and fake-teacher steps), per checkpointing policy.

Variants: eager; compiled (inductor, the regional compile the trainer applies); compiled + FP8 linears (torchao
float8 row-wise on the planned layers, no-grad only: the teacher's setting; sm_89+ with torchao importable).
Each is timed with CUDA events (median of --iters after --warmup; compile time excluded and printed separately),
and its output is compared with eager's (max relative error; FP8 rows by SQNR).

    python benchmarks/bench_blocks.py --device cuda --json gpu_out/bench_blocks.json
    python benchmarks/bench_blocks.py --device cpu --quick        # the same code path on tiny shapes (CI dry run)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = {"sd3": ("sd3-medium-shape", 2), "flux": ("flux-shape", 1), "longcat": ("longcat-shape", 1)}
TINY = {"sd3": "tiny", "flux": "flux-tiny", "longcat": "longcat-tiny"}


def capture_blocks(family: str, device: torch.device, batch: int, resolution: int, quick: bool,
                   dtype: torch.dtype | None = None):
    """{kind: (block, args, kwargs)}: one block of each kind with the inputs the model gives it (dtype: default bf16
    on CUDA, fp32 on the CPU). SD3's last block (context_pre_only, one per model) is left out."""
    from cdm_kernels.graphs import find_blocks
    from cdm_train.config import make_config
    from cdm_train.models.build import build_teacher

    preset, layers = FAMILIES[family]
    over = ["train.device=" + device.type]
    if quick:
        preset = TINY[family]
    else:
        over += [f"model.layers={layers}", f"model.resolution={resolution}"]
    cfg = make_config(preset, overrides=over)
    model, adapter, sample_cond, latent = build_teacher(cfg, device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model.to(dtype).eval()
    kinds = {}
    for b in find_blocks(model):
        if not getattr(b, "context_pre_only", False):
            kinds.setdefault(type(b).__name__, b)
    captured = {}
    handles = [b.register_forward_pre_hook(lambda m, a, k, _n=n: captured.setdefault(_n, (a, k)), with_kwargs=True)
               for n, b in kinds.items()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *latent, generator=g).to(device, dtype)
    cond = torch.utils._pytree.tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        sample_cond(batch, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        adapter(model, x, torch.full((batch,), 0.5, device=device), cond)
    for h in handles:
        h.remove()

    def clone(t):
        return t.detach().clone() if isinstance(t, torch.Tensor) else t

    return {f"{family}:{n}": (kinds[n], tuple(clone(a) for a in captured[n][0]),
                              {k: clone(v) for k, v in captured[n][1].items()}) for n in kinds}


def _inputs(args, kwargs, grad: bool):
    def prep(t, name=None):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().clone().requires_grad_(grad and t.is_floating_point() and name != "temb")
    return tuple(prep(a) for a in args), {k: prep(v, k) for k, v in kwargs.items()}


def _outputs(out):
    return [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def timed(fn, device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_variant(block, args, kwargs, pass_: str, policy: str, compiled: bool, device, iters, warmup,
                backend: str = "inductor"):
    from cdm_kernels.graphs import checkpoint_blocks

    grad = pass_ == "grad"
    block.requires_grad_(grad)
    checkpoint_blocks([block], policy if grad else "none")
    fn = torch.compile(block, backend=backend) if compiled else block
    a, k = _inputs(args, kwargs, grad)
    grads_out = None

    def step():
        nonlocal grads_out
        with contextlib.nullcontext() if grad else torch.no_grad():
            outs = _outputs(fn(*a, **k))
        if grad:
            if grads_out is None:
                g = torch.Generator(device=device).manual_seed(1)
                grads_out = [torch.randn(o.shape, generator=g, device=device, dtype=o.dtype) for o in outs]
            torch.autograd.backward(outs, grads_out)
            block.zero_grad(set_to_none=True)
        return outs

    t0 = time.perf_counter()
    first = [o.detach().float() for o in step()]  # the compile happens here
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - t0
    ms = timed(step, device, iters, warmup)
    checkpoint_blocks([block], "none")
    return ms, compile_s, first


def _compare(ref, out):
    err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(out, ref))
    num = sum(float(b.double().square().sum()) for b in ref)
    den = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(out, ref))
    sqnr = float("inf") if den == 0 else 10 * torch.log10(torch.tensor(num / den)).item()
    return err, sqnr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--families", default="sd3,flux,longcat")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--policies", default="none,selective,full", help="checkpointing policies of the grad pass")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny presets, few iterations (CPU dry run)")
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: the CPU dry run's "
                   "code path without inductor's compile time)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_blocks: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    iters, warmup = (2, 1) if args.quick else (args.iters, args.warmup)
    torch._dynamo.config.recompile_limit = 64
    rows = []
    print(f"{'block':40s} {'pass':7s} {'ckpt':9s} {'variant':22s} {'ms':>9s} {'x eager':>8s} {'compile s':>9s} "
          f"{'rel err':>8s} {'SQNR dB':>8s}")
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        for key, (block, a, k) in capture_blocks(family, device, args.batch, args.resolution, args.quick).items():
            for pass_ in ("no_grad", "grad"):
                policies = [x.strip() for x in args.policies.split(",")] if pass_ == "grad" else ["none"]
                for policy in policies:
                    torch._dynamo.reset()
                    eager_ms, _, ref = run_variant(block, a, k, pass_, policy, False, device, iters, warmup)
                    variants = [("eager", block, False), ("compiled", block, True)]
                    if pass_ == "no_grad" and not args.no_fp8:
                        variants.append(("compiled + fp8 linears", None, True))
                    for name, blk, compiled in variants:
                        if name == "eager":
                            ms, comp_s, out = eager_ms, 0.0, ref
                        else:
                            if blk is None:
                                from cdm_kernels.fp8 import quantize_frozen

                                blk = copy.deepcopy(block).requires_grad_(False)
                                report = quantize_frozen(blk)
                                if not report.applied:
                                    print(f"{key:40s} {pass_:7s} {policy:9s} {name:22s} skipped: {report.reason}")
                                    continue
                            torch._dynamo.reset()
                            ms, comp_s, out = run_variant(blk, a, k, pass_, policy, compiled, device, iters, warmup,
                                                          args.backend)
                        err, sqnr = _compare(ref, out)
                        row = {"block": key, "pass": pass_, "checkpointing": policy, "variant": name, "ms": ms,
                               "speedup_vs_eager": eager_ms / ms, "compile_s": comp_s, "rel_err": err, "sqnr_db": sqnr,
                               "batch": args.batch, "resolution": args.resolution, "device": str(device)}
                        rows.append(row)
                        print(f"{key:40s} {pass_:7s} {policy:9s} {name:22s} {ms:9.3f} {eager_ms / ms:8.2f} "
                              f"{comp_s:9.1f} {err:8.1e} {sqnr:8.1f}", flush=True)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"meta": meta, "block": rows}, indent=1))  # summary figure "block"
    return 0


if __name__ == "__main__":
    sys.exit(main())
