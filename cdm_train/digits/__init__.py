"""Embedded default: a class-conditional SD3-architecture teacher on sklearn's handwritten digits.

See docs/demo.md. Public API:

- constants ``NUM_CLASSES`` (10), ``NULL_CLASS`` (10, the CFG null label), ``LATENT_SHAPE`` ((1, 8, 8));
- ``load_digits_split()`` -> train / held-out images in [-1, 1] and labels;
- ``build_digits_model(seed=0)`` (random init), ``load_teacher(path=None)`` (None: shipped checkpoint),
  ``train_teacher(out_path, steps=..., seed=..., progress=True)``;
- ``class_sampler(batch, generator, device)`` -> balanced labels.
"""

from .data import (
    HELDOUT_SIZE,
    LATENT_SHAPE,
    NULL_CLASS,
    NUM_CLASSES,
    SPLIT_SEED,
    DigitsSplit,
    balanced_labels,
    class_sampler,
    images_to_pixels,
    load_digits_split,
    pixels_to_images,
)
from .model import (
    DEFAULT_ARCH,
    DEFAULT_TEACHER_PATH,
    DigitsTransformer,
    build_digits_model,
    load_checkpoint,
    load_teacher,
    save_checkpoint,
)
from .train import train_teacher

__all__ = [
    "HELDOUT_SIZE", "LATENT_SHAPE", "NULL_CLASS", "NUM_CLASSES", "SPLIT_SEED", "DigitsSplit", "balanced_labels",
    "class_sampler", "images_to_pixels", "load_digits_split", "pixels_to_images", "DEFAULT_ARCH",
    "DEFAULT_TEACHER_PATH", "DigitsTransformer", "build_digits_model", "load_checkpoint", "load_teacher",
    "save_checkpoint", "train_teacher",
]
