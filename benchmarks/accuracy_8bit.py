"""Accuracy of the 8-bit attention schemes at SD3 / Flux 1024 px shapes, on the CPU, through the PyTorch twins.

SQNR (dB) against float64 attention of: the INT8-QK twin (``int8_attention_reference``: the kernel's
roundings, asserted by tests/test_int8_attention.py), the same without K smoothing, the FP8 twin
(``fp8_attention_reference``), and bf16 SDPA, on Gaussian q, k, v in the input dtype, with and without a
common key offset (``--key-offset``, default 8). The SQNR pools every head (total signal over total
error), computed a few heads at a time so the float64 scores fit in memory.

    .venv/bin/python benchmarks/accuracy_8bit.py                     # both shapes, all 24 heads, bf16
    .venv/bin/python benchmarks/accuracy_8bit.py --heads 2 --shapes sd3   # a quick look

Prints a markdown table (and JSON with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cdm_kernels.attention import attention_float, fp8_attention_reference, int8_attention_reference  # noqa: E402

SHAPES = {  # name: (S, D); 24 heads each
    "sd3": ("SD3-Medium 1024px (4096 image + 333 text tokens), D=64", 4096 + 333, 64),
    "flux": ("Flux 1024px (4096 image + 512 text tokens), D=128", 4096 + 512, 128),
}
SCHEMES = {
    "int8-qk (ours)": lambda q, k, v: int8_attention_reference(q, k, v),
    "int8-qk, no K smoothing": lambda q, k, v: int8_attention_reference(q, k, v, smooth_k=False),
    "int8-qk, P and V in fp32": lambda q, k, v: int8_attention_reference(q, k, v, round_pv=False),
    "fp8 (ours)": lambda q, k, v: fp8_attention_reference(q, k, v),
    "bf16 sdpa": lambda q, k, v: F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()),
}


def measure(s: int, d: int, heads: int, dtype: torch.dtype, key_offset: float, chunk: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    signal, noise = 0.0, dict.fromkeys(SCHEMES, 0.0)
    for start in range(0, heads, chunk):
        n = min(chunk, heads - start)
        q, k, v = (torch.randn(1, n, s, d, generator=g) for _ in range(3))
        q, k, v = q.to(dtype), (k + key_offset).to(dtype), v.to(dtype)
        exact = attention_float(q, k, v)
        signal += float(exact.pow(2).sum())
        for name, fn in SCHEMES.items():
            noise[name] += float((fn(q, k, v).double() - exact).pow(2).sum())
    return {name: round(10.0 * torch.log10(torch.tensor(signal / max(err, 1e-300))).item(), 2)
            for name, err in noise.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--key-offset", type=float, default=8.0)
    ap.add_argument("--chunk", type=int, default=2, help="heads per float64 reference (memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.heads < 1 or args.chunk < 1:
        print("accuracy_8bit: --heads and --chunk must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    start = time.perf_counter()
    for key in args.shapes:
        title, s, d = SHAPES[key]
        for offset in (0.0, args.key_offset):
            res = measure(s, d, args.heads, dtype, offset, args.chunk, args.seed)
            rows.append({"shape": title, "heads": args.heads, "dtype": args.dtype, "key_offset": offset, **res})
    print(f"SQNR (dB) vs float64, Gaussian q/k/v in {args.dtype}, pooled over {args.heads} heads; "
          f"{time.perf_counter() - start:.0f} s, torch {torch.__version__}, CPU\n")
    cols = list(SCHEMES)
    print("| shape | key offset | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['shape']} | {r['key_offset']:g} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
