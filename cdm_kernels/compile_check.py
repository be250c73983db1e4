"""Compile every Triton kernel of the package for a GPU, without a GPU.

    python -m cdm_kernels.compile_check [--arch 80 --arch 89 --arch 90] [--quick]

The CPU tests run the kernels through Triton's interpreter, which never runs Triton's
compiler: a kernel can pass every CPU test and still be rejected on a GPU (triton 3.6
once crashed on a finalize kernel that 3.9 compiles). This check closes that gap.

How: the public ops run with CPU tensors standing in for CUDA tensors while
`JITFunction.run` is replaced by a recorder, so every launch the package would make
is captured with its real arguments (dtypes, pointer alignment, integer values,
constexprs, num_warps). Each capture is specialised by the JIT's own binder for a
CUDA target (the same divisibility-by-16 and ==1 specialisation a GPU launch gets)
and compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
down to cubin through the ptxas shipped in the triton wheel. Identical
specialisations are compiled once.

Output: one line per failing (kernel, setting), a summary line last; exit 1 on any
failure, 2 on a usage error. Run it against another Triton by putting that Triton
first on PYTHONPATH (the Makefile does this for triton 3.6, the GPU machines' version).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET") == "1":  # the recorder needs the real JIT, not the interpreter
    print("compile_check: unset TRITON_INTERPRET (it must be 0 or absent)", file=sys.stderr)
    raise SystemExit(2)

import torch  # noqa: E402

SD3_1024 = (16, 128, 128)  # SD3 latent at 1024 px
FLUX_1024 = (4096, 64)  # Flux packed latent at 1024 px: (64 x 64 tokens, 16 channels x 2 x 2)
VIDEO = (16, 21, 60, 104)  # a 5-D video latent per sample (e.g. Wan-class, 81 frames at 480p)
ODD = [(3, 5, 7), (1,), (2, 3), (33,), (17, 9)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    setting: str


_STUBS: dict[tuple, torch.Tensor] = {}


def _stub(t: torch.Tensor) -> torch.Tensor:
    """A tiny tensor the JIT specialises like `t`: same dtype, same 16-byte alignment (all a pointer
    argument contributes). Recording stubs instead of the launch's tensors keeps the sweep's memory flat."""
    aligned = t.data_ptr() % 16 == 0
    key = (t.dtype, aligned)
    if key not in _STUBS:
        base = torch.empty(32, dtype=t.dtype)
        _STUBS[key] = base[:1] if aligned else base[1:2]  # one element in: off the 16-byte grid for any dtype < 16 B
    return _STUBS[key]


@contextlib.contextmanager
def recording(launches: list[Launch], setting: list[str]):
    """Replace JITFunction.run: record each launch instead of running it."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        consts = " ".join(f"{k}={v}" for k, v in kwargs.items() if isinstance(v, (bool, int)) and k.isupper())
        args = tuple(_stub(a) if isinstance(a, torch.Tensor) else a for a in args)
        launches.append(Launch(self, args, dict(kwargs), f"{setting[0]}; {consts}" if consts else setting[0]))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def triton_on_cpu_tensors():
    """Make the triton backend accept CPU tensors (its kernels are recorded, never run)."""
    from . import backend

    with backend.accepting_any_device("triton"):
        with backend.use_backend("triton"):
            yield


def _sigmas(batch: int, ndim: int, kind: str):
    if kind == "float":
        return 0.7, 0.3
    s = torch.rand(batch)
    if kind == "view":  # (B, 1, ..., 1) and a strided (every other element) sigma tensor
        return s.view(batch, *([1] * (ndim - 1))), torch.rand(2 * batch)[::2]
    return s, torch.rand(batch)


