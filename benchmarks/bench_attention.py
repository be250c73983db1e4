"""Attention benchmark: TFLOP/s and accuracy of every exact (bf16) SDPA backend, forward and backward, and of
our 8-bit kernels (and FA3/TE where installed) at SD3-Medium / Flux / video shapes, against the device's
matmul ceilings measured in the same run, plus a whole-model check (teacher velocity with FP8 attention and FP8
linears vs bf16).

GPU (one command, prints markdown rows and writes JSON):
    python benchmarks/bench_attention.py --device cuda --out bench_attention.json
CPU smoke run through the Triton interpreter (tiny shapes; proves the script and measures accuracy):
    python benchmarks/bench_attention.py --device cpu --quick

FLOPs per forward: 4 * B * H * S^2 * D (two GEMMs); per backward 2.5x that (five GEMMs). Times include our
Q/K/V quantisation pre-pass. Providers, bf16 (forward, and backward as fwd+bwd minus fwd): sdpa-default (torch's
own order, what diffusers runs), sdpa-flash, sdpa-cudnn (cdm_kernels' "cudnn" choice: flash instead where the
loaded cuDNN has the S % 128 fault, so the run cannot crash; the "runs" column says what was chosen),
sdpa-efficient, ours-bf16-auto (cdm_kernels' per-device choice, speed.attention_backend=auto), fa3-bf16 / te-bf16
where installed. 8-bit, forward only: ours-fp8 (fp8_attention path="auto": the FP8 kernel on sm_89+, the INT8-QK
kernel on sm_80/86), ours-int8 (path="int8", sm_80+: half its FLOPs are int8 ops, so its TFLOP/s is
"TFLOP-equivalent"), fa3-fp8 / te-fp8 where installed. speedup_vs_best_bf16: the fastest bf16 forward of the
same shape in this run over this provider's forward (what cdm_kernels/attention/speed_table.py records).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# The interpreter must be chosen before triton decorates any kernel (i.e. before cdm_kernels imports).
if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cdm_kernels.attention import (  # noqa: E402
    _backends,  # noqa: E402
    attention_float,
    fp8_attention,
    native_int8_available,
    patch_attention,
    sdpa_backend,  # noqa: E402
    sqnr_db,
)
from cdm_kernels.attention.dispatch import cuda_auto_path  # noqa: E402

GPU_SHAPES = [  # (name, B, H, S, D)
    *[(f"SD3-M 1024px B={b}", b, 24, 4429, 64) for b in (2, 4, 8, 16)],
    ("Flux 1024px B=1", 1, 24, 4608, 128),
    ("Flux 1024px B=2", 2, 24, 4608, 128),
    ("video S=32760", 1, 24, 32760, 128),
]
CPU_SHAPES = [("tiny D=64", 1, 2, 130, 64), ("tiny D=128", 1, 2, 77, 128)]


def _time(fn, device: str, reps: int) -> float:
    """Median seconds per call."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def matmul_ceilings(device: str) -> dict[str, float]:
    """Measured dense GEMM TFLOP/s (8192^3): bf16 torch.matmul and fp8 torch._scaled_mm."""
    if device != "cuda":
        return {}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = {"bf16": 2 * n**3 / _time(lambda: a @ b, device, 0) / 1e12}
    if torch.cuda.get_device_capability() >= (8, 9):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major second operand
        one = torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        out["fp8"] = 2 * n**3 / _time(fn, device, 0) / 1e12
    return out


