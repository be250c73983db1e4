"""Regional torch.compile: compile each transformer block in place, not the whole model.

Compiling the repeated block once (every block shares the same code, so dynamo reuses
the compiled graph across blocks after the first) costs a fraction of a whole-model
compile, keeps the module tree, parameter names and state_dict keys unchanged
(``nn.Module.compile`` compiles the module's call in place), and leaves the parts that
change between model families (embeddings, norm-out, adapters) eager.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("cdm_kernels.graphs")

BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


def find_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: children of ModuleLists named like BLOCK_LIST_NAMES, anywhere in the model."""
    blocks: list[torch.nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            blocks.extend(module)
    return blocks


def compile_blocks(model, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None, options: dict[str, Any] | None = None,
                   recompile_limit: int | None = None) -> int:
    """Compile every transformer block of `model` (a module, or an iterable of blocks) in place; returns how
    many were compiled. Blocks already compiled are left as they are (a block shared by several networks,
    e.g. a LoRA base, is compiled once).

    Compilation itself happens lazily at the first call of each block (per grad mode and,
    with dynamic=None, once more when a second batch size makes the batch dim dynamic).
    Every block of one class shares one code object, so all of them share dynamo's cache and its
    recompile limit (8 by default): `recompile_limit` raises it (never lowers it) for the networks x grad
    modes x shapes a training run needs; past the limit dynamo would silently run the block eagerly.
    """
    blocks = find_blocks(model) if isinstance(model, torch.nn.Module) else list(model)
    if not blocks:
        name = type(model).__name__
        log.info("regional compile: no transformer blocks found in %s; left eager", name)
        return 0
    if recompile_limit is not None:
        raise_recompile_limit(recompile_limit)
    n = 0
    for block in blocks:
        if not is_compiled(block):
            block.compile(backend=backend, mode=mode, dynamic=dynamic, options=options)
            n += 1
    return n


def raise_recompile_limit(n: int) -> None:
    """dynamo's per-code-object recompile limit to at least `n` (its name changed across torch versions)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < n:
        setattr(cfg, name, n)


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
