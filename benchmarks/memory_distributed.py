"""Computed (not measured) peak memory per GPU for CDM on SD3-Medium or Flux-dev, DDP vs FSDP2, and bench sizing.

    python benchmarks/memory_distributed.py [--model sd3-medium|flux-dev] [--batch 4] [--markdown FILE]
    python benchmarks/memory_distributed.py --bench-step [--budget-gib 60] [--markdown FILE]

The first form prints the distributed table (1024 px, N = 1, 2, 4, 8 ranks); `--bench-step`
prints, for each `bench_step.py` row of RESULTS_e2e.md (512 / 1024 px, batch 4 / 16), the
deepest `--layers` whose single-GPU estimate (one trainer, `parallel: none`) fits the budget.
`--markdown FILE` also appends the printed table(s) to FILE (created if missing).

Parameter counts come from the real architecture instantiated on the meta device; activation
sizes from a per-token estimate (see RESULTS_distributed.md for the formula and its assumptions).
"""

from __future__ import annotations

import argparse

import torch

GiB = 1024**3


def sd3_medium_counts(resolution: int = 1024, layers: int | None = None) -> dict[str, int]:
    from diffusers import SD3Transformer2DModel

    from cdm_train.models.sd3 import SD3_MEDIUM_ARCH, SD3_TEXT_TOKENS

    arch = dict(SD3_MEDIUM_ARCH, sample_size=resolution // 8)
    if layers is not None:  # sd3-medium-shape's model.layers
        arch["num_layers"] = layers
    with torch.device("meta"):
        model = SD3Transformer2DModel(**arch)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    side = resolution // 8 // arch["patch_size"]
    return {"params": params, "block_params": block, "blocks": arch["num_layers"],
            "hidden": arch["num_attention_heads"] * arch["attention_head_dim"],
            "tokens": side * side + SD3_TEXT_TOKENS}


def flux_dev_counts(resolution: int = 1024) -> dict[str, int]:
    """Flux-dev (`FLUX_DEV_ARCH`): 19 double-stream + 38 single-stream blocks; 2x2-packed image tokens + 512 T5."""
    from diffusers import FluxTransformer2DModel

    from cdm_train.models.flux import FLUX_DEV_ARCH, FLUX_TEXT_TOKENS

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_ARCH)
    params = sum(p.numel() for p in model.parameters())
    # FSDP gathers one block at a time: the larger (double-stream) block bounds the working buffers
    block = max(sum(p.numel() for p in blocks[0].parameters())
                for blocks in (model.transformer_blocks, model.single_transformer_blocks))
    side = resolution // 16
    return {"params": params, "block_params": block,
            "blocks": FLUX_DEV_ARCH["num_layers"] + FLUX_DEV_ARCH["num_single_layers"],
            "hidden": FLUX_DEV_ARCH["num_attention_heads"] * FLUX_DEV_ARCH["attention_head_dim"],
            "tokens": side * side + FLUX_TEXT_TOKENS}


MODELS = {"sd3-medium": ("SD3-Medium", sd3_medium_counts), "flux-dev": ("Flux-dev", flux_dev_counts)}


# bytes per activation element count "per token per hidden unit per block" in bf16 with a fused
# (flash / SDPA) attention: the Korthikanti et al. estimate 34 s d for a transformer layer without
# the s^2 attention term; SD3 joint blocks run both streams (image + text tokens) through the same.
ACT_BYTES_PER_TOKEN_HIDDEN = 34
GRAD_FORWARDS = 2  # student step: one shared CA/DM forward + one CDM forward, both kept for backward


def peak_bytes(c: dict[str, int], mode: str, world: int, batch: int, grad_ckpt: bool) -> dict[str, float]:
    p = c["params"]
    trainable_states = 2 * (4 + 4 + 8) * p  # student + fake: fp32 params, fp32 grads, Adam m and v
    frozen = 2 * p + 4 * p  # real teacher in bf16, EMA in fp32
    if mode == "ddp":
        states = trainable_states + frozen + 2 * 4 * p  # + DDP gradient buckets (fp32) for student and fake
        working = 0.0
    else:
        states = (trainable_states + frozen) / world
        # rollout: the whole student all-gathered in bf16 once (rollout_context); in the student step:
        # two blocks in bf16 (current + prefetched) and one block's fp32 reduce-scatter buffer.
        working = max(2 * p, 2 * 2 * c["block_params"] + 4 * c["block_params"])
    per_block = ACT_BYTES_PER_TOKEN_HIDDEN * c["tokens"] * c["hidden"]
    if grad_ckpt:  # block inputs kept (bf16), one block's activations rebuilt at a time
        act = GRAD_FORWARDS * batch * (c["blocks"] * 2 * c["tokens"] * c["hidden"] + per_block)
    else:
        act = GRAD_FORWARDS * batch * c["blocks"] * per_block
    return {"states": states / GiB, "working": working / GiB, "activations": act / GiB,
            "total": (states + working + act) / GiB}


