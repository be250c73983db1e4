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

Plans are pure (every block of student and fake teacher on one policy) or **mixed**: `<cheap>+<expensive>:<k>`,
the first k repeated blocks of each trained network on the cheaper policy and the rest on the more expensive one
(none+selective, selective+full, none+full; torchtitan checkpoints only some layers in the same spirit). At full
depth the pure plans are all-or-nothing: SD3-Medium at batch 16 under FSDP2 x 8 needs ~105 GiB per GPU with
selective and 16 with full, so an 80 GB H100 ran full and left >60 GiB unused.

Every plan's estimate is linear in the blocks' policies. auto keeps every candidate whose estimate stays under 90%
of the device's memory: the pure plans that fit, and for each pair the largest k that fits (0 < k < blocks), and
picks the one with the least modelled recompute (RECOMPUTE below). None fits: full (the official setting), with
a warning. CPU runs (no memory limit worth planning for) take none.
"""

from __future__ import annotations

import logging
import math
import re
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
# Recompute per block and grad forward, in units of full checkpointing's (one extra block forward = 1.0). A plan
# with k blocks on `cheap` and n - k on `expensive` costs  k * RECOMPUTE[cheap] + (n - k) * RECOMPUTE[expensive].
# selective: the compiled SD3-Medium rows of the cost model's full-depth plans (RESULTS_cost_model.md,
# 2026-12-06): (selective - none) / (full - none) = (8054 - 7694) / (8925 - 7694) ms = 0.29 (Flux-dev 0.15,
# LongCat-Image 0.16: SD3's is the largest, so auto errs towards the plans with fewer selective blocks). Only the
# ranking matters, and it is the same for every model: none < selective < full per block.
RECOMPUTE = {"none": 0.0, "selective": 0.29, "full": 1.0}
PAIRS = (("none", "selective"), ("selective", "full"), ("none", "full"))
_MIXED = re.compile(r"(none|selective)\+(selective|full):(\d+)")
PLAN_SYNTAX = ("auto, none, full, selective or a mixed plan <cheap>+<expensive>:<k> (none+selective, "
               "selective+full or none+full; the first k blocks of student and fake teacher on the cheaper "
               "policy, e.g. selective+full:12)")


def parse_plan(text: str) -> tuple[str, str, int] | None:
    """A mixed plan `<cheap>+<expensive>:<k>` as (cheap, expensive, k); None for a pure policy name. ValueError
    for anything else (PLAN_SYNTAX says what is accepted)."""
    if text in PLANS:
        return None
    m = _MIXED.fullmatch(str(text))
    if m is None or (m[1], m[2]) not in PAIRS:
        raise ValueError(f"must be {PLAN_SYNTAX}, got {text!r}")
    return m[1], m[2], int(m[3])


def plan_policies(plan: str, blocks: int) -> list[str]:
    """The policy of each of `blocks` blocks under `plan` (pure or mixed). ValueError when a mixed plan's k is
    larger than the number of blocks (a typo would otherwise silently mean the pure cheap plan)."""
    mixed = parse_plan(plan)
    if mixed is None:
        return [plan] * blocks
    cheap, expensive, k = mixed
    if k > blocks:
        raise ValueError(f"{plan!r}: {k} blocks on {cheap}, but the network has {blocks}")
    return [cheap] * k + [expensive] * (blocks - k)


def recompute_cost(plan: str, blocks: int) -> float:
    """Modelled recompute of `plan`, in block forwards per grad forward (RECOMPUTE's formula)."""
    return sum(RECOMPUTE[p] for p in plan_policies(plan, blocks))


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
    return choose_plan_from(state, blocks, batch * tokens * width, total_bytes)


def choose_plan_from(state: float, blocks: int, unit: float, total_bytes: float) -> PlanChoice:
    """choose_plan on plain numbers: model state bytes, repeated blocks per trained network, `unit` = batch x
    tokens x width (one block's activation bytes per ACTIVATION_BYTES unit), the device's memory."""
    gib = 2.0**30
    budget = HEADROOM * total_bytes

    def estimate(plan: str) -> float:
        return state + unit * sum(ACTIVATION_BYTES[p] for p in plan_policies(plan, blocks))

    estimates = {plan: estimate(plan) / gib for plan in PLANS}
    candidates = [plan for plan in PLANS if estimate(plan) <= budget]
    for cheap, expensive in PAIRS:
        # the largest k whose estimate fits: each block moved from `expensive` to `cheap` adds unit * difference
        room = budget - estimate(expensive)
        per_block = unit * (ACTIVATION_BYTES[cheap] - ACTIVATION_BYTES[expensive])
        if room < 0 or per_block <= 0:
            continue
        k = min(blocks, math.floor(room / per_block))
        while k > 0 and estimate(f"{cheap}+{expensive}:{k}") > budget:  # float rounding at the boundary
            k -= 1
        if 0 < k < blocks:  # k = 0 or all: the pure plan, already a candidate
            plan = f"{cheap}+{expensive}:{k}"
            candidates.append(plan)
            estimates[plan] = estimate(plan) / gib
    if not candidates:
        log.warning("train.grad_checkpointing=auto: no plan fits (full: %.1f GiB estimated, %.1f usable); using "
                    "full", estimates["full"], budget / gib)
        return PlanChoice("full", f"nothing fits ({estimates['full']:.1f} GiB estimated for full, "
                          f"{budget / gib:.1f} usable)", estimates)
    costs = {plan: recompute_cost(plan, blocks) for plan in candidates}
    best = min(candidates, key=lambda plan: costs[plan])  # ties: the earlier (pure plans first)
    others = ", ".join(f"{plan} {costs[plan]:.1f}" for plan in candidates if plan != best)
    reason = (f"estimated peak {estimates[best]:.1f} GiB of {budget / gib:.1f} usable; modelled recompute "
              f"{costs[best]:.1f} block forwards per grad forward" + (f" (fitting too: {others})" if others else ""))
    return PlanChoice(best, reason, estimates)


__all__ = ["choose_plan", "choose_plan_from", "parse_plan", "plan_policies", "recompute_cost", "PlanChoice", "PLANS",
           "RECOMPUTE", "PAIRS", "ACTIVATION_BYTES", "model_state_bytes", "activation_shape"]
