"""Activation checkpointing of transformer blocks, placed so that `torch.compile` sees it.

``checkpoint_blocks(blocks, "full" | "selective")`` makes every block recompute its activations in
backward; ``checkpoint_blocks(blocks, ["selective"] * k + ["full"] * (len(blocks) - k))`` gives each block its
own policy (the mixed plans of ``train.grad_checkpointing``, as torchtitan checkpoints only some layers).
It is installed *inside* each block (the block's class is swapped for a subclass whose ``forward`` runs
the original under ``torch.utils.checkpoint``), not around the call as diffusers'
``enable_gradient_checkpointing`` does, for three reasons:

- a regionally compiled block (regional.py) then traces the checkpoint too, so inductor plans the
  recomputation and fuses it like any other code (torchtitan's order: checkpointing, then compile,
  then ``fully_shard``);
- the module tree, parameter names and state_dict keys do not change (no wrapper module), so
  checkpoints, EMA, the fake <- student merge and LoRA exports are unaffected;
- a deep copy keeps the behaviour (the class travels with the instance).

Policies:

- ``full``: keep only the block's inputs; recompute everything in backward (the official CDM setting:
  ``gradient_checkpointing = True`` for student and fake teacher). Costs one extra block forward.
- ``selective``: keep the outputs of matmuls and attention, recompute the elementwise / norm /
  activation ops (cheap in FLOPs, heavy in memory): torch's selective activation checkpointing. Saves
  most of the memory of the elementwise intermediates for a small fraction of the recompute cost.

Calls without gradient (the rollout, the teachers' scoring) run the block unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("none", "full", "selective")

# Ops whose outputs selective checkpointing keeps: the FLOP-heavy ones (a recompute would cost a GEMM
# or an attention) and nothing else.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.linear.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_mm.default,
}

_SUBCLASSES: dict[type, type] = {}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _context_fn():
    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpointed_subclass(cls: type) -> type:
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    # The plain function, not `cls.forward` looked up at call time: dynamo cannot trace an attribute call
    # on some model classes (a graph break inside the compiled block).
    original = cls.forward

    def forward(self, *args, **kwargs):
        policy = self._cdm_checkpoint
        if policy == "none" or not torch.is_grad_enabled():
            return original(self, *args, **kwargs)
        run = functools.partial(original, self)
        if policy == "selective":
            return checkpoint(run, *args, use_reentrant=False, context_fn=_context_fn, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "_cdm_checkpointed_base": cls})
    _SUBCLASSES[cls] = sub
    return sub


def checkpoint_blocks(blocks, policy) -> int:
    """Install activation checkpointing `policy` ("none" | "full" | "selective") in every module of `blocks`,
    in place; returns how many blocks it applies to. "none" removes a previously installed policy.

    `policy` may also be a sequence with one policy per block (a mixed plan: e.g. the first k blocks
    selective, the rest full). Each block carries its own policy, so nothing else changes; all policies
    are validated before any block is touched."""
    blocks = list(blocks)
    policies = [policy] * len(blocks) if isinstance(policy, str) else list(policy)
    if len(policies) != len(blocks):
        raise ValueError(f"policy: {len(policies)} policies for {len(blocks)} blocks")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)}, got {p!r}")
    count = 0
    for block, p in zip(blocks, policies):
        if not isinstance(block, torch.nn.Module):
            raise ValueError(f"blocks: expected nn.Module items, got {type(block).__name__}")
        base = getattr(type(block), "_cdm_checkpointed_base", None)
        if p == "none":
            if base is not None:
                block.__class__ = base
                del block._cdm_checkpoint
            continue
        if base is None:
            block.__class__ = _checkpointed_subclass(type(block))
        block._cdm_checkpoint = p
        count += 1
    return count


def checkpoint_policy(block: torch.nn.Module) -> str:
    """The policy installed in `block` ("none" when none is)."""
    return getattr(block, "_cdm_checkpoint", "none")


__all__ = ["checkpoint_blocks", "checkpoint_policy", "POLICIES"]