# One trainer on one GPU (bench_step.py, `parallel: none`): 38 P of states (see peak_bytes) plus the
# activations of the student step's forwards with gradient: 3 in reference mode (separate CA, DM and CDM
# forwards: shared_student_forward off), 2 in fast mode (one shared CA/DM forward + CDM).
BENCH_GRAD_FORWARDS = {"reference": 3, "fast": 2}
BENCH_ROWS = ((512, 4), (512, 16), (1024, 4), (1024, 16))  # RESULTS_e2e.md's GPU table


def bench_peak_gib(c: dict[str, int], batch: int, grad_forwards: int) -> dict[str, float]:
    states = 38 * c["params"]
    act = grad_forwards * batch * c["blocks"] * ACT_BYTES_PER_TOKEN_HIDDEN * c["tokens"] * c["hidden"]
    return {"states": states / GiB, "activations": act / GiB, "total": (states + act) / GiB}


def bench_layers(resolution: int, batch: int, budget_gib: float, max_layers: int = 24) -> tuple[int, dict]:
    """The deepest layer count whose reference-mode estimate fits the budget (0 if none), and its counts."""
    best, best_c = 0, {}
    for layers in range(1, max_layers + 1):
        c = sd3_medium_counts(resolution, layers)
        if bench_peak_gib(c, batch, BENCH_GRAD_FORWARDS["reference"])["total"] > budget_gib:
            break
        best, best_c = layers, c
    return best, best_c


def distributed_table(batch: int, model: str = "sd3-medium") -> list[str]:
    name, count = MODELS[model]
    c = count()
    lines = [f"{name} transformer: {c['params'] / 1e9:.3f} B params, {c['blocks']} blocks (largest "
             f"{c['block_params'] / 1e6:.1f} M), {c['tokens']} tokens at 1024 px, hidden {c['hidden']}, "
             f"batch {batch} per rank",
             "",
             "| ranks N | mode | grad ckpt | states GiB | working GiB | activations GiB | **peak GiB / GPU** |",
             "|---|---|---|---|---|---|---|"]
    for world in (1, 2, 4, 8):
        for mode in ("ddp", "fsdp"):
            for ckpt in (False, True):
                r = peak_bytes(c, mode, world, batch, ckpt)
                lines.append(f"| {world} | {mode} | {'on' if ckpt else 'off'} | {r['states']:.1f} | "
                             f"{r['working']:.1f} | {r['activations']:.1f} | **{r['total']:.1f}** |")
    return lines


def bench_table(budget_gib: float) -> list[str]:
    full = {res: sd3_medium_counts(res) for res in (512, 1024)}
    lines = [f"bench_step.py on one GPU (one trainer per process, no grad checkpointing), budget {budget_gib:g} GiB "
             "of computed peak; the 24-layer estimate for comparison",
             "",
             "| resolution | batch | **--layers** | params B | states GiB | activations GiB ref / fast | "
             "**peak GiB ref / fast** | 24 layers: peak GiB ref / fast |",
             "|---|---|---|---|---|---|---|---|"]
    for res, batch in BENCH_ROWS:
        layers, c = bench_layers(res, batch, budget_gib)
        f24 = [bench_peak_gib(full[res], batch, BENCH_GRAD_FORWARDS[m])["total"] for m in ("reference", "fast")]
        if layers == 0:
            lines.append(f"| {res} | {batch} | **none fits** | - | - | - | - | {f24[0]:.1f} / {f24[1]:.1f} |")
            continue
        ref, fast = (bench_peak_gib(c, batch, BENCH_GRAD_FORWARDS[m]) for m in ("reference", "fast"))
        lines.append(f"| {res} | {batch} | **{layers}** | {c['params'] / 1e9:.3f} | {ref['states']:.1f} | "
                     f"{ref['activations']:.1f} / {fast['activations']:.1f} | "
                     f"**{ref['total']:.1f} / {fast['total']:.1f}** | {f24[0]:.1f} / {f24[1]:.1f} |")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="samples per rank (train.batch_size)")
    ap.add_argument("--model", choices=sorted(MODELS), default="sd3-medium",
                    help="architecture of the distributed table (default sd3-medium)")
    ap.add_argument("--bench-step", action="store_true",
                    help="size bench_step.py's --layers per RESULTS_e2e.md row for one GPU instead")
    ap.add_argument("--budget-gib", type=float, default=60.0,
                    help="--bench-step: computed peak allowed per process (default 60: an 80 GB H100 minus "
                         "room for what the estimate does not count)")
    ap.add_argument("--markdown", metavar="FILE", default=None,
                    help="also append the printed table(s) to FILE (created if missing)")
    args = ap.parse_args(argv)
    lines = bench_table(args.budget_gib) if args.bench_step else distributed_table(args.batch, args.model)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
