"""Every model-level acceleration, applied in one place, once, in a fixed order.

`apply_accelerations` is the only place where the trainer changes its networks for speed or memory
(as torchtitan's ``parallelize.py``). The order is fixed because each step must see what the previous
ones did, and no later step may undo an earlier one:

1. **Attention** (attention_setup.py): the exact backend of every pass (`speed.attention_backend`: cuDNN / flash
   / ...) and 8-bit processors for the passes without gradient (`speed.fp8_attention_*`, where they measured
   faster). First, so that the compiled blocks (step 4) trace the attention that will actually run.
2. **FP8 linears** (`speed.fp8_linear_teacher`): the frozen teacher's linears become torchao float8
   row-wise layers (or their PyTorch emulation, `speed.fp8_linear_emulate`). Before compile, so that the
   activation quantisation fuses into the previous op inside the compiled block (uncompiled, FP8 linears
   are slower than bf16).
3. **Activation checkpointing** (`train.grad_checkpointing`: auto | none | full | selective | a mixed plan such
   as selective+full:12; auto: the fastest plan that fits the GPU, memory_plan.py) of the student's and fake
   teacher's blocks, installed inside each block (cdm_kernels.graphs.checkpointing), so that
4. **Regional compile** (`speed.compile_blocks`) of every network's transformer blocks traces the
   checkpoint too and plans the recomputation (torchtitan: checkpointing, then compile, then sharding).
5. **DDP / FSDP2** (`train.parallel`): wraps or shards the networks whose blocks are now final.
6. **CUDA graphs** of the no-grad passes (`speed.cuda_graphs_teacher`, `speed.rollout_graphs`): last,
   because a graph captures whatever the calls above have become.

Optimizers are built after this (on the wrapped parameters); the fused AdamW is chosen in trainer.py.
Every step returns what it did; the trainer logs it as one block ("accelerations: ...").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cdm_kernels.graphs import checkpoint_blocks, compile_blocks

from .blocks import network_blocks
from .errors import ConfigError
from .graphs import RECOMPILE_LIMIT, apply_graph_switches

if TYPE_CHECKING:
    from .config import Config
    from .distributed import Parallel
    from .ema import EMA
    from .models.build import Models

log = logging.getLogger("cdm_train")

ORDER = ("attention", "fp8 linears", "checkpointing", "compile", "ddp/fsdp", "graphs")


@dataclass
class Applied:
    """What apply_accelerations did, step by step (for the log and for tests)."""

    steps: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in ORDER})
    # the activation-checkpointing plan in force (train.grad_checkpointing=auto resolved): a policy name or a mixed
    # plan such as "selective+full:16"
    checkpointing: str = "none"

    def add(self, step: str, line: str) -> None:
        self.steps[step].append(line)

    def lines(self) -> list[str]:
        return [f"{i}. {name}: " + ("; ".join(done) if done else "-") for i, (name, done) in
                enumerate(self.steps.items(), 1)]


def apply_attention(cfg: Config, models: Models, applied: Applied) -> None:
    from .attention_setup import apply_attention as install

    for line in install(cfg, models):
        applied.add("attention", line)


def apply_fp8_linears(cfg: Config, models: Models, applied: Applied) -> None:
    sp = cfg.speed
    if not sp.fp8_linear_teacher:
        return
    from cdm_kernels import fp8

    if sp.fp8_linear_emulate:
        report = fp8.emulate_fp8_linears(models.teacher)
    else:
        report = fp8.quantize_frozen(models.teacher)
    applied.add("fp8 linears", f"teacher: {report.summary()}")


def apply_checkpointing(cfg: Config, models: Models, applied: Applied, *, ema: EMA | None = None,
                        parallel: Parallel | None = None, device: torch.device | None = None) -> None:
    policy = cfg.train.grad_checkpointing
    if policy == "auto":
        from .memory_plan import choose_plan

        world = parallel.world_size if parallel is not None and parallel.enabled else 1
        sharded = parallel is not None and parallel.mode == "fsdp"
        choice = choose_plan(models, ema, device or torch.device("cpu"), cfg.train.batch_size, world=world,
                             sharded=sharded)
        policy = choice.plan
        applied.add("checkpointing", f"auto -> {policy} ({choice.reason})")
    applied.checkpointing = policy
    if policy == "none":
        return
    from .memory_plan import parse_plan, plan_policies

    for name, net in (("student", models.student), ("fake", models.fake)):
        blocks = network_blocks(net)
        if not blocks:
            raise ConfigError(f"train.grad_checkpointing: {type(net).__name__} ({name}) has no transformer blocks "
                              "to checkpoint")
        try:
            policies = plan_policies(policy, len(blocks))
        except ValueError as exc:  # a mixed plan's k beyond this network's depth
            raise ConfigError(f"train.grad_checkpointing: {exc}") from None
        n = checkpoint_blocks(blocks, policies)
        mixed = parse_plan(policy)
        if mixed is None:
            applied.add("checkpointing", f"{name}: {policy} ({n} blocks)")
        else:
            cheap, expensive, k = mixed
            applied.add("checkpointing", f"{name}: {policy} (blocks 0-{k - 1} {cheap}, {k}-{len(blocks) - 1} "
                        f"{expensive}, of {len(blocks)})" if 0 < k < len(blocks) else
                        f"{name}: {policy} (all {len(blocks)} blocks {cheap if k else expensive})")


def apply_compile(cfg: Config, models: Models, ema: EMA | None, applied: Applied) -> None:
    sp = cfg.speed
    if not sp.compile_blocks:
        return
    nets = [("student", models.student), ("fake", models.fake), ("teacher", models.teacher)]
    if ema is not None:
        nets.append(("ema", ema.module))
    for name, net in nets:
        blocks = network_blocks(net)
        if not blocks:
            applied.add("compile", f"{name}: no transformer blocks, eager")
            continue
        # dynamic=None: the first batch size compiles static, a second one marks the batch dim dynamic
        # (the early-exit rollout changes it every step): at most one recompile per (network, grad mode).
        # Blocks already compiled (a LoRA base shared with a network above) are left as they are.
        n = compile_blocks(blocks, backend=sp.compile_backend, recompile_limit=RECOMPILE_LIMIT)
        applied.add("compile", f"{name}: {n} blocks ({sp.compile_backend})" if n else
                    f"{name}: its blocks are shared with a network above, compiled once")


def compile_for_sampling(cfg: Config, model: torch.nn.Module, device: torch.device) -> int:
    """The EMA / student sampler of `cdm-train eval` (thousands of samples): its blocks compiled as in training
    when the run had speed.compile_blocks, on CUDA only (a few CPU samples would not repay inductor's compile
    time). Returns how many blocks were compiled."""
    if not cfg.speed.compile_blocks or device.type != "cuda":
        return 0
    return compile_blocks(network_blocks(model), backend=cfg.speed.compile_backend, recompile_limit=RECOMPILE_LIMIT)


def apply_accelerations(cfg: Config, models: Models, ema: EMA | None, parallel: Parallel,
                        device: torch.device) -> Applied:
    """Apply every model-level acceleration of `cfg` to `models` in place, in the order of ORDER (see the
    module docstring). Call once, after the EMA copy is taken and before the optimizers are built."""
    applied = Applied()
    apply_attention(cfg, models, applied)
    apply_fp8_linears(cfg, models, applied)
    apply_checkpointing(cfg, models, applied, ema=ema, parallel=parallel, device=device)
    apply_compile(cfg, models, ema, applied)
    if parallel.enabled:
        parallel.wrap(cfg, models, ema, device)
        applied.add("ddp/fsdp", f"{parallel.mode} over {parallel.world_size} ranks")
    wrapper = apply_graph_switches(cfg, models)
    if wrapper is not None:
        applied.add("graphs", ", ".join(getattr(fn, "name", type(fn).__name__) for _, fn in wrapper._routes))
    for line in applied.lines():
        log.info("accelerations %s", line)
    return applied


__all__ = ["apply_accelerations", "compile_for_sampling", "Applied", "ORDER", "network_blocks", "RECOMPILE_LIMIT"]
