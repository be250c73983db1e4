"""`train.grad_checkpointing: auto`: the fastest activation-checkpointing plan that fits the GPU.

The plans, fastest first (benchmarks/cost_model.py --plans at full depth, compiled blocks): none, selective,
full. Each plan's peak is estimated from what is known before the first step:

- model state: every parameter on the device now (student, fake teacher, real teacher, EMA), plus what the first
  optimizer steps will add: AdamW's two fp32 states for every trainable parameter of student and fake teacher
  and the student's fp32 gradients (the fake's are freed before the student step, where the peak is). Under
  FSDP2 it is divided by the world size.
- activations: batch x blocks x tokens x width x a per-plan constant (bytes kept per token and hidden unit of one
  block for one sample over the iteration's peak), from the cost model's full-depth runs (fake tensors, bf16,
  1024 px, official batch): the largest of SD3-Medium, Flux-dev and LongCat-Image (none 83 / 101 / 96,
  selective 40 / 33 / 24, full 3.4 / 3.7 / 7.4), so the estimate errs towards more checkpointing.

The first plan whose estimate stays under 90% of the device's memory wins; none fits: full (the official
setting), with a warning. CPU runs (no memory limit worth planning for) take none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .blocks import network_blocks

log = logging.getLogger("cdm_train")

PLANS = ("none", "selective", "full")  # fastest first
# Bytes per (sample, block, token, hidden unit) at the peak, per plan (cost model --plans, 2026-12-06: SD3-Medium
# 24 blocks x 4429 tokens x 1536, Flux-dev 57 x 4608 x 3072, LongCat-Image 30 x 4608 x 3072; the largest of the
# three; benchmarks/RESULTS_cost_model.md).
ACTIVATION_BYTES = {"none": 101.0, "selective": 40.0, "full": 7.5}
HEADROOM = 0.9  # allocator fragmentation, CUDA context, cuBLAS / attention workspaces


@dataclass
class PlanChoice:
    plan: str
    reason: str
    estimates_gib: dict[str, float]


def model_state_bytes(models, ema, world: int = 1, sharded: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    trainable = 0
    nets = [models.student, models.fake, models.teacher] + ([ema.module] if ema is not None else [])
    for net in nets:
        base = getattr(net, "peft_model", None)
        for p in list(net.parameters()) + (list(base.parameters()) if base is not None else []):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for net in (models.student, models.fake):
        trainable += sum(p.numel() for p in net.parameters() if p.requires_grad)
    student = sum(p.numel() for p in models.student.parameters() if p.requires_grad)
    total += 8 * trainable + 4 * student
    return total // world if sharded else total


def activation_shape(models, batch: int) -> tuple[int, int, int]:
    """(blocks, tokens, width) of the student as it will run: blocks from its block lists, width from the first
    block's attention, tokens = image tokens (latent side^2 / patch^2, or packed) + text tokens of one condition."""
    blocks = network_blocks(models.student)
    if not blocks:
        return 0, 0, 0
    attn = getattr(blocks[0], "attn", None)
    width = int(attn.to_q.in_features) if attn is not None and hasattr(attn, "to_q") else 0
    shape = models.latent_shape
    image = shape[-1] * shape[-2] // 4 if len(shape) == 3 else int(shape[0])  # SD3 patch 2 / Flux packed
    cond = models.sample_cond(1, torch.Generator().manual_seed(0))
    text = 0
    if isinstance(cond, dict) and isinstance(cond.get("encoder_hidden_states"), torch.Tensor):
        text = int(cond["encoder_hidden_states"].shape[1])
    return len(blocks), image + text, width


def choose_plan(models, ema, device: torch.device, batch: int, *, world: int = 1, sharded: bool = False,
                total_bytes: int | None = None) -> PlanChoice:
    if device.type != "cuda" and total_bytes is None:
        return PlanChoice("none", "not a CUDA device: no activation checkpointing", {})
    if total_bytes is None:
        total_bytes = torch.cuda.get_device_properties(device).total_memory
    state = model_state_bytes(models, ema, world, sharded)
    blocks, tokens, width = activation_shape(models, batch)
    gib = 2.0**30
    estimates = {plan: (state + batch * blocks * tokens * width * ACTIVATION_BYTES[plan]) / gib for plan in PLANS}
    budget = HEADROOM * total_bytes / gib
    for plan in PLANS:
        if estimates[plan] <= budget:
            return PlanChoice(plan, f"estimated peak {estimates[plan]:.1f} GiB of {budget:.1f} usable", estimates)
    log.warning("train.grad_checkpointing=auto: no plan fits (full: %.1f GiB estimated, %.1f usable); using full",
                estimates["full"], budget)
    return PlanChoice("full", f"nothing fits ({estimates['full']:.1f} GiB estimated for full, {budget:.1f} usable)",
                      estimates)


__all__ = ["choose_plan", "PlanChoice", "PLANS", "ACTIVATION_BYTES", "model_state_bytes", "activation_shape"]
