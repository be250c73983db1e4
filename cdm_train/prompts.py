"""Precomputed prompt embeddings: `cdm-train encode-prompts` and the memory-mapped dataset.

Layout of an embeddings directory (written by `encode_prompts`)::

    index.json                 {"format": "cdm-prompt-embeds", "version": 1, "pipeline": ..., "num_prompts": N,
                                "tensors": {name: {"shape": per-row shape, "dtype": ...}},
                                "shards": [{"file": "shard-00000.safetensors", "rows": n}, ...],
                                "null": "null.safetensors"}
    shard-00000.safetensors    encoder_hidden_states (n, L, D), pooled_projections (n, P)
    null.safetensors           the same tensors for the empty prompt (1 row): the CFG null condition
    prompts.jsonl              the prompts, in row order

Text encoders run once, offline (`encode-prompts`), so they never occupy training GPUs. Training
reads rows through `safetensors.safe_open` (memory-mapped: only the rows drawn are read).
"""

from __future__ import annotations

import bisect
import functools
import json
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

FORMAT = "cdm-prompt-embeds"
INDEX = "index.json"
TENSORS = ("encoder_hidden_states", "pooled_projections")


class PromptDataError(ConfigError):
    """A bad prompt file or embeddings directory (the CLI exits with code 2)."""


# ------------------------------------------------------------------------------------------ prompt files
def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped), or JSONL with {"prompt": ...} per line."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"prompt file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptDataError(f"prompt file {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                              f"{raw[exc.start:exc.start + 1]!r}); re-save it as UTF-8") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise PromptDataError(f"prompt file {str(path)!r} has no prompts")
    jsonl = path.suffix == ".jsonl" or lines[0][1].startswith("{")
    if not jsonl:
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptDataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise PromptDataError(f"{path}:{n}: expected an object with a string \"prompt\" field")
        prompts.append(item["prompt"])
    return prompts


# ------------------------------------------------------------------------------------------ encoding
def load_text_pipeline(model_dir: str | Path, device: torch.device, dtype: torch.dtype):
    """The diffusers pipeline of `model_dir` with its text encoders only (no transformer, no VAE)."""
    root = Path(model_dir)
    index = root / "model_index.json"
    if not index.is_file():
        raise PromptDataError(f"--model {str(root)!r}: no model_index.json (expected a diffusers pipeline directory)")
    name = json.loads(index.read_text()).get("_class_name", "")
    import diffusers

    if name not in ("StableDiffusion3Pipeline", "FluxPipeline"):
        raise PromptDataError(f"--model: pipeline {name!r} is not supported (StableDiffusion3Pipeline, FluxPipeline)")
    cls = getattr(diffusers, name)
    pipe = cls.from_pretrained(str(root), transformer=None, vae=None, torch_dtype=dtype)
    return pipe.to(device)


