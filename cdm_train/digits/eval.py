"""Quality evaluation on the digits data: classifier accuracy and Frechet distance (FD).

A small CNN classifier is trained on the digits *training* split (the split the teacher
sees). Generated samples are judged by

- ``class_accuracy``: the fraction of samples conditioned on class c that the classifier labels c;
- ``fd``: the Frechet distance between Gaussian fits of the classifier's penultimate
  features (64-d) of the generated samples and of the held-out real images.

``real_data_floor()`` is the same measurement between two disjoint sets of real images
(a class-balanced draw from the training split vs the held-out split) with the same
sample counts: the FD a perfect generator would reach. FD is biased upwards by finite
sample counts, so compare numbers taken with the same ``EVAL_PER_CLASS`` only.

The classifier shipped in cdm_train/assets/digits_classifier.pt was produced by
``train_classifier()`` with its defaults (`python -m cdm_train.digits.eval --retrain`) under torch's default thread
count (two threads on the 2-core machine that produced it; one thread gives slightly different weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluation.frechet import frechet_distance  # the package's one Frechet distance (also `cdm-train eval`)
from .data import NUM_CLASSES, DigitsSplit, balanced_labels, load_digits_split

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CLASSIFIER_PATH = ASSET_DIR / "digits_classifier.pt"
EVAL_PER_CLASS = 100  # 1,000 generated samples per evaluation (see docs/demo.md for the seed spread)
FEATURE_DIM = 64
# CFG scale for the teacher reference (teacher@50) and the teacher@4 baseline: with the shipped teacher,
# 1.5 keeps class accuracy ~1.0 at the best FD; larger scales trade diversity (FD) for nothing here.
EVAL_GUIDANCE_SCALE = 1.5
TEACHER_EVAL_STEPS = 50


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, a 64-d feature layer, a linear head."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float().clamp(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (background filled with -1)."""
    b = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    rows = dy[:, None] + torch.arange(8)[None, :]  # (b, 8)
    cols = dx[:, None] + torch.arange(8)[None, :]
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def train_classifier(split: DigitsSplit | None = None, epochs: int = 60, seed: int = 0, batch_size: int = 64,
                     lr: float = 2e-3, progress: bool = False) -> tuple[DigitClassifier, float]:
    """Train on the training split (shift augmentation); returns (model in eval mode, held-out accuracy)."""
    split = split or load_digits_split()
    with torch.random.fork_rng(devices=[]):  # init and dropout draw from the global RNG: seed it, then restore
        torch.manual_seed(seed)
        model = _fit_classifier(split, epochs, seed, batch_size, lr, progress)
    return model, classifier_accuracy(model, split.heldout_images, split.heldout_labels)