def _tensor(shape, dtype, layout: str):
    if layout == "batch_slice":  # a batch slice of a bigger batch (the cond half of a cond/uncond batch)
        return torch.empty((2 * shape[0], *shape[1:]), dtype=dtype)[shape[0]:]
    if layout == "offset":  # storage offset of one element: breaks 16-byte alignment
        flat = torch.empty(int(torch.tensor(shape).prod()) + 1, dtype=dtype)
        return flat[1:].view(shape)
    return torch.empty(shape, dtype=dtype)


def exercise_ops(batch: int, sample_shape: tuple, dtype, layout: str, sigma_kind: str, reductions) -> None:
    """Every public op, forward and backward, on one setting (the kernels are recorded, not run)."""
    import cdm_kernels as ck

    shape = (batch, *sample_shape)

    def t(grad=False):
        x = _tensor(shape, dtype, layout)
        return x.requires_grad_(grad) if grad else x

    s, st = _sigmas(batch, len(shape), sigma_kind)
    x, v = t(True), t(True)
    ck.euler_extrapolate(x, v, s, st).sum().backward()
    ck.euler_step(t(), t(), s, st)
    x0 = t(True)
    ck.renoise(x0, s, seed=7, offset=3).sum().backward()
    ck.renoise(t(True), s, t()).sum().backward()
    ck.predict_x0_renoise(t(), t(), s, st, seed=5)
    ck.predict_x0_renoise(t(), t(), s, st, t())
    for reduction in reductions:
        sv, xt = t(True), t(True)
        loss = ck.dm_loss(sv, t(), t(), xt, t(), s, st, reduction=reduction)
        loss.sum().backward()
        loss = ck.cfg_loss(t(True), t(), t(), t(), t(), s, st, guidance_scale=7.0, reduction=reduction)
        loss.sum().backward()
        ck.flow_matching_loss(t(True), t(), seed=11, reduction=reduction).sum().backward()
        ck.flow_matching_loss(t(True), t(), t(), reduction=reduction).sum().backward()


def exercise_attention(batch: int, heads: int, seq: int, head_dim: int, dtype, kind: str = "fp8") -> None:
    from .attention._int8_kernels import triton_int8_attention
    from .attention._kernels import triton_fp8_attention

    q, k, v = (torch.empty((batch, heads, seq, head_dim), dtype=dtype) for _ in range(3))
    if kind == "int8":
        # K's mean is a torch op on the (uninitialised) stand-in: fine, only the launches are recorded.
        # (B, S, H, D) memory seen as (B, H, S, D), what the diffusers processors pass: V is read in place.
        v = torch.empty((batch, seq, heads, head_dim), dtype=dtype).transpose(1, 2)
        triton_int8_attention(q, k, v, head_dim ** -0.5, soft_round=False)
    elif kind == "fp8-sm90":
        from .attention._kernels import PROBE_CONFIGS, kernel_configs

        # Every stored sm_90 launch config (the default first, then the candidates the GPU run times) and the probes
        # (compiled for their machine-code facts only); plan() compiles these launches for sm_90 only.
        for cfg in [*kernel_configs(head_dim, (9, 0)), *PROBE_CONFIGS.get((90, head_dim), [])]:
            triton_fp8_attention(q, k, v, head_dim ** -0.5, cfg, soft_round=False)
    else:
        triton_fp8_attention(q, k, v, head_dim ** -0.5, soft_round=False)


