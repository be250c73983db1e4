"""What regional compile does to a transformer block's non-matmul traffic (CPU, no GPU needed).

For one block of each model family at its real width (SD3-Medium, Flux-dev double and single, LongCat-Image double
and single), in bf16, per activation-checkpointing policy (none / selective / full) and pass (no-grad forward,
forward + backward with gradient), this measures

- eager: the bytes (inputs read once + outputs written once) and the count of every op that launches a kernel and
  is not a matmul or attention (the cost model's "elementwise / reduction / optimizer" kind), from a dispatch mode;
- compiled: the same for inductor's generated kernels (scheduler nodes that are not extern calls: their
  read + write buffer sizes, as `torch._inductor.metrics` counts them) of the compiled block's forward and
  backward graphs.

The ratio compiled / eager is what benchmarks/cost_model.py applies to the modelled iteration's elementwise time
and launches inside compiled blocks (`speed.compile_blocks`). Inductor's CPU scheduler stands in for its GPU
(Triton) scheduler: both fuse the same pointwise / reduction chains, but the GPU one may split or merge a few
kernels differently; the ratio is a model input, not a measurement of GPU time.

Bytes are linear in the token count, so a short sequence (256 image tokens + the family's text tokens, batch 1)
gives the ratio of the 1024 px shape at a fraction of the CPU time.

    .venv/bin/python benchmarks/compiled_block_traffic.py --out benchmarks/compiled_block_traffic.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_blocks import FAMILIES, _inputs, capture_blocks  # noqa: E402
from cost_model import ATTENTION, MATMUL, NO_KERNEL, _nbytes, _tensors  # noqa: E402

POLICIES = ("none", "selective", "full")
PASSES = ("no_grad", "grad")


class EagerTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes and count of the non-matmul, non-attention ops that launch a kernel (cost_model's definitions)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.matmul_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name in NO_KERNEL or name in ATTENTION or "scaled_dot_product" in name:
            return out
        if name in MATMUL:
            from torch.utils.flop_counter import flop_registry

            packet = func.overloadpacket
            if packet in flop_registry:
                self.matmul_flops += flop_registry[packet](*args, **kwargs, out_val=out)
            return out
        self.bytes += sum(_nbytes(t) for t in _tensors((args, kwargs))) + sum(_nbytes(t) for t in _tensors(out))
        self.ops += 1
        return out


@contextlib.contextmanager
def compiled_traffic(record: dict):
    """Sum the generated (non-extern) kernels' read+write bytes and count over every graph inductor compiles."""
    from torch._inductor.graph import GraphLowering

    original = GraphLowering.compile_to_module

    def wrapped(self, *a, **k):
        mod = original(self, *a, **k)
        for node in self.scheduler.nodes:
            if node.is_extern():
                continue
            record["bytes"] += node.get_read_write_buffers_sizes()
            record["kernels"] += 1
        return mod

    GraphLowering.compile_to_module = wrapped
    try:
        yield
    finally:
        GraphLowering.compile_to_module = original


def block_inputs(family: str, image_tokens_side: int):
    """{block kind: (block, args, kwargs)} captured from one call of the family's model (bf16, batch 1)."""
    # latent = resolution / 8, then 2x2 patches (SD3) or packing (Flux): image_tokens_side^2 image tokens
    return capture_blocks(family, torch.device("cpu"), 1, image_tokens_side * 16, False, dtype=torch.bfloat16)


def run_pass(block, args, kwargs, pass_: str, compiled: bool):
    torch.manual_seed(0)
    args, kwargs = _inputs(args, kwargs, pass_ == "grad")
    block.requires_grad_(pass_ == "grad")
    block.zero_grad(set_to_none=True)  # a gradient left by an earlier run would add an accumulation pass
    fn = torch.compile(block, backend="inductor") if compiled else block
    ctx = torch.no_grad() if pass_ == "no_grad" else contextlib.nullcontext()
    with ctx:
        out = fn(*args, **kwargs)
    if pass_ == "grad":
        outs = [t for t in _tensors(out) if t.requires_grad]
        torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])


def measure(block, args, kwargs, policy: str, pass_: str) -> dict:
    from cdm_kernels.graphs import checkpoint_blocks

    checkpoint_blocks([block], policy)
    eager = EagerTraffic()
    with eager:
        run_pass(block, args, kwargs, pass_, compiled=False)
    torch._dynamo.reset()
    record = {"bytes": 0, "kernels": 0}
    with compiled_traffic(record):
        run_pass(block, args, kwargs, pass_, compiled=True)
    checkpoint_blocks([block], "none")
    return {"eager_bytes": eager.bytes, "eager_ops": eager.ops, "matmul_gflop": eager.matmul_flops / 1e9,
            "compiled_bytes": record["bytes"], "compiled_kernels": record["kernels"],
            "bytes_ratio": record["bytes"] / max(1, eager.bytes), "launch_ratio": record["kernels"] / max(1, eager.ops)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--side", type=int, default=16, help="image tokens per side (default 16: 256 image tokens)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--out", default=None, help="write the table as JSON")
    args = p.parse_args(argv)
    cache = tempfile.mkdtemp(prefix="cdm-block-traffic-")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
    torch._dynamo.config.recompile_limit = 64
    # Every compile must really run the scheduler: a cache hit (LongCat's blocks trace to Flux's graphs) would
    # skip GraphLowering and count nothing.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    rows = {}
    try:
        for family in args.families:
            for key, (block, a, k) in block_inputs(family, args.side).items():
                rows[key] = {}
                for policy in args.policies:
                    for pass_ in PASSES:
                        if pass_ == "no_grad" and policy != "none":
                            continue  # checkpointing changes nothing without gradient
                        r = measure(block, a, k, policy, pass_)
                        rows[key][f"{policy}/{pass_}"] = r
                        print(f"{key:40s} {policy:9s} {pass_:7s} eager {r['eager_bytes'] / 1e6:8.1f} MB "
                              f"{r['eager_ops']:4d} ops -> compiled {r['compiled_bytes'] / 1e6:8.1f} MB "
                              f"{r['compiled_kernels']:4d} kernels  (bytes x{r['bytes_ratio']:.2f}, "
                              f"launches x{r['launch_ratio']:.2f})", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"date": str(datetime.date.today()), "torch": torch.__version__,
                                              "image_tokens": args.side ** 2, "blocks": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
