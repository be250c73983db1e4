"""Correctness checks of benchmarks/gpu_acceptance.sh, one subcommand per step, each writing JSON.

    python benchmarks/gpu_checks.py env     --out OUT/env.json
    python benchmarks/gpu_checks.py ops     --out OUT/ops.json      # every op vs its reference, real shapes
    python benchmarks/gpu_checks.py fp8     --out OUT/fp8.json      # FP8, INT8-QK attention SQNR vs float64, twin
    python benchmarks/gpu_checks.py graphs  --out OUT/graphs.json   # CUDA-graph capture + replay of a loss fwd+bwd
    python benchmarks/gpu_checks.py summary --dir OUT               # OUT/summary.json: one record per figure

`--cpu` runs the same checks on the CPU through Triton's interpreter at tiny shapes (the
script's --cpu-dry-run); the figures are then functional only, never speed claims.

Pass rule of the op checks (docs/design.md): compared against a float64 reference, the fused result's
max error must stay within 4x the reference's own error in the same input dtype (plus a tiny
absolute floor); NaN never passes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_SHAPES = [("sd3-1024 B16", (16, 16, 128, 128)), ("flux-1024 B8 packed", (8, 4096, 64)),
              ("video 1x16x21x60x104", (1, 16, 21, 60, 104))]
CPU_SHAPES = [("tiny B3", (3, 4, 8, 8)), ("odd B2", (2, 3, 5, 7))]


def _write(path: str, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))
    print(json.dumps(data, default=str)[:4000])


def cmd_env(args) -> int:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    optional = {}
    for name in ("diffusers", "transformers", "peft", "accelerate", "torchao", "flash_attn", "flash_attn_interface",
                 "transformer_engine", "pynvml", "safetensors"):
        try:
            mod = importlib.import_module(name)
            optional[name] = getattr(mod, "__version__", "present")
        except Exception as exc:  # ImportError, or a broken install: say which
            optional[name] = None if isinstance(exc, ImportError) else f"broken: {type(exc).__name__}"
    info["optional"] = optional
    import cdm_kernels

    info["cdm_kernels_backends"] = cdm_kernels.available_backends()
    info["cudnn_version"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cudnn_sdp_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    # Which SDPA kernel really ran (issue 24: torch's default picked flash, not cuDNN, on the H200): one
    # forward+backward per backend setting at the SD3 and Flux head dims, the profiler's names of what ran.
    shapes = [("sd3 D64", (1, 24, 4429, 64)), ("flux D128", (1, 24, 4608, 128))] if device == "cuda" else [
        ("tiny D32", (1, 2, 77, 32))]
    info["sdpa_kernels"] = [sdpa_kernels_that_ran(device, backend, name, shape)
                            for name, shape in shapes for backend in ("sdpa-default", "auto")]
    _write(args.out, info)
    return 0


_ATTENTION_WORDS = ("attn", "attention", "fmha", "flash", "cudnn", "sdpa", "scaled_dot_product")


def sdpa_kernels_that_ran(device: str, backend: str, name: str, shape: tuple[int, ...]) -> dict:
    """The aten SDPA ops and the device kernels (profiler names) one attention forward+backward ran under
    cdm_kernels' `backend` choice; an error is recorded, not raised (the env step must not fail on it)."""
    from torch.profiler import ProfilerActivity, profile

    from cdm_kernels.attention.sdpa_backend import choose_backend, device_facts, run_attention

    row = {"shape": name, "backend": backend}
    try:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        row["choice"] = choose_backend(backend, device_facts(q.device), seq_len=shape[2]).label
        run_attention(q, k, v, backend=backend).sum().backward()  # warm-up: lazy init out of the profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            run_attention(q, k, v, backend=backend).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
        events = list(prof.events())
        row["aten_ops"] = sorted({e.name for e in events if e.name.startswith("aten::")
                                  and "scaled_dot_product" in e.name})
        row["kernels"] = sorted({e.name[:160] for e in events if e.device_type.name == "CUDA"
                                 and any(w in e.name.lower() for w in _ATTENTION_WORDS)})
    except Exception as exc:  # noqa: BLE001 - recorded for the log
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return row


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    return float("nan") if not torch.isfinite(d).all() else float(d.max())


