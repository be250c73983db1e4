"""Saving sample grids as PNG (latents or pixels in [-1, 1])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8_grid(images: torch.Tensor, nrow: int, tile: int = 64, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> an (rows*tile, nrow*tile, 3) uint8 grid.

    One channel is shown as grey, three or more as RGB of the first three channels
    (latents are not pixels; this is a quick look, not a decode), two as grey of the first.
    Tiles are upscaled by nearest neighbour so that 8x8 digits stay readable.
    """
    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    rgb = images[:, :3] if c >= 3 else images[:, :1].expand(n, 3, h, w)
    rgb = ((rgb + 1) * 127.5).round().to(torch.uint8)
    scale = max(1, tile // max(h, w))
    rgb = rgb.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    th, tw = rgb.shape[2], rgb.shape[3]
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (th + pad) + pad, nrow * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (th + pad), pad + col * (tw + pad)
        grid[y:y + th, x:x + tw] = rgb[i].permute(1, 2, 0).numpy()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, tile: int = 64) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8_grid(images, nrow, tile)).save(path)
    return path
