"""Training the digits teacher: flow matching with label dropout (for CFG), AdamW, EMA.

`cdm-train train-teacher` calls `train_teacher`. The checkpoint shipped in
cdm_train/assets/digits_teacher.pt was produced with the defaults below (see docs/demo.md).
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import torch

from cdm_kernels import flow_matching_loss, renoise

from .data import NULL_CLASS, load_digits_split
from .model import DEFAULT_TEACHER_PATH, DigitsTransformer, build_digits_model, save_checkpoint

TEACHER_STEPS = 4000
TEACHER_BATCH = 128
TEACHER_LR = 1e-3
TEACHER_EMA = 0.999
LABEL_DROPOUT = 0.1


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def train_teacher(out_path: str | os.PathLike | None, steps: int = TEACHER_STEPS, seed: int = 0,
                  progress: bool = True, batch_size: int = TEACHER_BATCH, lr: float = TEACHER_LR,
                  ema_decay: float = TEACHER_EMA, label_dropout: float = LABEL_DROPOUT,
                  device: str | torch.device = "cpu", num_threads: int | None = 1) -> DigitsTransformer:
    """Train a digits teacher from scratch on the training split; returns the EMA model (eval mode).

    The checkpoint (EMA weights, fp32) is written atomically to `out_path` (None: the package's
    default path, cdm_train/assets/digits_teacher.pt, i.e. the cached teacher `load_teacher()` reads).
    Deterministic in `seed` for a fixed torch build and thread count. num_threads: torch CPU threads while
    training (restored after; None: leave as is); 1 by default because the shipped teacher was trained with
    one thread (so the defaults reproduce it) and this tiny model gains nothing from more.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train_teacher(out_path, steps, seed, progress, batch_size, lr, ema_decay, label_dropout, device)
    finally:
        torch.set_num_threads(previous)


def _train_teacher(out_path, steps, seed, progress, batch_size, lr, ema_decay, label_dropout, device
                   ) -> DigitsTransformer:
    from tqdm.auto import tqdm

    device = torch.device(device)
    split = load_digits_split()
    images, labels = split.train_images.to(device), split.train_labels.to(device)
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    model = build_digits_model(seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))
    # Linear warm-up, then cosine decay to 10% of lr.
    def lr_factor(k: int) -> float:
        return min(1.0, (k + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, k / max(1, steps)))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="teacher", disable=not progress, dynamic_ncols=True)
    running = None
    for step in bar:
        idx = torch.randint(n, (batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx].clone()
        drop = torch.rand(batch_size, generator=gen).to(device) < label_dropout
        y[drop] = NULL_CLASS
        sigma = torch.rand(batch_size, generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        xt = renoise(x0, sigma, noise)
        v = model(xt, sigma * 1000.0, y)
        loss = flow_matching_loss(v, x0, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA warm-up: early weights are not averaged in with the full decay.
        _ema_update(ema, model, min(ema_decay, (1.0 + step) / (10.0 + step)))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
    meta = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
            "label_dropout": label_dropout, "final_loss": running, "train_seconds": time.perf_counter() - start,
            "torch": str(torch.__version__)}
    save_checkpoint(ema, Path(out_path) if out_path is not None else DEFAULT_TEACHER_PATH, meta)
    return ema.float().eval()


def main(argv: list[str] | None = None) -> None:
    """`python -m cdm_train.digits --out PATH` (what `cdm-train train-teacher` runs)."""
    import argparse

    parser = argparse.ArgumentParser(description="Train the digits teacher (flow matching, CFG label dropout)")
    parser.add_argument("--out", default=None, help="checkpoint path (default: the package's shipped checkpoint)")
    parser.add_argument("--steps", type=int, default=TEACHER_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as for the ship)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else DEFAULT_TEACHER_PATH
    train_teacher(out, steps=args.steps, seed=args.seed, progress=not args.no_progress, num_threads=args.threads)
    print(f"wrote {out}")