def _op_cases(s, st):
    """name -> (fn(ck_module, inputs) -> tensor or per-sample loss, index of the differentiated input or None)."""
    return {
        "euler_extrapolate": (lambda ck, x: ck.euler_extrapolate(x[0], x[1], s, st), None),
        "euler_step": (lambda ck, x: torch.stack(ck.euler_step(x[0], x[1], s, st)), None),
        "renoise seeded": (lambda ck, x: ck.renoise(x[0], st, seed=1234), None),
        "predict_x0_renoise seeded": (lambda ck, x: torch.stack(ck.predict_x0_renoise(x[0], x[1], s, st, seed=99)),
                                      None),
        "dm_loss": (lambda ck, x: ck.dm_loss(x[0], x[1], x[2], x[3], x[4], s, st, reduction="none"), 0),
        "cfg_loss": (lambda ck, x: ck.cfg_loss(x[0], x[1], x[2], x[3], x[4], s, st, guidance_scale=7.0,
                                               reduction="none"), 0),
        "flow_matching_loss seeded": (lambda ck, x: ck.flow_matching_loss(x[0], x[1], seed=7, reduction="none"), 0),
    }


def _run_op(ck, backend: str, fn, grad_index, base, device, dtype):
    xs = [b.to(device=device, dtype=dtype).detach().clone() for b in base]  # fresh leaves every run
    if grad_index is not None:
        xs[grad_index].requires_grad_(True)
    with ck.use_backend(backend):
        out = fn(ck, xs)
        grad = None
        if grad_index is not None:
            out.sum().backward()
            grad = xs[grad_index].grad.detach()
    return out.detach(), grad


def cmd_ops(args) -> int:
    import cdm_kernels as ck

    device = "cpu" if args.cpu else "cuda"
    shapes = CPU_SHAPES if args.cpu else GPU_SHAPES
    dtypes = [torch.float32] if args.cpu else [torch.bfloat16, torch.float32]
    g = torch.Generator().manual_seed(0)
    records, failed = [], 0
    for label, shape in shapes:
        for dtype in dtypes:
            base = [torch.randn(shape, generator=g) for _ in range(5)]
            s = (torch.rand(shape[0], generator=g) * 0.9 + 0.05).to(device)
            st = (torch.rand(shape[0], generator=g) * 0.9 + 0.05).to(device)
            cases, cases64 = _op_cases(s, st), _op_cases(s.double(), st.double())
            for name, (fn, grad_index) in cases.items():
                try:
                    exact, exact_grad = _run_op(ck, "reference", cases64[name][0], grad_index, base, device,
                                                torch.float64)
                    ref_out, ref_grad = _run_op(ck, "reference", fn, grad_index, base, device, dtype)
                    fused_out, fused_grad = _run_op(ck, "triton", fn, grad_index, base, device, dtype)
                except Exception as exc:
                    records.append({"figure": "op_check", "shape": label, "dtype": str(dtype), "op": name,
                                    "passed": False, "error": f"{type(exc).__name__}: {exc}"[:400]})
                    failed += 1
                    print(f"FAIL {label} {dtype} {name}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                rec = {"figure": "op_check", "shape": label, "dtype": str(dtype), "op": name,
                       "err_fused": _max_err(fused_out, exact), "err_reference": _max_err(ref_out, exact)}
                floor = 1e-6 * max(1.0, float(exact.abs().max()))
                ok = rec["err_fused"] <= 4 * rec["err_reference"] + floor
                if exact_grad is not None:
                    rec["grad_err_fused"] = _max_err(fused_grad, exact_grad)
                    rec["grad_err_reference"] = _max_err(ref_grad, exact_grad)
                    gfloor = 1e-6 * max(1.0, float(exact_grad.abs().max()))
                    ok = ok and rec["grad_err_fused"] <= 4 * rec["grad_err_reference"] + gfloor
                rec["passed"] = bool(ok)  # NaN compares False: never passes
                failed += 0 if ok else 1
                records.append(rec)
                print(f"{'ok  ' if ok else 'FAIL'} {label} {dtype} {name}: fused {rec['err_fused']:.3g} vs reference "
                      f"{rec['err_reference']:.3g}", flush=True)
    _write(args.out, records)
    return 1 if failed else 0


