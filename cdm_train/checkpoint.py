"""Atomic checkpoints: write to a temporary file in the same directory, fsync, rename.

A crash or Ctrl-C while writing leaves the previous checkpoint intact: os.replace is
atomic on POSIX within one file system.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
RUN_CONFIG_NAME = "config.yaml"  # the resolved config of a run, next to its checkpoint


def _write_atomic(path: str | Path, write: Callable[[Any], None], mode: str) -> Path:
    """Write `path` through `write(file)` into a temporary file beside it, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    return _write_atomic(path, lambda f: torch.save(obj, f), "wb")


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _write_atomic(path, lambda f: f.write(text), "w")


def load(path: str | Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    # weights_only=False: the checkpoint holds optimizer states, RNG states and the config dict,
    # all written by this package; never load checkpoints from untrusted sources.
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a damaged file; all mean the same
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: truncated, corrupt or not a cdm-train "
                              f"checkpoint ({type(exc).__name__}: {detail})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a cdm-train checkpoint (holds a "
                              f"{type(state).__name__}, not a dict of states)")
    return state
