"""FP8 linear layers: teacher forward time and velocity error, bf16 vs FP8 attention vs FP8 attention +
torchao FP8 linears, on the SD3-Medium architecture at 1024px (random init). Same code as the
model section of bench_attention.py.

GPU:  python benchmarks/bench_fp8_linear.py --device cuda --out bench_fp8_linear.json
CPU:  python benchmarks/bench_fp8_linear.py --device cpu --quick   (tiny model; FP8 linears are a no-op there)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import main  # noqa: E402

if __name__ == "__main__":
    main([*sys.argv[1:], "--section", "model"])
