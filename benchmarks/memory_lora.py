"""Computed (not measured) memory per GPU of full vs LoRA fake teacher vs LoRA student: SD3-Medium, Flux-dev,
LongCat-Image.

    python benchmarks/memory_lora.py [--batch 4] [--rank 64] [--markdown FILE]

Parameter counts come from the real architectures on the meta device, the LoRA adapter size from
peft itself (rank `--rank`, the official SD3 attention + FFN targets). State bytes per mode:

- full + full: student and fake teacher fp32 params + grads + AdamW m, v (16 B each), EMA fp32 (4 B),
  frozen teacher bf16 (2 B): 38 P.
- full student + LoRA fake: 16 P (student) + 4 P (EMA) + 2 P (the teacher, also the fake's base)
  + 16 A (fake adapter): 22 P + 16 A.
- LoRA + LoRA: 2 P (one bf16 base for all three) + 16 A (student) + 4 A (EMA) + 16 A (fake): 2 P + 36 A.

Activations: the student step's forwards with gradient (2 in fast mode), the estimate of
memory_distributed.py (34 bytes per token, hidden unit and block in bf16, no checkpointing); a LoRA
student keeps the same activations (its base's inputs are still needed for the adapters' backward).
Per GPU, for one process or `train.parallel: ddp` (same per-rank state); FSDP2 is refused with LoRA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_distributed import ACT_BYTES_PER_TOKEN_HIDDEN, GiB  # noqa: E402

GRAD_FORWARDS = 2


def counts(model_name: str, resolution: int, rank: int) -> dict[str, int]:
    from peft import LoraConfig, get_peft_model

    from cdm_train.models.flux import FLUX_DEV_ARCH, FLUX_TEXT_TOKENS
    from cdm_train.models.sd3 import SD3_FF_TARGETS, SD3_MEDIUM_ARCH, SD3_TARGETS, SD3_TEXT_TOKENS

    with torch.device("meta"):
        if model_name == "SD3-Medium":
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel(**dict(SD3_MEDIUM_ARCH, sample_size=resolution // 8))
            side = resolution // 8 // 2
            tokens, blocks = side * side + SD3_TEXT_TOKENS, SD3_MEDIUM_ARCH["num_layers"]
            hidden = SD3_MEDIUM_ARCH["num_attention_heads"] * SD3_MEDIUM_ARCH["attention_head_dim"]
        elif model_name == "LongCat-Image":
            from diffusers import LongCatImageTransformer2DModel

            from cdm_train.models.longcat import LONGCAT_ARCH, LONGCAT_FF_TARGETS, LONGCAT_TARGETS, LONGCAT_TEXT_TOKENS

            model = LongCatImageTransformer2DModel(**LONGCAT_ARCH)
            side = resolution // 16
            tokens = side * side + LONGCAT_TEXT_TOKENS
            blocks = LONGCAT_ARCH["num_layers"] + LONGCAT_ARCH["num_single_layers"]
            hidden = LONGCAT_ARCH["num_attention_heads"] * LONGCAT_ARCH["attention_head_dim"]
            targets = LONGCAT_TARGETS + LONGCAT_FF_TARGETS
        else:
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel(**FLUX_DEV_ARCH)
            side = resolution // 16
            tokens = side * side + FLUX_TEXT_TOKENS
            blocks = FLUX_DEV_ARCH["num_layers"] + FLUX_DEV_ARCH["num_single_layers"]
            hidden = FLUX_DEV_ARCH["num_attention_heads"] * FLUX_DEV_ARCH["attention_head_dim"]
        if model_name != "LongCat-Image":
            targets = SD3_TARGETS + SD3_FF_TARGETS
        params = sum(p.numel() for p in model.parameters())
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        adapter = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return {"params": params, "adapter": adapter, "tokens": tokens, "blocks": blocks, "hidden": hidden}


def table(batch: int, rank: int) -> list[str]:
    lines = [f"Computed, not measured. 1024 px, batch {batch} per GPU, LoRA rank {rank} (alpha {2 * rank}) on the "
             f"attention + FFN linears, fast mode (2 forwards with gradient), no gradient checkpointing, one process "
             f"per GPU.", "",
             "| model | params P | adapter A | mode | states GiB | activations GiB | **total GiB / GPU** |",
             "|---|---|---|---|---|---|---|"]
    for name in ("SD3-Medium", "Flux-dev", "LongCat-Image"):
        c = counts(name, 1024, rank)
        p, a = c["params"], c["adapter"]
        act = GRAD_FORWARDS * batch * c["blocks"] * ACT_BYTES_PER_TOKEN_HIDDEN * c["tokens"] * c["hidden"]
        for mode, states in (("full student + full fake", 38 * p), ("full student + LoRA fake", 22 * p + 16 * a),
                             ("LoRA student + LoRA fake", 2 * p + 36 * a)):
            lines.append(f"| {name} | {p / 1e9:.2f} B | {a / 1e6:.0f} M | {mode} | {states / GiB:.1f} | "
                         f"{act / GiB:.1f} | **{(states + act) / GiB:.1f}** |")
    return lines


def measure_tiny(steps: int = 2) -> list[str]:
    """Tensor bytes a tiny-preset trainer actually holds (params incl. the shared base, grads, AdamW states,
    EMA), per mode, against the formula with the CPU's fp32 teacher (4 P instead of 2 P)."""
    import tempfile

    from cdm_train.config import make_config
    from cdm_train.trainer import Trainer

    modes = (("full student + full fake", []), ("full student + LoRA fake", ["lora.fake=true",
                                                                             "optim.fake_merge_decay=1.0"]),
             ("LoRA student + LoRA fake", ["lora.student=true", "lora.fake=true"]))
    lines = ["| mode (tiny preset, CPU, fp32 teacher, between steps) | P | A | measured tensor bytes | "
             "formula bytes | ratio |",
             "|---|---|---|---|---|---|"]
    for label, extra in modes:
        cfg = make_config("tiny", overrides=[f"train.out_dir={tempfile.mkdtemp()}", "train.progress=false",
                                             "train.tensorboard=false", "lora.rank=4", "lora.alpha=8", *extra])
        tr = Trainer(cfg)
        tr.train(steps=steps)
        m = tr.models
        storages: dict[int, int] = {}

        def add(t, storages=storages):
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        base = getattr(m.teacher, "peft_model", m.teacher)
        for net in (m.student, m.fake, base, tr.ema.module):
            for p in net.parameters():
                add(p)
                add(p.grad)
        for opt in (tr.student_opt, tr.fake_opt):
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor) and v.numel() > 1:
                        add(v)
        lora_a = sum(p.numel() for n, p in m.student.named_parameters() if "lora_" in n) if cfg.lora.student else \
            sum(p.numel() for n, p in m.fake.named_parameters() if "lora_" in n)
        p_full = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
        # Between steps the gradients are freed (zero_grad(set_to_none)): 12 B per trainable parameter
        # (fp32 param + Adam m, v) instead of the in-step 16; the frozen teacher is fp32 on the CPU.
        formula = {"full student + full fake": 32 * p_full, "full student + LoRA fake": 20 * p_full + 12 * lora_a,
                   "LoRA student + LoRA fake": 4 * p_full + 28 * lora_a}[label]
        total = sum(storages.values())
        lines.append(f"| {label} | {p_full} | {lora_a} | {total} | {formula} | {total / formula:.3f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--measure-tiny", action="store_true",
                    help="also measure the tensor bytes of tiny-preset trainers on this machine against the formula")
    args = ap.parse_args(argv)
    lines = table(args.batch, args.rank)
    if args.measure_tiny:
        lines += ["", *measure_tiny()]
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