def op_settings(mode: str):
    """(description, arguments of exercise_ops) covering the launch shapes the package meets.

    The quick set reaches every constexpr combination and argument-type combination that the full
    set reaches (all dtypes, every finalize tile, every reduction; checked by the tests) and every
    class of integer specialisation (sizes and strides divisible by 16 or not, unaligned pointers,
    sigma as float / tensor / view), with fewer repetitions of each; compile_all then keeps the most
    and least specialised variant of each combination.
    """
    reductions_all = ("mean", "sum", "none")
    if mode == "smoke":  # for the test of the checker itself: one SD3 batch and one odd shape
        yield "sd3-1024 B=16 bfloat16", (16, SD3_1024, torch.bfloat16, "contiguous", "tensor", reductions_all)
        yield "odd (3, 5, 7) B=3 float32 offset sigma=view", (3, (3, 5, 7), torch.float32, "offset", "view",
                                                              ("mean",))
        return
    quick = mode == "quick"
    dtypes = DTYPES
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        # SD3 1024 px: the reduction chunk count and the finalize tile grow with the batch.
        for b in ([1, 4, 9, 16, 64] if quick else range(1, 65)):
            yield f"sd3-1024 B={b} {dname}", (b, SD3_1024, dtype, "contiguous", "tensor", reductions_all)
        for b in ([16] if quick else [1, 2, 4, 8, 16, 32]):
            yield f"flux-1024 B={b} {dname}", (b, FLUX_1024, dtype, "contiguous", "tensor", reductions_all)
        yield f"video 1x{'x'.join(map(str, VIDEO))} {dname}", (1, VIDEO, dtype, "contiguous", "tensor",
                                                               reductions_all)
        for shape in (ODD[:2] if quick else ODD):
            for layout in (("contiguous", "offset") if quick else ("contiguous", "batch_slice", "offset")):
                for sk in (("float", "view") if quick else ("float", "tensor", "view")):
                    yield (f"odd {shape} B=3 {dname} {layout} sigma={sk}",
                           (3, shape, dtype, layout, sk, reductions_all))


def attention_settings(mode: str):
    quick = mode != "full"
    for dtype in ((torch.bfloat16,) if mode == "smoke" else (torch.bfloat16, torch.float16, torch.float32)):
        dname = str(dtype).replace("torch.", "")
        for d in ((64,) if mode == "smoke" else (64, 128)):
            for s in ((4429,) if mode == "smoke" else (4096, 4429) if quick else (4096, 4429, 333, 64, 65, 1)):
                yield f"fp8-attention D={d} S={s} {dname}", (1, 2, s, d, dtype)
                yield f"fp8-attention {SM90_ONLY} D={d} S={s} {dname}", (1, 2, s, d, dtype, "fp8-sm90")
                yield f"int8-attention D={d} S={s} {dname}", (1, 2, s, d, dtype, "int8")


def collect(mode: str) -> tuple[list[Launch], list[str]]:
    launches: list[Launch] = []
    current = [""]
    errors = []
    with triton_on_cpu_tensors(), recording(launches, current):
        for desc, args in op_settings(mode):
            current[0] = desc
            try:
                exercise_ops(*args)
            except Exception as exc:  # a host-side error before any launch is a failure too
                errors.append(f"FAIL host-side {desc}: {type(exc).__name__}: {exc}")
        for desc, args in attention_settings(mode):
            current[0] = desc
            try:
                exercise_attention(*args)
            except Exception as exc:
                errors.append(f"FAIL host-side {desc}: {type(exc).__name__}: {exc}")
    return launches, errors


FP8_KERNELS = ("_k_colsum_kernel", "_quantize_qkv_kernel", "_fp8_attention_fwd_kernel")
SM90_ONLY = "sm90-config"  # in a setting's name: the launch uses sm_90's stored config, compiled for sm_90 only
FP8_MIN_ARCH = 89  # FP8 tensor cores: sm_89 (Ada) and sm_90 (Hopper); sm_80 takes the INT8-QK kernel instead

_WORK: list[tuple] = []  # (arch, fn, args, kwargs, bound_args, specialization, options): read by forked workers
# The machine-code report (--report): the settings whose kernels get a SASS analysis, the _WORK indices
# they use (with the shapes reaching each), and whether the forked workers analyse what they compile.
REPORT_SETTINGS = ("sd3-1024 B=16 ", "flux-1024 B=16 ", "video ", "fp8-attention ", "int8-attention ")
_ANCHORS: dict[int, set[str]] = {}
_REPORT = [False]


