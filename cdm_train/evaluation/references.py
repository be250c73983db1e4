"""Reference data for FID: a folder of the user's images, or precomputed statistics, and the statistics cache.

A folder's statistics (mean and covariance of its Inception features) are cached under a key of the
network's file content, the pre-processing and every image used (name, size, modification time), so a
second student evaluated against the same references reuses them. Precomputed statistics: an ``.npz`` with
``mu`` and ``sigma`` (the format of clean-fid, pytorch-fid and the official CDM evaluation, and of the
cache files written here).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import EvalInputError
from .frechet import gaussian_stats
from .inception import INCEPTION_SIZE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATS_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cdm-kernels" / "fid-stats"


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """The image files of a folder and its subfolders, in sorted order; the first `limit` when given."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalInputError(f"--reference: {str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EvalInputError(f"--reference: no images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}")
    return files[:limit] if limit is not None else files


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; a file PIL cannot decode is a clear error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EvalInputError(f"--reference: cannot read image {str(path)!r} ({exc})") from None


def _folder_key(files: list[Path], root: Path, extractor_digest: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": STATS_VERSION, "network": extractor_digest, "size": INCEPTION_SIZE,
                         "resize": "pil-bicubic-float"}).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) of an .npz statistics file."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--reference-stats: {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (KeyError, ValueError, OSError) as exc:
        raise EvalInputError(f"--reference-stats: {str(p)!r} is not an .npz with 'mu' and 'sigma' ({exc})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not (np.isfinite(mu).all()
                                                                            and np.isfinite(sigma).all()):
        raise EvalInputError(f"--reference-stats: {str(p)!r}: mu {mu.shape} and sigma {sigma.shape} are not a "
                             f"finite (D,) mean and (D, D) covariance")
    return mu, sigma, meta


def save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def folder_stats(folder: str | Path, features: Callable[[list[np.ndarray]], np.ndarray], extractor_digest: str, *,
                 min_images: int, limit: int | None = None, cache_dir: Path | None = None, batch_size: int = 32,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, info) of a reference folder's features; info says whether the cache answered."""
    from tqdm.auto import tqdm

    root = Path(folder)
    files = list_images(root, limit)
    if len(files) < min_images:
        raise EvalInputError(f"--reference: {str(root)!r} has {len(files)} images, fewer than the {min_images} "
                             f"samples to compare with (--num); add images or lower --num")
    key = _folder_key(files, root, extractor_digest)
    cached = cache_dir / f"{key}.npz" if cache_dir is not None else None
    info = {"dir": str(root.resolve()), "num_images": len(files), "stats_file": str(cached) if cached else None}
    if cached is not None and cached.is_file():
        mu, sigma, _ = load_stats(cached)
        return mu, sigma, {**info, "cached": True}
    feats = []
    for start in tqdm(range(0, len(files), batch_size), desc="reference features", disable=not progress,
                      dynamic_ncols=True):
        feats.append(features([read_rgb(p) for p in files[start:start + batch_size]]))
    mu, sigma = gaussian_stats(np.concatenate(feats))
    if cached is not None:
        save_stats(cached, mu, sigma, {"dir": info["dir"], "num_images": len(files), "network": extractor_digest})
    return mu, sigma, {**info, "cached": False}
