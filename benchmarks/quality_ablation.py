"""Quality ablation of CDM on the digits default (a benchmark script, not a test).

Eight variants, same iteration budget and training seeds, each evaluated at 1/2/4/8 student steps
(FD to the held-out digits and class accuracy, cdm_train.digits.eval, EVAL_PER_CLASS samples per class):

1. cdm          full CDM: dynamic continuous schedule, CA + DM + off-trajectory DM (the digits preset);
2. dmd          discrete DMD-style baseline: fixed schedule [1.0, 0.75, 0.5, 0.25], CA + DM only;
3. cdm-no-off   CDM without the off-trajectory loss (loss.cdm_weight=0);
4. cdm-fixed    CDM with the fixed schedule [1.0, 0.75, 0.5, 0.25];
5. cdm-merge    full CDM with the SD3 recipe's fake<-student merge (decay 0.999 after every fake step;
                the digits preset switches it off, 1.0);
6. cdm-fp8      full CDM with FP8 attention in every pass without gradient (real teacher, fake-teacher
                scoring, rollout) through the kernel's PyTorch twin (same e4m3 roundings; the digits model's
                head dim 32 is outside the kernel's {64, 128}). Evaluated with the stock attention.
7. cdm-int8     the same with the INT8-QK scheme (A100's 8-bit attention) through its twin.
9. cdm-fp8-linear    full CDM with the real teacher's linears in row-wise FP8 (speed.fp8_linear_teacher), through
                the PyTorch emulation of the same e4m3 roundings (speed.fp8_linear_emulate): every linear outside
                the AdaLN modulation and the embedders, a harsher selection than the GPU's (which keeps layers
                thinner than 512 in bf16; the digits model is 64 wide).
8. cdm-bf16-rollout  full CDM with the official bf16 rollout trajectory (train.rollout_dtype=bfloat16: x_k, v_k
                and the Euler update rounded to bf16 between steps, as the official pipeline holds its latents).

    .venv/bin/python benchmarks/quality_ablation.py --seeds 0 1 2 --jobs 2 --out benchmarks/quality_ablation.json
    .venv/bin/python benchmarks/quality_ablation.py --table benchmarks/quality_ablation.json   # markdown table

Each run uses one torch thread; --jobs runs that many in parallel processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

FIXED = "[1.0,0.75,0.5,0.25]"
VARIANTS: dict[str, list[str]] = {
    "cdm": [],
    "dmd": [f"schedule.fixed={FIXED}", "loss.cdm_weight=0"],
    "cdm-no-off": ["loss.cdm_weight=0"],
    "cdm-fixed": [f"schedule.fixed={FIXED}"],
    "cdm-merge": ["optim.fake_merge_decay=0.999"],
    "cdm-fp8": ["speed.fp8_attention_teacher=true", "speed.fp8_attention_fake=true",
                "speed.fp8_attention_rollout=true", "speed.fp8_attention_emulate=true"],
    "cdm-int8": ["speed.fp8_attention_teacher=true", "speed.fp8_attention_fake=true",
                 "speed.fp8_attention_rollout=true", "speed.fp8_attention_emulate=true", "speed.attention_8bit=int8"],
    "cdm-bf16-rollout": ["train.rollout_dtype=bfloat16"],
    "cdm-fp8-linear": ["speed.fp8_linear_teacher=true", "speed.fp8_linear_emulate=true"],
}
STEPS = (1, 2, 4, 8)


def run_one(variant: str, seed: int, iterations: int | None, per_class: int | None) -> dict:
    import torch

    torch.set_num_threads(1)
    from cdm_train.demo import distill, evaluate_student
    from cdm_train.digits.eval import DigitsEvaluator

    evaluator = DigitsEvaluator.load_or_train()
    overrides = list(VARIANTS[variant]) + [f"train.seed={seed}"]
    if iterations is not None:
        overrides.append(f"train.steps={iterations}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdm-ablation-") as tmp:
        trainer = distill(tmp, overrides=overrides, progress=False)
        train_s = time.perf_counter() - start
        scores, _ = evaluate_student(trainer.ema.module, evaluator, STEPS, per_class=per_class, seed=0)
    return {"variant": variant, "seed": seed, "iterations": trainer.step, "train_s": train_s, "scores": scores}


def table(results: list[dict]) -> str:
    def cell(values: list[float], digits: int) -> str:
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f} ± {spread:.{digits}f}"

    seeds = sorted({r["seed"] for r in results})
    its = sorted({r["iterations"] for r in results})
    lines = [f"Training seeds {seeds}, {', '.join(map(str, its))} iterations each; mean ± sample std over seeds.", "",
             "| variant | " + " | ".join(f"FD @{k}" for k in STEPS) + " | "
             + " | ".join(f"acc @{k}" for k in STEPS) + " |",
             "|---|" + "---|" * (2 * len(STEPS))]
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        fds = [cell([r["scores"][str(k)]["fd"] for r in runs], 2) for k in STEPS]
        accs = [cell([r["scores"][str(k)]["class_accuracy"] for r in runs], 3) for k in STEPS]
        lines.append(f"| {variant} | " + " | ".join(fds) + " | " + " | ".join(accs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="default: the digits preset's train.steps")
    parser.add_argument("--per-class", type=int, default=None, help="eval samples per class (default EVAL_PER_CLASS)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the raw results (JSON)")
    parser.add_argument("--table", default=None, help="only print the table of an earlier --out file")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["results"]))
        return 0
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, v, s, args.iterations, args.per_class) for v, s in jobs]
        for fut in futures:
            r = fut.result()
            results.append(r)
            short = " ".join(f"@{k} {r['scores'][str(k)]['fd']:.1f}/{r['scores'][str(k)]['class_accuracy']:.3f}"
                             for k in STEPS)
            print(f"{r['variant']:<11} seed {r['seed']} ({r['train_s']:.0f} s): {short}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=1) + "\n")
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