def providers(device: str) -> dict[str, tuple]:
    """name -> (function of q, k, v, kind "bf16" | "8bit", what runs)."""
    facts = sdpa_backend.device_facts(device)

    def exact(backend):
        def fn(q, k, v):
            return sdpa_backend.run_attention(q, k, v, backend=backend)

        return fn

    def label(backend, s=4096):
        return sdpa_backend.choose_backend(backend, facts, seq_len=s).label

    provs = {"sdpa-default": (F.scaled_dot_product_attention, "bf16", "torch's order"),
             "sdpa-flash": (exact("flash"), "bf16", label("flash")),
             "sdpa-cudnn": (exact("cudnn"), "bf16", label("cudnn")),
             "sdpa-efficient": (exact("efficient"), "bf16", label("efficient")),
             "ours-bf16-auto": (exact("auto"), "bf16", label("auto"))}
    for name in sorted(facts.optional):
        provs[f"{name}-bf16"] = (exact(name), "bf16", name)
    provs["ours-fp8"] = (lambda q, k, v: fp8_attention(q, k, v, path="auto"), "8bit", "auto")
    if device == "cpu" or native_int8_available(torch.device("cuda")):
        provs["ours-int8"] = (lambda q, k, v: fp8_attention(q, k, v, path="int8"), "8bit", "int8")
    if device == "cuda":
        for name, present in _backends.available().items():
            if present:
                provs[f"{name}-fp8"] = (lambda q, k, v, p=name: fp8_attention(q, k, v, path=p), "8bit", name)
    return provs


def _runs(pname: str, what: str, device: str, d: int, s: int) -> str:
    if pname == "ours-fp8":  # what path="auto" picked on this device
        return cuda_auto_path(torch.cuda.get_device_capability(), d) if device == "cuda" else "triton (interpreter)"
    if pname in ("sdpa-cudnn", "ours-bf16-auto"):  # these depend on S (the cuDNN length fault)
        backend = "cudnn" if pname == "sdpa-cudnn" else "auto"
        return sdpa_backend.choose_backend(backend, sdpa_backend.device_facts(device), seq_len=s).label
    return what


def bench_attention(device: str, shapes, reps: int, ceilings: dict) -> list[dict]:
    rows = []
    for name, b, h, s, d in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
        dout = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g)
        # Accuracy on at most 2 (batch, head) pairs: the float reference materialises S x S scores.
        qs, ks, vs = (t[:1, :2] for t in (q, k, v))
        exact = attention_float(qs, ks, vs, dtype=torch.float32 if device == "cuda" else torch.float64)
        flops = 4 * b * h * s * s * d
        shape_rows = []
        for pname, (fn, kind, what) in providers(device).items():
            row = {"shape": name, "B": b, "H": h, "S": s, "D": d, "provider": pname,
                   "runs": _runs(pname, what, device, d, s)}
            try:
                with torch.no_grad():
                    row["sqnr_db"] = round(sqnr_db(fn(qs, ks, vs), exact), 2)
                    ko = ks + 8.0
                    row["sqnr_key_offset8_db"] = round(sqnr_db(fn(qs, ko, vs), attention_float(qs, ko, vs,
                                                       dtype=exact.dtype)), 2)
                    sec = _time(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), device, reps)
                if kind == "bf16":
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def fwd_bwd(fn=fn, qg=qg, kg=kg, vg=vg, dout=dout):
                        torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), dout)

                    total = _time(fwd_bwd, device, reps)
                    row["fwd_bwd_ms"] = round(total * 1e3, 4)
                    if total > sec:  # CPU timing noise can invert them: then no backward figure
                        row["bwd_ms"] = round((total - sec) * 1e3, 4)
                        row["bwd_tflops"] = round(2.5 * flops / (total - sec) / 1e12, 2)
                    del qg, kg, vg
            except Exception as exc:  # an optional provider failing must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                shape_rows.append(row)
                continue
            _add_timing(row, sec, flops, ceilings)
            shape_rows.append(row)
        timed = [r for r in shape_rows if "ms" in r]
        default = next((r["ms"] for r in timed if r["provider"] == "sdpa-default"), None)
        best_bf16 = min((r["ms"] for r in timed if providers_kind(r["provider"]) == "bf16"), default=None)
        for r in timed:
            if default:
                r["speedup_vs_sdpa_default"] = round(default / r["ms"], 3)
            if best_bf16:
                r["speedup_vs_best_bf16"] = round(best_bf16 / r["ms"], 3)
        rows += shape_rows
        del q, k, v, dout
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _add_timing(row: dict, sec: float, flops: float, ceilings: dict) -> None:
    """ms, TFLOP/s and % of each of the run's GEMM ceilings."""
    row["ms"] = round(sec * 1e3, 4)
    row["tflops"] = round(flops / sec / 1e12, 2)
    for key, peak in ceilings.items():
        row[f"pct_of_{key}_ceiling"] = round(100 * row["tflops"] / peak, 1)


