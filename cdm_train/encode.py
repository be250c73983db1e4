"""`cdm-train encode-prompts`: prompts through the teacher pipeline's own text encoders, once, offline.

Writes the embeddings directory that cdm_train/prompts.py documents and reads (the family's text tensors per
prompt, the empty prompt as the CFG null condition, the prompts in row order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import PIPELINE_CLASSES, family_of_pipeline
from .prompts import FORMAT, INDEX, PromptDataError, read_prompts


def load_text_pipeline(model_dir: str | Path, device: torch.device, dtype: torch.dtype):
    """The diffusers pipeline of `model_dir` with its text encoders only (no transformer, no VAE)."""
    root = Path(model_dir)
    index = root / "model_index.json"
    if not index.is_file():
        raise PromptDataError(f"--model {str(root)!r}: no model_index.json (expected a diffusers pipeline directory)")
    name = json.loads(index.read_text()).get("_class_name", "")
    family = family_of_pipeline(name)
    if family is None:
        raise PromptDataError(f"--model: pipeline {name!r} is not supported ({', '.join(PIPELINE_CLASSES)})")
    return family.load_text_pipeline(root, device, dtype)


@torch.no_grad()
def encode_batch(pipe, prompts: list[str], device: torch.device, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The pipeline's own prompt encoding (SD3: CLIP-L + CLIP-G + T5; Flux: CLIP-L pooled + T5; LongCat:
    Qwen2.5-VL in the pipeline's chat template), as the family's text tensors."""
    return family_of_pipeline(type(pipe).__name__).encode(pipe, prompts, device, max_sequence_length)


def encode_prompts(model_dir: str | Path, prompts_file: str | Path, out_dir: str | Path, *, batch_size: int = 16,
                   shard_rows: int = 4096, device: str = "auto", dtype: str = "bfloat16",
                   max_sequence_length: int = 256, pipe=None) -> Path:
    """Encode every prompt of `prompts_file` (and the empty prompt) into sharded safetensors under `out_dir`."""
    from safetensors.torch import save_file

    prompts = read_prompts(prompts_file)
    if batch_size < 1 or shard_rows < 1:
        raise PromptDataError("--batch-size and --shard-rows must be >= 1")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    if pipe is None:
        pipe = load_text_pipeline(model_dir, dev, torch_dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    shards, pending, pending_rows, meta = [], [], 0, {}

    def flush():
        nonlocal pending, pending_rows
        if not pending:
            return
        data = {k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(data, str(out / name))
        shards.append({"file": name, "rows": pending_rows})
        pending, pending_rows = [], 0

    for start in range(0, len(prompts), batch_size):
        enc = encode_batch(pipe, prompts[start:start + batch_size], dev, max_sequence_length)
        enc = {k: v.to("cpu", torch_dtype) for k, v in enc.items()}
        meta = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).replace("torch.", "")} for k, v in enc.items()}
        pending.append(enc)
        pending_rows += enc["encoder_hidden_states"].shape[0]
        if pending_rows >= shard_rows:
            flush()
    flush()
    null = {k: v.to("cpu", torch_dtype).contiguous() for k, v in encode_batch(pipe, [""], dev,
                                                                             max_sequence_length).items()}
    save_file(null, str(out / "null.safetensors"))
    with (out / "prompts.jsonl").open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}, ensure_ascii=False) + "\n")
    index = {"format": FORMAT, "version": 1, "pipeline": type(pipe).__name__, "num_prompts": len(prompts),
             "max_sequence_length": max_sequence_length, "tensors": meta, "shards": shards,
             "null": "null.safetensors"}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return out
