"""The transformer blocks a network runs (for checkpointing, compile and the memory plan)."""

from __future__ import annotations

import torch

from cdm_kernels.graphs import find_blocks


def network_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks a network runs, also when it is a LoRA view on a shared base (lora.AdapterView,
    whose base is not a registered submodule)."""
    base = getattr(net, "peft_model", None)
    return find_blocks(base if base is not None else net)
