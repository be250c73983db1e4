"""Computed (not measured) peak memory per GPU for CDM on SD3-Medium at 1024 px, DDP vs FSDP2.

    python benchmarks/memory_distributed.py [--batch 4] [--markdown]

Parameter counts come from the real architecture instantiated on the meta device; activation
sizes from a per-token estimate (see RESULTS_distributed.md for the formula and its assumptions).
"""

from __future__ import annotations

import argparse

import torch

GiB = 1024**3


def sd3_medium_counts(resolution: int = 1024) -> dict[str, int]:
    from diffusers import SD3Transformer2DModel

    from cdm_train.presets import SD3_MEDIUM_ARCH, SD3_TEXT_TOKENS

    arch = dict(SD3_MEDIUM_ARCH, sample_size=resolution // 8)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**arch)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    side = resolution // 8 // arch["patch_size"]
    return {"params": params, "block_params": block, "blocks": arch["num_layers"],
            "hidden": arch["num_attention_heads"] * arch["attention_head_dim"],
            "tokens": side * side + SD3_TEXT_TOKENS}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4, help="samples per rank (train.batch_size)")
    args = ap.parse_args()
    c = sd3_medium_counts()
    print(f"SD3-Medium transformer: {c['params'] / 1e9:.3f} B params, {c['blocks']} blocks of "
          f"{c['block_params'] / 1e6:.1f} M, {c['tokens']} tokens at 1024 px, hidden {c['hidden']}")
    print("| ranks N | mode | grad ckpt | states GiB | working GiB | activations GiB | **peak GiB / GPU** |")
    print("|---|---|---|---|---|---|---|")
    for world in (1, 2, 4, 8):
        for mode in ("ddp", "fsdp"):
            for ckpt in (False, True):
                r = peak_bytes(c, mode, world, args.batch, ckpt)
                print(f"| {world} | {mode} | {'on' if ckpt else 'off'} | {r['states']:.1f} | {r['working']:.1f} | "
                      f"{r['activations']:.1f} | **{r['total']:.1f}** |")


if __name__ == "__main__":
    main()