def _fit_classifier(split: DigitsSplit, epochs: int, seed: int, batch_size: int, lr: float,
                    progress: bool) -> DigitClassifier:
    from tqdm.auto import tqdm

    model = DigitClassifier()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    x, y = split.train_images, split.train_labels
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress, dynamic_ncols=True):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def _save_classifier(model: DigitClassifier, heldout_accuracy: float, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": "cdm-digits-classifier/1", "state_dict": model.state_dict(),
                    "heldout_accuracy": heldout_accuracy}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class DigitsEvaluator:
    """FD and class accuracy of generated digits against the held-out real digits."""

    def __init__(self, classifier: DigitClassifier, split: DigitsSplit | None = None):
        self.classifier = classifier.float().eval().requires_grad_(False)
        self.split = split or load_digits_split()
        self.classifier_heldout_accuracy = classifier_accuracy(self.classifier, self.split.heldout_images,
                                                               self.split.heldout_labels)
        self._heldout_feats = self.features(self.split.heldout_images)

    @classmethod
    def load_or_train(cls, path: str | os.PathLike | None = None, save: bool = True,
                      progress: bool = False) -> DigitsEvaluator:
        """Load the classifier from `path` (None: the one shipped in the package); train and save it if absent."""
        p = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
        split = load_digits_split()
        if p.is_file():
            payload = torch.load(p, map_location="cpu", weights_only=True)
            model = DigitClassifier()
            model.load_state_dict(payload["state_dict"])
        else:
            model, _ = train_classifier(split, progress=progress)
            if save:
                _save_classifier(model, classifier_accuracy(model, split.heldout_images, split.heldout_labels), p)
        return cls(model, split)

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 2000) -> np.ndarray:
        images = images.detach().float().cpu().reshape(-1, 1, 8, 8)
        return torch.cat([self.classifier.features(images[i:i + batch_size])
                          for i in range(0, images.shape[0], batch_size)]).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().float().cpu().reshape(-1, 1, 8, 8)
        return self.classifier(images).argmax(1)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """{"fd": FD to the held-out split, "class_accuracy": fraction classified as their conditioning class}."""
        labels = labels.detach().cpu().long()
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images: {images.shape[0]} samples but labels: {labels.shape[0]}")
        if not torch.isfinite(images).all():
            return {"fd": float("inf"), "class_accuracy": float((self.predict(
                torch.nan_to_num(images)) == labels).float().mean())}
        fd = frechet_distance(self.features(images), self._heldout_feats)
        acc = float((self.predict(images) == labels).float().mean())
        return {"fd": fd, "class_accuracy": acc}

    def real_data_floor(self, per_class: int = EVAL_PER_CLASS, seed: int = 0) -> dict[str, float]:
        """FD between a class-balanced draw of `per_class` training images per class and the held-out split
        (the generated-vs-held-out measurement with real images in place of samples), and the classifier's
        held-out accuracy as the class-accuracy reference."""
        gen = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(NUM_CLASSES):
            idx = torch.nonzero(self.split.train_labels == c).flatten()
            if per_class > idx.numel():
                raise ValueError(f"per_class: at most {idx.numel()} training images of class {c}")
            picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:per_class]])
        idx = torch.cat(picks)
        fd = frechet_distance(self.features(self.split.train_images[idx]), self._heldout_feats)
        return {"fd": fd, "class_accuracy": self.classifier_heldout_accuracy}


@torch.no_grad()
def generate(model: nn.Module, steps: int, guidance_scale: float | None, per_class: int = EVAL_PER_CLASS,
             seed: int = 0, adapter: Any = None, sigmas: list[float] | None = None, batch_size: int = 500,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "sampling"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced samples (per_class of each digit) by deterministic Euler; noise from `seed`.

    Returns (images (N, 1, 8, 8) on the CPU, labels (N,)). Same seed, same noise for every model,
    so teacher and student samples are paired.
    """
    from tqdm.auto import tqdm

    from ..models.class_label import ClassLabelAdapter
    from ..sampling import sample_euler
    from .data import LATENT_SHAPE, NULL_CLASS

    adapter = adapter or ClassLabelAdapter(NULL_CLASS)
    labels = balanced_labels(per_class)
    noise = torch.randn((labels.numel(), *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))
    out = []
    for start in tqdm(range(0, labels.numel(), batch_size), desc=desc, disable=not progress, dynamic_ncols=True,
                      leave=False):
        y, z = labels[start:start + batch_size].to(device), noise[start:start + batch_size].to(device)
        out.append(sample_euler(model, adapter, y, z, steps, guidance_scale=guidance_scale, sigmas=sigmas).cpu())
    return torch.cat(out), labels


def _main() -> None:  # pragma: no cover - regenerates the shipped classifier
    import argparse

    parser = argparse.ArgumentParser(description="Train (or load) the digits evaluation classifier")
    parser.add_argument("--retrain", action="store_true", help="train and overwrite the shipped classifier")
    args = parser.parse_args()
    if args.retrain and DEFAULT_CLASSIFIER_PATH.exists():
        DEFAULT_CLASSIFIER_PATH.unlink()
    ev = DigitsEvaluator.load_or_train(progress=True)
    print({"classifier_heldout_accuracy": ev.classifier_heldout_accuracy, "real_data": ev.real_data_floor()})


if __name__ == "__main__":  # pragma: no cover
    _main()