@torch.no_grad()
def encode_batch(pipe, prompts: list[str], device: torch.device, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt (SD3: CLIP-L + CLIP-G + T5; Flux: CLIP-L pooled + T5)."""
    if type(pipe).__name__ == "FluxPipeline":
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length)
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


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
        data = {k: torch.cat([p[k] for p in pending]).contiguous() for k in TENSORS}
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(data, str(out / name))
        shards.append({"file": name, "rows": pending_rows})
        pending, pending_rows = [], 0

    for start in range(0, len(prompts), batch_size):
        enc = encode_batch(pipe, prompts[start:start + batch_size], dev, max_sequence_length)
        enc = {k: v.to("cpu", torch_dtype) for k, v in enc.items()}
        meta = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).replace("torch.", "")} for k, v in enc.items()}
        pending.append(enc)
        pending_rows += enc[TENSORS[0]].shape[0]
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


# ------------------------------------------------------------------------------------------ reading
class PromptEmbeds:
    """Rows of an embeddings directory, read memory-mapped on demand. Validates the whole layout up front."""

    def __init__(self, root: str | Path):
        from safetensors import safe_open

        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise PromptDataError(f"{str(self.root)!r}: no {INDEX} (write one with cdm-train encode-prompts)")
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PromptDataError(f"{index_path}: not valid JSON ({exc})") from None
        if index.get("format") != FORMAT:
            raise PromptDataError(f"{index_path}: not a {FORMAT} index")
        self.index = index
        self.tensors: dict[str, Any] = index["tensors"]
        missing = set(TENSORS) - set(self.tensors)
        if missing:
            raise PromptDataError(f"{index_path}: no {sorted(missing)} tensors")
        self._files, self._starts = [], []
        total = 0
        for entry in list(index["shards"]) + [{"file": index["null"], "rows": 1}]:
            path = self.root / entry["file"]
            if not path.is_file():
                raise PromptDataError(f"{index_path}: shard {entry['file']!r} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise PromptDataError(f"{path}: not a safetensors file ({exc})") from None
            for name in TENSORS:
                if name not in handle.keys():
                    raise PromptDataError(f"{path}: no {name!r} tensor")
                shape = list(handle.get_slice(name).get_shape())
                want = [entry["rows"]] + list(self.tensors[name]["shape"])
                if shape != want:
                    raise PromptDataError(f"{path}: {name} has shape {shape}, the index says {want} "
                                          "(shards from different encodings?)")
            if entry["file"] == index["null"]:
                self._null = {k: handle.get_tensor(k) for k in TENSORS}
            else:
                self._files.append(handle)
                self._starts.append(total)
                total += entry["rows"]
        if total != index["num_prompts"] or total == 0:
            raise PromptDataError(f"{index_path}: shards hold {total} rows, the index says {index['num_prompts']}")
        self.size = total

    def __len__(self) -> int:
        return self.size

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {k: [] for k in TENSORS}
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"prompt row {i} out of range [0, {self.size})")
            s = bisect.bisect_right(self._starts, i) - 1
            r = i - self._starts[s]
            for k in TENSORS:
                out[k].append(self._files[s].get_slice(k)[r:r + 1])
        return {k: torch.cat(v) for k, v in out.items()}

    def null(self) -> dict[str, torch.Tensor]:
        return dict(self._null)


@functools.lru_cache(maxsize=4)  # consecutive steps walk the same permutation: draw it once, not every step
def _permutation(num: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randperm(num, generator=torch.Generator().manual_seed(seed)).tolist())


def official_prompt_rows(num: int, seed: int, step: int, rank: int, world: int, batch: int) -> list[int]:
    """Rows for (step, rank), exactly as the official DistributedKRepeatSampler (k = 1) yields them.

    The official sampler is stateful; this is its closed form, so resuming at `step` continues the same
    sequence. Global batch t = step takes m = world x batch rows without replacement from permutations of all
    `num` rows (permutation e drawn with torch.randperm seeded seed + e): each permutation is cut into
    floor(num / m) slices and its remainder is dropped; with num < m each batch concatenates ceil(m / num)
    fresh permutations. The m rows are then shuffled (randperm seeded seed + t) and rank r takes the r-th
    `batch` of them.
    """
    if num < 1 or world < 1 or batch < 1 or not 0 <= rank < world or step < 0:
        raise ValueError(f"official_prompt_rows: bad arguments num={num} step={step} rank={rank} world={world} "
                         f"batch={batch}")
    m = world * batch
    if num >= m:
        per_perm = num // m
        perm, part = divmod(step, per_perm)
        rows = _permutation(num, seed + perm)[part * m:(part + 1) * m]
    else:
        perms = -(-m // num)
        rows = [r for e in range(step * perms, (step + 1) * perms) for r in _permutation(num, seed + e)][:m]
    order = _permutation(m, seed + step)
    shuffled = [rows[i] for i in order]
    return shuffled[rank * batch:(rank + 1) * batch]


class StreamingPromptBank:
    """PromptBank over an embeddings directory, read memory-mapped: `take(rows)` for the official order
    (official_prompt_rows), or called with the step's host generator for rows drawn with replacement."""

    def __init__(self, root: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
        self.data = PromptEmbeds(root)
        self.size = len(self.data)
        self.device, self.dtype = device, dtype

    def __call__(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.take(torch.randint(self.size, (batch,), generator=generator).tolist())

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in self.data.rows(rows).items()}

    def null(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype) for k, v in self.data.null().items()}
