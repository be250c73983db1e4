"""The package layout the design asks for: no import circles in cdm_train (top-level or deferred imports),
cdm_kernels never importing cdm_train, and every preset served by exactly one model family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, package: str) -> set[str]:
    """Every module of `package` that `path` imports, at any depth of the file (deferred imports included)."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}  # annotations only, never imported at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != package:
                continue
            found.add(mod)
            for alias in node.names:  # `from . import x` imports the submodule x
                found.add(f"{mod}.{alias.name}")
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for dep in _imports(path, package):
            while dep and dep not in files:  # `from .x import name` where name is not a module
                dep = dep.rpartition(".")[0]
            if dep and dep != name and not name.startswith(dep + "."):  # a package importing its own children: fine
                deps.add(dep)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_deferred_imports_count_and_type_checking_ones_do_not(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    source = "from .b import x\nif TYPE_CHECKING:\n    from .c import y\ndef f():\n    from .d import z\n"
    (pkg / "a.py").write_text(source)
    for name in "bcd":
        (pkg / f"{name}.py").write_text("from . import a\n" if name == "d" else "")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    graph = _graph("pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.d"}
    assert _cycles(graph) == [["pkg.a", "pkg.d"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_cdm_train_has_no_import_circles():
    graph = _graph("cdm_train")
    assert "cdm_train.models.sd3" in graph and "cdm_train.config" in graph["cdm_train.trainer"]
    assert _cycles(graph) == []


def test_cdm_kernels_attention_has_no_import_circles():
    """The 8-bit attention ops, their kernels, the dispatch and the shared helpers: arrows one way (issue 24)."""
    graph = _graph("cdm_kernels")
    attention = {name: deps for name, deps in graph.items() if name.startswith("cdm_kernels.attention")}
    assert "cdm_kernels.attention._common" in graph["cdm_kernels.attention._kernels"]
    assert "cdm_kernels.attention.dispatch" in graph["cdm_kernels.attention.fp8_attention"]
    assert not graph["cdm_kernels.attention._common"] - {"cdm_kernels.attention"}  # the leaf imports nothing
    assert _cycles(attention) == []


def test_cdm_kernels_never_imports_cdm_train():
    for path in (ROOT / "cdm_kernels").rglob("*.py"):
        assert not _imports(path, "cdm_train"), path


def test_every_preset_has_exactly_one_family():
    from cdm_train.models import FAMILIES, PRESETS, family_of

    names = [n for fam in FAMILIES for n in fam.presets]
    assert len(names) == len(set(names)) == len(PRESETS)
    assert {"tiny", "digits", "sd3-medium", "flux", "longcat", "longcat-tiny", "longcat-shape"} <= set(PRESETS)
    assert family_of("longcat-tiny").pipeline_class_name == "LongCatImagePipeline"
    from cdm_train.errors import ConfigError

    with pytest.raises(ConfigError, match="model.preset"):
        family_of("qwen-image")


def test_a_run_resolves_its_model_family_once(tmp_path, monkeypatch):
    """Build, LoRA targets, the scheduler shift and every training step ask the run's config (cfg.family), so a
    short LoRA run with the model's own shift resolves the preset's family once; a per-call lookup anywhere on
    that path (three places before) counts more."""
    import sys

    import cdm_train.models as models
    from cdm_train.trainer import Trainer

    from .helpers import tiny_config

    calls = []
    original = models.family_of

    def counting(preset):
        calls.append(preset)
        return original(preset)

    for mod in list(sys.modules.values()):  # every module that bound the name at import time
        if getattr(mod, "__name__", "").startswith("cdm_train") and getattr(mod, "family_of", None) is original:
            monkeypatch.setattr(mod, "family_of", counting)
    # schedule.shift=null: the family's shift rule runs; LoRA: the family's target linears are looked up.
    cfg = tiny_config(tmp_path, "train.steps=2", "schedule.shift=null", "lora.student=true", "lora.fake=true",
                      "lora.rank=2", "lora.alpha=4")
    calls.clear()  # building the config may resolve it (validation); what counts is the run
    tr = Trainer(cfg)
    tr.train()
    assert tr.step == 2 and calls == ["tiny"]
    cfg.model.preset = "digits"  # a changed preset is resolved again, never served from a stale cache
    assert cfg.family is original("digits")
