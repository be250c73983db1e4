"""Prompt files and precomputed prompt embeddings: the memory-mapped dataset `cdm-train encode-prompts` writes.

Layout of an embeddings directory (written by `encode_prompts`)::

    index.json                 {"format": "cdm-prompt-embeds", "version": 1, "pipeline": ..., "num_prompts": N,
                                "tensors": {name: {"shape": per-row shape, "dtype": ...}},
                                "shards": [{"file": "shard-00000.safetensors", "rows": n}, ...],
                                "null": "null.safetensors"}
    shard-00000.safetensors    the family's text tensors: encoder_hidden_states (n, L, D), and for SD3 / Flux
                               pooled_projections (n, P) (LongCat has no pooled vector)
    null.safetensors           the same tensors for the empty prompt (1 row): the CFG null condition
    prompts.jsonl              the prompts, in row order

Text encoders run once, offline (`encode-prompts`, cdm_train/encode.py), so they never occupy training GPUs. Training
reads rows through `safetensors.safe_open` (memory-mapped: only the rows drawn are read).
"""

from __future__ import annotations

import bisect
import functools
import json
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

FORMAT = "cdm-prompt-embeds"
INDEX = "index.json"
TENSORS = ("encoder_hidden_states", "pooled_projections")  # SD3 / Flux; a directory's index names its own


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


# ------------------------------------------------------------------------------------------ reading
class PromptEmbeds:
    """Rows of an embeddings directory, read memory-mapped on demand. Validates the whole layout up front."""

    def __init__(self, root: str | Path, tensors: tuple[str, ...] | None = None):
        """`tensors`: the ones the model needs (checked to be there); None: every tensor the index lists."""
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
        self.names = tuple(tensors) if tensors is not None else tuple(self.tensors)
        missing = set(self.names) - set(self.tensors)
        if missing:
            raise PromptDataError(f"{index_path}: no {sorted(missing)} tensors (encoded for another model family? "
                                  f"the index says pipeline {index.get('pipeline')!r})")
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
            for name in self.names:
                if name not in handle.keys():
                    raise PromptDataError(f"{path}: no {name!r} tensor")
                shape = list(handle.get_slice(name).get_shape())
                want = [entry["rows"]] + list(self.tensors[name]["shape"])
                if shape != want:
                    raise PromptDataError(f"{path}: {name} has shape {shape}, the index says {want} "
                                          "(shards from different encodings?)")
            if entry["file"] == index["null"]:
                self._null = {k: handle.get_tensor(k) for k in self.names}
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
        out: dict[str, list[torch.Tensor]] = {k: [] for k in self.names}
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"prompt row {i} out of range [0, {self.size})")
            s = bisect.bisect_right(self._starts, i) - 1
            r = i - self._starts[s]
            for k in self.names:
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

    def __init__(self, root: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                 tensors: tuple[str, ...] | None = TENSORS):
        self.data = PromptEmbeds(root, tensors)
        self.size = len(self.data)
        self.device, self.dtype = device, dtype

    def __call__(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.take(torch.randint(self.size, (batch,), generator=generator).tolist())

    def take(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in self.data.rows(rows).items()}

    def null(self) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, self.dtype) for k, v in self.data.null().items()}