def providers_kind(pname: str) -> str:
    return "bf16" if pname.startswith("sdpa-") or pname.endswith("-bf16") else "8bit"


def bench_fp8_configs(device: str, shapes, reps: int, ceilings: dict) -> list[dict]:
    """The FP8 kernel under each stored candidate launch config of this GPU (``_kernels.CONFIGS``; on the CPU, sm_90's
    set through the interpreter): which one should be the stored default. SQNR per config, since the blocks are
    part of the numerics."""
    from cdm_kernels.attention._kernels import config_label, kernel_configs, triton_fp8_attention

    cap = tuple(torch.cuda.get_device_capability()) if device == "cuda" else (9, 0)
    rows = []
    for name, b, h, s, d in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
        qs, ks, vs = (t[:1, :2] for t in (q, k, v))
        exact = attention_float(qs, ks, vs, dtype=torch.float32 if device == "cuda" else torch.float64)
        flops = 4 * b * h * s * s * d
        for i, cfg in enumerate(kernel_configs(d, cap)):
            row = {"shape": name, "B": b, "S": s, "D": d, "sm": "{}{}".format(*cap), "stored_default": i == 0,
                   "config": config_label(cfg)}  # 'tma'/'ws' in the name: else two candidates share one
            try:
                with torch.no_grad():
                    row["sqnr_db"] = round(sqnr_db(triton_fp8_attention(qs, ks, vs, d ** -0.5, cfg), exact), 2)
                    sec = _time(lambda cfg=cfg, q=q, k=k, v=v, scale=d ** -0.5: triton_fp8_attention(q, k, v, scale,
                                                                                                    cfg), device, reps)
            except Exception as exc:  # a config that does not fit (shared memory) must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                continue
            _add_timing(row, sec, flops, ceilings)
            rows.append(row)
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_fp8_config_plan(capability: int | None, shapes) -> list[str]:
    """The rows --fp8-configs would time: one line per shape and stored launch config of this GPU (default first)."""
    from cdm_kernels.attention._kernels import config_label, kernel_configs

    if capability is None:
        capability = 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1] \
            if torch.cuda.is_available() else 90
    cap = divmod(capability, 10)
    lines = []
    for name, _b, h, s, d in shapes:
        for i, cfg in enumerate(kernel_configs(d, cap)):
            lines.append(f"fp8-config {name} (H={h} S={s} D={d}) sm_{capability}: {config_label(cfg)}"
                         f"{' (stored default)' if i == 0 else ''}")
    print("\n".join(lines))
    return lines


def _sd3_config(quick: bool) -> tuple[dict, dict]:
    if quick:  # tiny random-init SD3: 64 image + 13 text tokens, 2 heads of 64
        cfg = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                   pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
        shape = {"latent": (2, 4, 16, 16), "text": (2, 13, 32), "pooled": (2, 32)}
    else:  # SD3-Medium architecture (random init: weights cannot be downloaded), 1024px, 333 text tokens
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        shape = {"latent": (2, 16, 128, 128), "text": (2, 333, 4096), "pooled": (2, 2048)}
    return cfg, shape


