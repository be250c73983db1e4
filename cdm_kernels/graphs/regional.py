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


def compile_blocks(model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = None, options: dict[str, Any] | None = None) -> int:
    """Compile every transformer block of `model` in place; returns how many were compiled.

    Compilation itself happens lazily at the first call of each block (per grad mode and,
    with dynamic=None, once more when a second batch size makes the batch dim dynamic).
    """
    blocks = find_blocks(model)
    if not blocks:
        log.info("regional compile: no transformer blocks found in %s; left eager", type(model).__name__)
        return 0
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=dynamic, options=options)
    return len(blocks)


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