def cmd_fp8(args) -> int:
    from cdm_kernels.attention import (
        attention_float,
        fp8_attention,
        fp8_attention_reference,
        int8_attention_reference,
        sqnr_db,
    )
    from cdm_kernels.attention.fp8_attention import reference_blocks

    device = "cpu" if args.cpu else "cuda"
    settings = [(1, 2, 130, 64)] if args.cpu else [(1, 24, 4096, 64), (1, 24, 4429, 64), (2, 8, 4096, 128)]
    records, failed = [], 0
    g = torch.Generator().manual_seed(1)
    for b, h, s, d in settings:
        q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=torch.bfloat16) for _ in range(3))
        k = k + 8.0  # a common key offset: what K smoothing is for
        with torch.no_grad():
            exact = attention_float(q, k, v)
        # FP8 (sm_89+): >= 24 dB; the INT8-QK kernel (A100's 8-bit attention; sm_80 up): >= 30 dB. Each against
        # float64 and against its twin's roundings.
        for figure, path, twin_fn, min_exact, min_twin in (
                ("fp8_attention_sqnr", "triton", fp8_attention_reference, 24.0, 35.0),
                ("int8_attention_sqnr", "int8", int8_attention_reference, 30.0, 45.0)):
            rec = {"figure": figure, "shape": f"B{b} H{h} S{s} D{d}"}
            try:
                with torch.no_grad():
                    out = fp8_attention(q, k, v, path=path).float()
                    # the FP8 twin with the blocks of the kernel's stored config for this GPU (its quantisation blocks)
                    blocks = ({} if path != "triton" else
                              reference_blocks(d, torch.cuda.get_device_capability() if device == "cuda" else None))
                    twin = twin_fn(q, k, v, **blocks)
                rec.update(sqnr_vs_float64_db=sqnr_db(out, exact), twin_sqnr_vs_float64_db=sqnr_db(twin, exact),
                           sqnr_vs_twin_db=sqnr_db(out, twin))
                rec["passed"] = rec["sqnr_vs_float64_db"] >= min_exact and rec["sqnr_vs_twin_db"] >= min_twin
            except Exception as exc:
                rec.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:400])
            failed += 0 if rec["passed"] else 1
            records.append(rec)
    _write(args.out, records)
    return 1 if failed else 0


def cmd_graphs(args) -> int:
    """Capture one forward+backward of dm_loss in a CUDA graph, replay on new inputs, compare with eager."""
    import cdm_kernels as ck

    if args.cpu or not torch.cuda.is_available():
        _write(args.out, [{"figure": "cuda_graph_loss", "skipped": "no CUDA device (dry run)"}])
        return 0
    shape = (4, 16, 64, 64)
    static = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    sv = static[0].clone().requires_grad_(True)
    s = torch.rand(4, device="cuda") * 0.9 + 0.05
    st = torch.rand(4, device="cuda") * 0.9 + 0.05

    def step():
        loss = ck.dm_loss(sv, static[1], static[2], static[3], static[4], s, st)
        (grad,) = torch.autograd.grad(loss, sv)
        return loss, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_loss, g_grad = step()
    records, ok_all = [], True
    for trial in range(3):
        fresh = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
        with torch.no_grad():
            sv.copy_(fresh[0])
            for dst, src in zip(static[1:], fresh[1:]):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager_loss, eager_grad = step()
        ok = bool(torch.equal(g_loss, eager_loss) and torch.equal(g_grad, eager_grad))
        ok_all &= ok
        records.append({"figure": "cuda_graph_loss", "trial": trial, "bitwise_equal_to_eager": ok,
                        "loss": float(g_loss)})
    _write(args.out, records)
    return 0 if ok_all else 1


def cmd_summary(args) -> int:
    out = Path(args.dir)
    records = []
    for path in sorted(out.glob("*.json")):
        if path.name == "summary.json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            records.append({"source": path.name, "error": f"unreadable: {exc}"})
            continue
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict):
                continue
            # A dict holding lists of rows (bench_attention's {"attention": [...], ...}): one record per row.
            nested = {k: v for k, v in item.items() if isinstance(v, list) and v and all(isinstance(r, dict)
                                                                                           for r in v)}
            rest = {k: v for k, v in item.items() if k not in nested}
            if rest:
                records.append({"source": path.name, **rest})
            for key, rows in nested.items():
                records.extend({"source": path.name, "figure": key, **row} for row in rows)
    steps = out / "steps.jsonl"
    if steps.is_file():
        for line in steps.read_text().splitlines():
            if line.strip():
                records.append({"source": "steps.jsonl", "figure": "step", **json.loads(line)})
    (out / "summary.json").write_text(json.dumps(records, indent=1, default=str))
    print(f"{out / 'summary.json'}: {len(records)} records")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["env", "ops", "fp8", "graphs", "summary"])
    p.add_argument("--out", default="gpu_out/out.json")
    p.add_argument("--dir", default="gpu_out")
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU (Triton interpreter, tiny shapes)")
    args = p.parse_args(argv)
    return {"env": cmd_env, "ops": cmd_ops, "fp8": cmd_fp8, "graphs": cmd_graphs, "summary": cmd_summary}[
        args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