def bench_model(device: str, quick: bool, reps: int) -> list[dict]:
    """Teacher velocity with FP8 attention (+ FP8 linears) vs the bf16 model: relative error and time."""
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError:
        return [{"model": "SD3", "error": "diffusers not installed"}]
    from cdm_kernels.fp8 import quantize_frozen

    cfg, shape = _sd3_config(quick)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = SD3Transformer2DModel(**cfg).to(device, dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(*shape["latent"], device=device, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(*shape["text"], device=device, generator=g).to(dtype),
        "pooled_projections": torch.randn(*shape["pooled"], device=device, generator=g).to(dtype),
        "timestep": torch.tensor([500.0, 900.0], device=device),
    }

    def run():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    name = "SD3 tiny (random init)" if quick else "SD3-Medium arch 1024px B=2 (random init)"
    ref = run().float()
    rows = [{"model": name, "variant": "bf16", "ms": round(_time(run, device, reps) * 1e3, 3)}]

    def rel(out):
        return float((out.float() - ref).norm() / ref.norm())

    patch_attention(model, mode="bf16", backend="auto")  # the exact backend speed.attention_backend=auto picks
    out = run()
    rows.append({"model": name, "variant": "bf16, attention_backend=auto", "rel_err_vs_bf16": round(rel(out), 5),
                 "ms": round(_time(run, device, reps) * 1e3, 3)})
    patch_attention(model, mode="fp8_no_grad")
    out = run()
    rows.append({"model": name, "variant": "fp8 attention", "rel_err_vs_bf16": round(rel(out), 5),
                 "ms": round(_time(run, device, reps) * 1e3, 3)})
    report = quantize_frozen(model)
    if report.applied:
        out = run()
        rows.append({"model": name, "variant": "fp8 attention + fp8 linears",
                     "rel_err_vs_bf16": round(rel(out), 5), "ms": round(_time(run, device, reps) * 1e3, 3),
                     "fp8_linears": len(report.quantized), "bf16_linears": len(report.skipped)})
    else:
        rows.append({"model": name, "variant": "fp8 linears", "error": f"not applied: {report.reason}"})
    return rows


def _print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}")
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the only sensible choice on CPU)")
    ap.add_argument("--section", default="all", choices=["all", "attention", "model"])
    ap.add_argument("--reps", type=int, default=3, help="CPU timing repetitions (GPU uses do_bench)")
    ap.add_argument("--fp8-configs", action="store_true",
                    help="with the attention section: also time the FP8 kernel under each stored launch config")
    ap.add_argument("--dry-run", action="store_true",
                    help="with --fp8-configs: print one line per (shape, stored launch config) the run would time, "
                         "time nothing (checks the candidate set on a machine without the GPU)")
    ap.add_argument("--capability", type=int, default=None, metavar="SM",
                    help="with --dry-run: the GPU's compute capability, e.g. 90 (default: this GPU's, else 90)")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    args = ap.parse_args(argv)
    quick = args.quick or args.device == "cpu"
    if args.dry_run:
        if not args.fp8_configs:
            ap.error("--dry-run needs --fp8-configs")
        return print_fp8_config_plan(args.capability, CPU_SHAPES if args.quick else GPU_SHAPES)

    env = {"torch": torch.__version__, "device": args.device}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    env["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    print("environment:", json.dumps(env))
    result = {"env": env}
    if args.section in ("all", "attention"):
        ceilings = matmul_ceilings(args.device)
        if ceilings:
            print("matmul ceilings (TFLOP/s, 8192^3):", {k: round(v, 1) for k, v in ceilings.items()})
        result["ceilings_tflops"] = ceilings
        shapes = CPU_SHAPES if quick else GPU_SHAPES
        result["attention"] = bench_attention(args.device, shapes, args.reps, ceilings)
        _print_rows("attention", result["attention"])
        if args.fp8_configs:
            result["fp8_configs"] = bench_fp8_configs(args.device, shapes[:1] if quick else shapes, args.reps,
                                                      ceilings)
            _print_rows("FP8 kernel per stored launch config", result["fp8_configs"])
    if args.section in ("all", "model"):
        result["model"] = bench_model(args.device, quick, args.reps)
        _print_rows("whole model (teacher velocity)", result["model"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if not math.isfinite(sum(r.get("sqnr_db", 0.0) for r in result.get("attention", []))):
        raise SystemExit("non-finite SQNR")


if __name__ == "__main__":
    main()
