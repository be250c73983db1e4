"""The sklearn handwritten digits (1,797 8x8 images, 10 classes) as flow-matching data.

Pixels (integers 0..16) are scaled to [-1, 1] and kept as one 8x8 channel. A fixed,
class-stratified split (seed SPLIT_SEED) holds out HELDOUT_SIZE images: the teacher and
the evaluation classifier only ever see the training split; Frechet distances compare
generated samples with the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_CLASSES = 10
NULL_CLASS = 10  # the extra "no class" label used for CFG dropout and as the unconditional input
LATENT_SHAPE = (1, 8, 8)
SPLIT_SEED = 0
HELDOUT_SIZE = 600
PIXEL_MAX = 16.0


@dataclass(frozen=True)
class DigitsSplit:
    train_images: torch.Tensor  # (N, 1, 8, 8) float32 in [-1, 1]
    train_labels: torch.Tensor  # (N,) int64 in [0, 10)
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def pixels_to_images(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, 64) or (N, 8, 8) pixel values in [0, 16] -> (N, 1, 8, 8) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(pixels), dtype=torch.float32).reshape(-1, *LATENT_SHAPE)
    return x * (2.0 / PIXEL_MAX) - 1.0


def images_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Inverse of pixels_to_images, clamped to [0, 16] (float)."""
    return ((images.float() + 1.0) * (PIXEL_MAX / 2.0)).clamp(0.0, PIXEL_MAX)


def load_digits_split(seed: int = SPLIT_SEED, heldout_size: int = HELDOUT_SIZE) -> DigitsSplit:
    """Train / held-out split of sklearn's digits, stratified by class, deterministic in `seed`."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is a declared demo/dev dependency
        raise ImportError("the digits demo needs scikit-learn: pip install 'cdm-kernels[demo]'") from exc
    data = load_digits()
    idx = np.arange(len(data.target))
    train_idx, held_idx = train_test_split(idx, test_size=heldout_size, random_state=seed, stratify=data.target)
    train_idx, held_idx = np.sort(train_idx), np.sort(held_idx)
    images = pixels_to_images(data.images)
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    return DigitsSplit(images[train_idx], labels[train_idx], images[held_idx], labels[held_idx])


def class_sampler(batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    """(batch,) int64 labels on `device`, balanced: every class appears floor or ceil(batch / 10) times,
    the surplus classes and the order drawn from `generator` (a host generator)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offset = torch.randint(NUM_CLASSES, (1,), generator=generator, device=gen_device)
    labels = (torch.arange(batch, device=gen_device) + offset) % NUM_CLASSES
    labels = labels[torch.randperm(batch, generator=generator, device=gen_device)]
    return labels.to(device)


def balanced_labels(per_class: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[0]*per_class + [1]*per_class + ... + [9]*per_class (for evaluation)."""
    return torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
