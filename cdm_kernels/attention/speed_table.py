"""Where 8-bit attention measured faster than the best exact backend: the table the fast mode consults, so that
it never trades accuracy for a slower kernel.

Keyed by (CUDA capability, head dim, kernel) with the kernel "fp8" (the Triton FP8 kernel, sm_89+) or "int8"
(the INT8-QK kernel, sm_80+). Each entry holds the measured speed-ups of ours over the bf16 comparator at every
shape benchmarked (benchmarks/bench_attention.py), with the device, date and what the comparator was. A key
counts as "faster" only when ours won at every measured shape, against a comparator that was the best exact
backend of that run; everything unmeasured is "not faster" (bf16 attention, the conservative default).

To add a measurement: run ``python benchmarks/bench_attention.py --device cuda`` and copy the speed-ups of the
fastest bf16 row into a new ``Measurement`` here (one per capability and head dim).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Measurement:
    device: str
    date: str
    comparator: str  # the bf16 backend ours was timed against
    comparator_is_best_bf16: bool  # False when faster exact backends were not measured in that run
    speedups: dict[str, float]  # shape -> bf16 time / ours time
    source: str

    @property
    def faster(self) -> bool:
        return self.comparator_is_best_bf16 and bool(self.speedups) and min(self.speedups.values()) > 1.0


_H200_RUN = dict(device="NVIDIA H200 (sm_90), torch 2.11, triton 3.6", date="2026-12-04",
                 comparator="SDPA default (FlashAttention-2 kernel; cuDNN attention not measured)",
                 comparator_is_best_bf16=False, source="benchmarks/RESULTS_gpu.md, FP8 attention table")

MEASURED: dict[tuple[tuple[int, int], int, str], Measurement] = {
    # FP8 lost at SD3 B2/B4 and both Flux shapes; it won by <= 1.06x at SD3 B8/B16 and 1.11x at S=32760, against
    # SDPA's flash kernel, itself slower than cuDNN attention on Hopper (published H100: 408 vs 321 TFLOP/s at
    # D=64, 609-631 vs 368 at D=128). Not faster at any shape we train on.
    ((9, 0), 64, "fp8"): Measurement(speedups={"SD3 B2 S4429": 0.96, "SD3 B4 S4429": 0.96, "SD3 B8 S4429": 1.03,
                                               "SD3 B16 S4429": 1.06}, **_H200_RUN),
    ((9, 0), 128, "fp8"): Measurement(speedups={"Flux B1 S4608": 0.74, "Flux B2 S4608": 0.85,
                                                "video B1 S32760": 1.11}, **_H200_RUN),
}


def eight_bit_is_faster(capability: tuple[int, int] | None, head_dim: int | None, kernel: str) -> tuple[bool, str]:
    """(whether `kernel` measured faster than the best bf16 attention here, why) for a CUDA device of
    `capability` at `head_dim`; unmeasured -> (False, ...)."""
    if kernel not in ("fp8", "int8"):
        raise ValueError(f"kernel must be 'fp8' or 'int8', got {kernel!r}")
    if capability is None or head_dim is None:
        return False, "no CUDA capability or head dim known: not measured"
    cap = tuple(capability)
    m = MEASURED.get((cap, head_dim, kernel))
    where = f"sm_{cap[0]}{cap[1]}, head dim {head_dim}, {kernel}"
    if m is None:
        return False, f"{where}: not measured against bf16 (conservative default: bf16)"
    lo, hi = min(m.speedups.values()), max(m.speedups.values())
    verdict = "faster" if m.faster else "not faster"
    extra = "" if m.comparator_is_best_bf16 else "; the comparator was not the best bf16 backend"
    return m.faster, (f"{where}: {verdict} ({lo:.2f}-{hi:.2f}x of {m.comparator} on {m.device}, {m.date}{extra})")


__all__ = ["MEASURED", "Measurement", "eight_bit_is_faster"]