def _compile_one(index: int) -> tuple[str | None, dict | None]:
    """(compiler error or None, machine-code description when the report is on)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    from . import machine_code

    arch, fn, kwargs, bound_args, specialization, options = _WORK[index]
    target = GPUTarget("cuda", arch, 32)
    try:
        backend = make_backend(target)
        opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)

        def compile_it():
            return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)

        if not _REPORT[0]:
            compile_it()
            return None, None
        info = machine_code.analyse(compile_it, want_text=index in _ANCHORS)
        # the variant's intent, for the gates that check it came out (TMA copies) and the candidate table
        info["use_tma"] = bool(kwargs.get("USE_TMA", False))
        info["warp_specialize"] = bool(kwargs.get("WARP_SPECIALIZE", False))
        return None, info
    except Exception as exc:  # the compiler's own error: reported, and the check goes on
        lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        return " | ".join(lines[:4])[:500], None


def _specialisation_degree(fn, specialization) -> tuple[tuple, int]:
    """(the kernel's constexprs and argument types, how many integer/pointer arguments are specialised).

    Launches with the same first part run the same kernel code on the same types; they differ only in
    which pointers are 16-byte aligned and which integers are divisible by 16 or equal to 1.
    """
    group, degree = [], 0
    for param, spec in zip(fn.params, specialization):
        if param.is_constexpr:
            group.append((param.name, repr(spec[1])))
        elif spec[0] == "constexpr":  # an integer argument equal to 1 (or None): baked in, an i32 otherwise
            group.append("i32")
            degree += 1
        else:
            group.append(spec[0])
            degree += spec[1] is not None and "D" in str(spec[1])
    return tuple(group), degree


def _extremes(work: list[tuple]) -> list[int]:
    """Indices into `work`: per (arch, kernel, constexprs and types, options), the first most and the
    first least specialised entry."""
    best: dict[tuple, list] = {}
    for index, (arch, fn, _kwargs, _bound, specialization, options) in enumerate(work):
        group, degree = _specialisation_degree(fn, specialization)
        key = (arch, id(fn), group, str(options))
        if key not in best:
            best[key] = [(degree, index), (degree, index)]
        lo, hi = best[key]
        if degree < lo[0]:
            best[key][0] = (degree, index)
        if degree > hi[0]:
            best[key][1] = (degree, index)
    return sorted({index for pair in best.values() for _degree, index in pair})


def _shape_of(setting: str) -> str:
    """'sd3-1024 B=16 bfloat16; BLOCK=1024' -> 'sd3-1024 B=16' (the dtype is in the kernel's variant)."""
    words = setting.split(";")[0].split()
    return " ".join(w for w in words if w not in ("float32", "bfloat16", "float16"))


def plan(launches: list[Launch], archs: list[int], force_fp8: bool = False,
         extremes_only: bool = False, report: bool = False) -> tuple[list[tuple[int, int, str]], int]:
    """Fill _WORK with each distinct (arch, kernel, specialisation) to compile, as the JIT's binder
    derives it from the recorded arguments for a CUDA target.

    extremes_only (the quick mode): of the specialisations sharing a kernel's constexprs and argument
    types, keep only the most and the least specialised (alignment, divisibility, ==1), which bound
    the code the compiler sees; every constexpr combination (finalize tiles, reductions, flags) stays.

    report: also fill _ANCHORS with the entries the REPORT_SETTINGS use, and keep them in the quick mode.

    Returns (uses: (work index, arch, setting) per launch compiled, FP8 launches skipped).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    _WORK.clear()
    first: dict[tuple, int] = {}
    uses: list[tuple[int, int, str]] = []
    skipped = 0
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binders: dict[int, object] = {}
        for launch in launches:
            fn = launch.fn
            if fn.__name__ in FP8_KERNELS and arch < FP8_MIN_ARCH and not force_fp8:
                skipped += 1
                continue
            if SM90_ONLY in launch.setting and arch != 90:  # a config that never launches on other GPUs
                continue
            kwargs = dict(launch.kwargs)
            kwargs.setdefault("debug", False)
            if id(fn) not in binders:
                binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
            bound_args, specialization, options = binders[id(fn)](*launch.args, **kwargs)
            key = (arch, id(fn), str(specialization), str(options))
            if key not in first:
                first[key] = len(_WORK)
                _WORK.append((arch, fn, kwargs, bound_args, specialization, options))
            uses.append((first[key], arch, launch.setting))
    _ANCHORS.clear()
    if report:
        for index, _arch, setting in uses:
            if setting.startswith(REPORT_SETTINGS):
                _ANCHORS.setdefault(index, set()).add(_shape_of(setting))
    if extremes_only:
        keep = sorted(set(_extremes(_WORK)) | set(_ANCHORS))
        remap = {old: new for new, old in enumerate(keep)}
        _WORK[:] = [_WORK[i] for i in keep]
        uses = [(remap[i], arch, setting) for i, arch, setting in uses if i in remap]
        anchors = {remap[i]: shapes for i, shapes in _ANCHORS.items()}
        _ANCHORS.clear()
        _ANCHORS.update(anchors)
    return uses, skipped


def planned_groups() -> set[tuple]:
    """(arch, kernel name, constexprs and argument types) of every entry of _WORK."""
    return {(w[0], w[1].__name__, _specialisation_degree(w[1], w[4])[0]) for w in _WORK}


def compile_all(launches: list[Launch], archs: list[int], jobs: int, force_fp8: bool = False,
                extremes_only: bool = False, report: bool = False) -> tuple[int, int, list[str], list]:
    """Compile what `plan` selects, in `jobs` forked processes.

    Returns (distinct compilations, skipped, failure lines: one per failing kernel and setting,
    machine-code descriptions per _WORK entry when `report`, else Nones).
    """
    uses, skipped = plan(launches, archs, force_fp8, extremes_only, report)
    _REPORT[0] = report
    try:
        if jobs > 1 and len(_WORK) > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                results = pool.map(_compile_one, range(len(_WORK)), chunksize=4)
        else:
            results = [_compile_one(i) for i in range(len(_WORK))]
    finally:
        _REPORT[0] = False
    errors = [r[0] for r in results]
    failures, reported = [], set()
    for index, arch, setting in uses:
        if errors[index] is not None and (index, setting) not in reported:
            reported.add((index, setting))
            failures.append(f"FAIL sm_{arch} {_WORK[index][1].__name__} [{setting}]: {errors[index]}")
    return len(_WORK), skipped, failures, [r[1] for r in results]


def machine_code_report(infos: list, md_path: str | None) -> tuple[list[str], list[str]]:
    """Gate every compiled kernel (spills) and the REPORT_SETTINGS' kernels (access widths, QGMMA).

    Returns (failure lines, summary lines); writes the markdown table to md_path when given.
    """
    import triton

    from . import machine_code as mc

    stats: dict[int, mc.SassStats] = {}
    for arch in sorted({w[0] for w in _WORK}):
        # the real shapes' kernels, and any kernel that spills (its SASS tells whether the spill is hot)
        idx = [i for i, info in enumerate(infos) if _WORK[i][0] == arch and info is not None and "text" in info]
        for i, sass in zip(idx, mc.disassemble_many(arch, [infos[i]["text"] for i in idx])):
            stats[i] = mc.sass_stats(sass)
    failures, rows = [], {}
    for i, info in enumerate(infos):
        if info is None:  # a compile failure, reported already
            continue
        arch, fn, _kw, _bound, spec, _opts = _WORK[i]
        label = mc.kernel_label(fn)
        pointers = [s for p, s in zip(fn.params, spec) if not p.is_constexpr and str(s[0]).startswith("*")]
        aligned = all("D" in str(s[1]) for s in pointers)
        for msg in mc.gate(label, arch, info, stats.get(i), aligned and i in _ANCHORS):
            failures.append(f"FAIL sm_{arch} {label} [{mc.variant_label(fn, spec, pointers[0][0])}]: {msg}")
        if i in _ANCHORS:
            key = (label, mc.variant_label(fn, spec, pointers[0][0] if pointers else ""), arch)
            row = rows.setdefault(key, mc.Row())
            for shape in sorted(_ANCHORS[i]):
                row.add(info, stats.get(i), shape)
    if md_path:
        with open(md_path, "w") as f:
            f.write(mc.markdown_table(rows, triton.__version__))
    candidates = candidate_rows(infos, stats)
    analysed = [info for info in infos if info is not None]
    stacks = sorted({(mc.kernel_label(_WORK[i][1]), info["stack"]) for i, info in enumerate(infos)
                     if info is not None and info["stack"]})
    spill_bytes = {i: info["spill_stores"] + info["spill_loads"] for i, info in enumerate(infos) if info is not None}
    spills = sorted({(mc.kernel_label(_WORK[i][1]), _WORK[i][0], b) for i, b in spill_bytes.items() if b})
    summary = [
        f"machine code: {len(analysed)} kernels analysed, {len(stats)} disassembled at the real shapes; "
        f"max {max((x['regs'] for x in analysed), default=0)} registers; "
        f"spills: {', '.join(f'{k} sm_{a} {b} B' for k, a, b in spills) or 'none'}; "
        f"stack frames: {', '.join(f'{k} {s} B' for k, s in stacks) or 'none'}",
    ]
    if candidates:
        regs = [r["regs"] for r in candidates]
        summary.append(f"machine code: sm_90 FP8 attention launch configs: {len(candidates)} compiled "
                       f"({len({r['config'] for r in candidates})} configs x head dims x EVEN_N), "
                       f"{min(regs)}-{max(regs)} registers, spills {max(r['spill'] for r in candidates)} B max, "
                       f"QGMMA in {sum(r['qgmma'] > 0 for r in candidates)}/{len(candidates)}, "
                       f"warp-specialised partitions in {sum(r['ws_partitions'] > 0 for r in candidates)}/"
                       f"{sum('ws' in r['config'].split() for r in candidates)} ws variants")
        summary.extend(candidate_table(candidates, triton.__version__).rstrip("\n").splitlines())
    known = [f"{k} sm_{a} {b} B" for k, a, b in spills if b <= mc.known_spill_bytes(k, a)]
    if known:
        summary.append(f"machine code: accepted spills (machine_code.KNOWN_SPILLS, explained there): "
                       f"{', '.join(known)}")
    return failures, summary


def candidate_rows(infos: list, stats: dict) -> list[dict]:
    """One dict per compiled sm_90 FP8 attention launch config (stored default, candidate or probe), head dim and
    EVEN_N: the machine-code facts the GPU run's timings of those configs are read against."""
    from .attention._kernels import PROBE_CONFIGS, config_label, kernel_configs
    from .machine_code import FP8_ATTENTION_KERNEL, kernel_label

    rows = {}
    for i, info in enumerate(infos):
        arch, fn, kwargs, _bound, _spec, _opts = _WORK[i]
        if info is None or arch != 90 or kernel_label(fn) != FP8_ATTENTION_KERNEL:
            continue
        cfg = {"BLOCK_M": kwargs["BLOCK_M"], "BLOCK_N": kwargs["BLOCK_N"], "num_warps": kwargs.get("num_warps", 4),
               "num_stages": kwargs.get("num_stages", 3), "tma": bool(kwargs.get("USE_TMA")),
               "warp_specialize": bool(kwargs.get("WARP_SPECIALIZE"))}
        d = kwargs["D"]
        label = config_label(cfg)
        stored = [config_label(c) for c in kernel_configs(d, (9, 0))]
        role = ("default" if label == stored[0] else "candidate" if label in stored
                else "probe" if label in [config_label(c) for c in PROBE_CONFIGS.get((90, d), [])] else "other")
        st = stats.get(i)
        row = {"config": label, "role": role, "D": d, "EVEN_N": int(bool(kwargs["EVEN_N"])), "regs": info["regs"],
               "spill": info["spill_stores"] + info["spill_loads"],
               "smem": info["static_shared"] + info["dynamic_shared"], "warps": info["num_warps"],
               "qgmma": st.matrix["QGMMA"] if st else -1, "ldgsts": st.async_copies["LDGSTS"] if st else -1,
               "utmaldg": st.async_copies["UTMALDG"] if st else -1, "wgmma_waits": st.wgmma_waits if st else -1,
               "cp_async_groups": info["ptx_cp_async_groups"], "ws_partitions": info["ws_partitions"]}
        key = (d, row["EVEN_N"], label)
        old = rows.get(key)  # several specialisations of one config: keep the worst (most registers)
        if old is None or row["regs"] > old["regs"]:
            rows[key] = row
    return [rows[k] for k in sorted(rows)]


def candidate_table(rows: list[dict], triton_version: str) -> str:
    lines = ["| config | role | D | EVEN_N | triton | regs | spill B | smem B | warps | QGMMA | LDGSTS | UTMALDG "
             "| wgmma waits (SASS) | cp.async groups (PTX) | ws partitions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['role']} | {r['D']} | {r['EVEN_N']} | {triton_version} | {r['regs']} "
                     f"| {r['spill']} | {r['smem']} | {r['warps']} | {r['qgmma']} | {r['ldgsts']} | {r['utmaldg']} "
                     f"| {r['wgmma_waits']} | {r['cp_async_groups']} | {r['ws_partitions']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdm_kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 86, 89, 90],
                        help="compute capability to compile for (repeatable; default 80, 89 and 90)")
    parser.add_argument("--quick", action="store_true", help="a representative subset of the launch shapes")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # a handful: the checker's own test
    parser.add_argument("--force-fp8", action="store_true",
                        help="also compile the FP8 attention kernels below sm_89 (they must fail: a self-test)")
    parser.add_argument("--report", action="store_true",
                        help="machine-code report: registers, stack, spills, shared memory, SASS access widths and "
                             "matrix instructions; fails on a spill, a hot kernel without 128-bit accesses at the real "
                             "shapes, FP8 attention without QGMMA on sm_90")
    parser.add_argument("--report-md", metavar="PATH", help="with --report: write the per-kernel table (markdown)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    args = parser.parse_args(argv)
    archs = args.arch or [80, 89, 90]
    try:
        import triton
    except ImportError:
        print("compile_check: triton is not installed", file=sys.stderr)
        return 2
    start = time.perf_counter()
    launches, failures = collect("smoke" if args.smoke else "quick" if args.quick else "full")
    kernels = sorted({launch.fn.__name__ for launch in launches})
    if args.report_md and not args.report:
        parser.error("--report-md needs --report")
    compiled, skipped, compile_failures, infos = compile_all(launches, archs, max(1, args.jobs), args.force_fp8,
                                                             extremes_only=args.quick or args.smoke,
                                                             report=args.report)
    failures.extend(compile_failures)
    if args.report:
        report_failures, summary = machine_code_report(infos, args.report_md)
        failures.extend(report_failures)
        for line in summary:
            print(line)
    for line in failures:
        print(line)
    elapsed = time.perf_counter() - start
    status = "OK" if not failures else f"{len(failures)} FAILED"
    print(f"compile_check: triton {triton.__version__}, sm_{'/sm_'.join(map(str, archs))}, {len(kernels)} kernels, "
          f"{len(launches)} launches, {compiled} distinct compilations ({skipped} FP8 launches skipped below "
          f"sm_{FP8_MIN_ARCH}), {elapsed:.0f} s: {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
