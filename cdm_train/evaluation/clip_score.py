"""CLIP score of (image, prompt) pairs with transformers' CLIPModel and CLIPProcessor from a LOCAL directory.

Per pair: the cosine similarity of CLIP's projected image and text embeddings. Reported as
``clip_score`` = max(100 * mean cosine, 0), exactly what torchmetrics' CLIPScore computes (it clamps the
mean, not each pair; for a trained CLIP the cosines are positive and the two agree), and ``clip_cosine`` =
the mean cosine (the official CDM scorer's logits_per_image / 100 for a CLIP whose logit scale is 100,
e.g. openai/clip-vit-large-patch14). Prompts longer than the text encoder's positions are truncated, as
torchmetrics does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import EvalInputError


class ClipScorer:
    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu"):
        self.path = Path(model_dir)
        if not (self.path / "config.json").is_file():
            raise EvalInputError(f"--clip: {str(self.path)!r} is not a CLIP model directory (no config.json); "
                                 "save one with CLIPModel.save_pretrained + CLIPProcessor.save_pretrained")
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as exc:
            raise EvalInputError(f"--clip needs transformers (pip install transformers): {exc}") from None
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(str(self.path)).to(self.device).float().eval()
            self.processor = CLIPProcessor.from_pretrained(str(self.path))
        except (OSError, ValueError) as exc:
            raise EvalInputError(f"--clip: cannot load a CLIP model and processor from {str(self.path)!r} "
                                 f"({str(exc).splitlines()[0]})") from None
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def cosines(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """(H, W, 3) uint8 images and their prompts -> (N,) float64 cosine similarities."""
        if len(images) != len(prompts):
            raise ValueError(f"prompts: {len(prompts)} prompts for {len(images)} images")
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_tokens)
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         attention_mask=inputs["attention_mask"].to(self.device),
                         pixel_values=inputs["pixel_values"].to(self.device, torch.float32))
        img = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        return (img * txt).sum(-1).cpu().numpy()


def clip_summary(cosines: np.ndarray) -> dict[str, float]:
    cos = np.asarray(cosines, np.float64)
    return {"clip_score": max(100.0 * float(cos.mean()), 0.0), "clip_cosine": float(cos.mean())}
