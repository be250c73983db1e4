"""Microbenchmark of the fused ops against the reference.

For each op, forward and (for the losses) forward+backward, providers: reference eager,
torch.compile(reference), triton (CUDA only), cpp (CPU, when the extension is built).
Reports the median time, the achieved bandwidth on the op's *minimal bytes* (each input read
once, each output written once; seeded noise is generated, not read) in GB/s and as a
fraction of the device's measured copy bandwidth, the speed-up over eager reference, and
the peak extra memory (CUDA: allocator peak above the inputs; not measurable on CPU).

    .venv/bin/python benchmarks/bench_ops.py --device cpu            # batch 4, 16x64x64, fp32
    .venv/bin/python benchmarks/bench_ops.py --device cuda           # SD3/LongCat, Flux, video; bf16
    .venv/bin/python benchmarks/bench_ops.py --device cuda --quick   # fewer repetitions, SD3 shape only

Timings on a shared machine are noisy: the median of many repetitions is reported, and a
result is only comparable to one taken on the same device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cdm_kernels as ck  # noqa: E402
from cdm_kernels import reference as ref  # noqa: E402

SHAPES = {
    "cpu": [("cpu 4x16x64x64", (4, 16, 64, 64), torch.float32)],
    "cuda": [
        ("SD3/LongCat 1024px", (16, 16, 128, 128), torch.bfloat16),
        ("Flux 1024px", (8, 16, 128, 128), torch.bfloat16),
        ("video 16x21x60x104", (1, 16, 21, 60, 104), torch.bfloat16),
    ],
    # --large: >= 256 MiB per input (issue 25: every fused op at >= 85% of the copy bandwidth there): 720p,
    # 81 frames (21 latent frames of 90x160), batch 16, fp32 = 296 MiB per tensor.
    "cuda-large": [("video 720p B16 (296 MiB)", (16, 16, 21, 90, 160), torch.float32)],
}

# name -> (inputs read, outputs written, differentiable input count, builder)
#   builder(t, s, st) -> (callable(fns) running the op once, needs_backward)


def _cases(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(5)]
    b = shape[0]
    s = (torch.rand(b, generator=g) * 0.9 + 0.05).to(device)
    st = (torch.rand(b, generator=g) * 0.9 + 0.05).to(device)
    student = t[0].clone().requires_grad_(True)
    pred = t[1].clone().requires_grad_(True)
    return [
        # (label, reads, writes, fn(impl) -> output or loss, backward?)
        ("euler_extrapolate", 2, 1, lambda f: f["euler_extrapolate"](t[0], t[1], s, st), False),
        ("euler_step", 2, 2, lambda f: f["euler_step"](t[0], t[1], s, st), False),
        ("renoise (seeded)", 1, 1, lambda f: f["renoise"](t[0], st, seed=1), False),
        ("predict_x0_renoise (seeded)", 2, 2, lambda f: f["predict_x0_renoise"](t[0], t[1], s, st, seed=1), False),
        ("dm_loss fwd", 5, 0, lambda f: f["dm_loss"](t[0], t[1], t[2], t[3], t[4], s, st), False),
        ("dm_loss fwd+bwd", 5, 1, lambda f: f["dm_loss"](student, t[1], t[2], t[3], t[4], s, st), True),
        ("cfg_loss fwd+bwd", 5, 1,
         lambda f: f["cfg_loss"](student, t[1], t[2], t[3], t[4], s, st, guidance_scale=7.0), True),
        ("flow_matching_loss fwd (seeded)", 2, 0, lambda f: f["flow_matching_loss"](t[1], t[2], seed=3), False),
        ("flow_matching_loss fwd+bwd (seeded)", 2, 1, lambda f: f["flow_matching_loss"](pred, t[2], seed=3), True),
    ], (student, pred)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    if device == "cuda":
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, reps, nbytes):
    """GB/s of dst.copy_(src) for one tensor of `nbytes` (the size of one benchmark input: same cache level)."""
    src = torch.randn(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    sec = _time(lambda: dst.copy_(src), device, reps, 3)
    return 2 * src.numel() * src.element_size() / sec / 1e9


def _providers(device):
    ref_fns = {name: getattr(ref, name) for name in ("euler_extrapolate", "euler_step", "renoise",
                                                      "predict_x0_renoise", "dm_loss", "cfg_loss",
                                                      "flow_matching_loss")}
    providers = {"reference": ref_fns}
    import cdm_kernels.ops as ops

    # The fused kernels before torch.compile(reference): inductor's compile time can eat a time-boxed run.
    if device == "cuda" and ops.TRITON:
        providers["triton"] = ops.TRITON
    if device == "cpu" and ops.CPP:
        providers["cpp"] = ops.CPP
    providers["compile(reference)"] = {name: torch.compile(fn, dynamic=False) for name, fn in ref_fns.items()}
    return providers


def _dump(path: str, records: list) -> None:
    if path:
        import json

        Path(path).write_text(json.dumps(records, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (and on CUDA only the SD3 shape)")
    parser.add_argument("--ops", default="", help="comma-separated substrings of op labels to run (default all)")
    parser.add_argument("--markdown", default="", help="also append the table to this file")
    parser.add_argument("--providers", default="",
                        help="comma-separated subset of: reference, compile(reference), triton, cpp (default all)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default="", help="also write one record per figure to this JSON file")
    parser.add_argument("--shape", default="", help="run only the shapes whose label contains this text")
    parser.add_argument("--large", action="store_true", help="CUDA: the >= 256 MiB video shape instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device")
    reps, warmup = (10, 2) if args.quick else (50, 5)
    table = "cuda-large" if args.large and device == "cuda" else device
    shapes = SHAPES[table][:1] if args.quick else SHAPES[table]
    if args.shape:
        shapes = [sh for sh in SHAPES[table] if args.shape in sh[0]]
    records = []
    ck.set_backend("reference")  # the providers are called directly; nothing goes through auto
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"device: {name}; torch {torch.__version__}; median of {reps} runs; copy bandwidth measured per "
             "shape on one input-sized tensor", "",
             "| shape | op | provider | median ms | GB/s (minimal bytes) | % of copy BW | speed-up vs eager | "
             "peak extra MiB | launches |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    hbm_bw = None
    if device == "cuda":
        # The per-shape copy below moves one input (8 MiB at SD3 batch 16 in bf16): L2-sized on an H100/H200
        # (50 MB), as are the ops' working sets. A 1 GiB copy gives the HBM ceiling as well; both are reported.
        hbm_bw = copy_bandwidth(device, reps, 1 << 30)
        row = f"| (1 GiB) | copy (dst.copy_(src)), HBM ceiling | torch | | {hbm_bw:.1f} | | | |"
        lines.append(row)
        print(row, flush=True)
        records.append({"figure": "copy_bandwidth", "shape": "1 GiB", "gbps": hbm_bw, "device": name})
    providers = _providers(device)
    if args.providers:
        keep = {p.strip() for p in args.providers.split(",")} | {"reference"}  # the speed-up baseline
        providers = {k: v for k, v in providers.items() if k in keep}
    wanted = [w.strip() for w in args.ops.split(",") if w.strip()]
    for shape_label, shape, dtype in shapes:
        cases, leaves = _cases(shape, dtype, device)
        elem = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for size in shape:
            numel *= size
        copy_bw = copy_bandwidth(device, reps, numel * elem)
        row = f"| {shape_label} | copy (dst.copy_(src), one input) | torch | | {copy_bw:.1f} | 100% | | |"
        lines.append(row)
        print(row, flush=True)
        records.append({"figure": "copy_bandwidth", "shape": shape_label, "gbps": copy_bw, "device": name})
        if device == "cuda":  # launch geometry of the loss reductions (cdm_kernels/ops/utils.py)
            from cdm_kernels.ops.utils import reduce_programs, sm_count

            sms = sm_count(torch.device("cuda"))
            programs = reduce_programs(shape[0], numel // shape[0], sms)
            row = (f"| {shape_label} | reduction launch geometry | triton | {programs} programs on {sms} SMs = "
                   f"{programs / sms:.1f} per SM | | | | |")
            lines.append(row)
            print(row, flush=True)
            records.append({"figure": "reduction_programs_per_sm", "shape": shape_label, "programs": programs,
                            "sms": sms, "per_sm": programs / sms})
        for label, reads, writes, run, backward in cases:
            if wanted and not any(w in label for w in wanted):
                continue
            minimal_bytes = (reads + writes) * numel * elem
            eager_sec = None
            seconds: dict[str, float] = {}
            for pname, fns in providers.items():
                def once(run=run, fns=fns, backward=backward, leaves=leaves):
                    out = run(fns)
                    if backward:
                        out.backward()
                        for leaf in leaves:
                            leaf.grad = None
                    return out

                try:
                    once()  # compile / warm up outside the timing and the memory measurement
                    launches = ""
                    if pname == "triton":  # kernel launches of one call (cdm_kernels.ops.utils.record_launches)
                        from cdm_kernels.ops.utils import record_launches

                        with record_launches() as log:
                            once()
                        launches = len(log)
                    extra = "n/a"
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        once()
                        torch.cuda.synchronize()
                        extra = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"
                    sec = _time(once, device, reps, warmup)
                except Exception as exc:  # a provider that cannot run this op is reported, not fatal
                    row = f"| {shape_label} | {label} | {pname} | failed: {type(exc).__name__}: {exc} | | | | |"
                    lines.append(row)
                    print(row, flush=True)
                    records.append({"figure": "op_time", "shape": shape_label, "op": label, "provider": pname,
                                    "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                if pname == "reference":
                    eager_sec = sec
                seconds[pname] = sec
                gbps = minimal_bytes / sec / 1e9
                speedup = f"{eager_sec / sec:.2f}x" if eager_sec else ""
                row = (f"| {shape_label} {str(dtype).replace('torch.', '')} | {label} | {pname} | {sec * 1e3:.3f} | "
                       f"{gbps:.1f} | {100 * gbps / copy_bw:.0f}% | {speedup} | {extra} | {launches} |")
                lines.append(row)
                print(row, flush=True)
                records.append({"figure": "op_time", "shape": shape_label, "dtype": str(dtype), "op": label,
                                "provider": pname, "median_ms": sec * 1e3, "gbps": gbps,
                                "fraction_of_copy_bw": gbps / copy_bw,
                                "speedup_vs_eager": (eager_sec / sec) if eager_sec else None, "device": name,
                                "launches": launches if launches != "" else None,
                                "fraction_of_hbm_copy_bw": (gbps / hbm_bw) if hbm_bw else None})
                _dump(args.json, records)  # after every row: a run cut short by a timeout keeps what it measured
            compiled = seconds.get("compile(reference)")
            for pname, sec in seconds.items():
                if compiled and pname not in ("reference", "compile(reference)"):
                    row = (f"| {shape_label} | {label} | {pname} vs compile(reference) | | | | "
                           f"{compiled / sec:.2f}x vs compile | |")
                    lines.append(row)
                    print(row, flush=True)
                    records.append({"figure": "speedup_vs_compile", "shape": shape_label, "op": label,
                                    "provider": pname, "speedup": compiled / sec, "device": name})
            _dump(args.json, records)
    _dump(args.json, records)
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
