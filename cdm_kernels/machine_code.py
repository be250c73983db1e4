"""What the GPU compiler made of each kernel, read from the cubin without a GPU.

Used by ``python -m cdm_kernels.compile_check --report``: per compiled kernel the register count,
stack frame, shared memory and spills (``cuobjdump -res-usage`` and the ``ptxas -v`` log of the
compilation), and for the kernels at the real shapes the instruction mix of the SASS: global load
and store widths (``LDG.E.128`` is one 16-byte access per thread: what a bandwidth-bound kernel
needs), matrix instructions (``HGMMA``/``QGMMA``: Hopper wgmma, bf16 and FP8; ``HMMA``/``IMMA``:
mma.sync), local-memory traffic and the sin/cos slow-path guard. The binaries (cuobjdump,
nvdisasm) ship in the triton wheel, so this runs on any CPU machine that has triton.

Disassembly: nvdisasm costs ~0.4 s per call whatever the input size, so the ``.text`` sections
of all kernels of one architecture are concatenated into one raw instruction stream and
disassembled in one call (``nvdisasm -b SM90``), then split again by offset.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field

# Kernels that move whole latents (bandwidth bound): at aligned shapes they must load (and, for those
# that write a latent-sized output, store) with 128-bit accesses. The loss forwards store a few partial sums
# (and, in their last program, the loss): their stores are not hot.
HOT_LOAD_KERNELS = frozenset({
    "lincomb._lincomb_kernel", "euler._euler_step_kernel", "renoise._predict_renoise_kernel",
    "score_difference._forward_kernel", "score_difference._backward_kernel",
    "flow_matching._forward_kernel", "flow_matching._backward_kernel", "_kernels._quantize_qkv_kernel",
})
HOT_STORE_KERNELS = HOT_LOAD_KERNELS - {"score_difference._forward_kernel", "flow_matching._forward_kernel"}
FP8_ATTENTION_KERNEL = "_kernels._fp8_attention_fwd_kernel"
INT8_ATTENTION_KERNEL = "_int8_kernels._int8_attention_fwd_kernel"
# Spills measured and accepted: (kernel label, arch, triton major.minor) -> max spill bytes (stores + loads).
# Anything else, or more bytes, fails. Two kinds (benchmarks/RESULTS_ops.md, machine-code report):
# - one 32-bit index register that ptxas moves to local memory in a seeded (in-kernel Box-Muller) kernel: one
#   STL at entry, one LDL per program (lincomb) or per loop iteration (flow_matching forward, triton 3.9 sm_90,
#   only the variant with unaligned pointers): an L1 hit next to 1,024 Philox draws per program.
# - FP8 attention at D=128 on sm_89 with triton 3.6: register pressure (255 registers; 8 B stores, 4 B loads).
#   sm_89 (Ada) is not a target machine here (H100/H200 are); the fix would be an sm_89 launch config
#   (e.g. BLOCK_M=64 for D=128), to be measured on an Ada GPU first.
# - the score-difference loss forward on sm_89 with triton 3.9, one variant (fp16, both sigmas Python floats):
#   since the finalize moved into the kernel (one launch per loss forward), ptxas routes the chunk loop's exit
#   through a CALL.REL and keeps three of the per-thread accumulators in local memory (48 B stores, 24 B
#   loads; 70-80 registers, so not register pressure): L1 hits beside five latent loads per element. Its
#   other five sm_89 variants (dtype x sigma kinds) and every sm_80/sm_90 variant are clean.
KNOWN_SPILLS = {
    ("lincomb._lincomb_kernel", 80, "3.6"): 8,
    ("lincomb._lincomb_kernel", 80, "3.9"): 8,
    ("flow_matching._forward_kernel", 90, "3.9"): 8,
    ("_kernels._fp8_attention_fwd_kernel", 89, "3.6"): 12,
    ("score_difference._forward_kernel", 89, "3.9"): 72,
}


def known_spill_bytes(label: str, arch: int) -> int:
    import triton

    return KNOWN_SPILLS.get((label, arch, ".".join(triton.__version__.split(".")[:2])), 0)
# libdevice's sinf/cosf take the Payne-Hanek slow path for |x| >= 105615 (0x47ce4780); below it a
# 3-term Cody-Waite reduction in registers.
SINCOS_SLOW_PATH_BOUND = 105615.0


def kernel_label(fn) -> str:
    """`module._kernel` (flow_matching and score_difference both have a _forward_kernel)."""
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ----------------------------------------------------------------------------- cubin (ELF) contents

def elf_sections(blob: bytes) -> dict[str, bytes]:
    """Section name -> bytes of a little-endian ELF64 (a cubin)."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        raise ValueError("cubin: not an ELF64 file")
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    names_off = headers[shstrndx][4]
    out = {}
    for name, _type, _flags, _addr, off, size in headers:
        end = blob.index(b"\0", names_off + name)
        out[blob[names_off + name:end].decode()] = blob[off:off + size]
    return out


def kernel_text(cubin: bytes, name: str) -> bytes:
    return elf_sections(cubin)[f".text.{name}"]


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack frame, static shared memory and local memory of the cubin's kernel."""
    with tempfile.TemporaryDirectory(prefix="cdm-res-") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    match = _RES.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {out[:300]!r}")
    regs, stack, shared, local = map(int, match.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict[str, int] | None:
    match = _PTXAS.search(log)
    if match is None:
        return None
    stack, stores, loads = map(int, match.groups())
    return {"ptxas_stack": stack, "spill_stores": stores, "spill_loads": loads}


# ----------------------------------------------------------------------------- compilation with the ptxas log

def _log_path(kernel_hash: str) -> str:
    import triton

    return os.path.join(triton.knobs.cache.dir, "cdm-ptxas-logs", f"{kernel_hash}.txt")


def compile_with_log(compile_fn):
    """Run `compile_fn()` (a triton.compile call) and return (kernel, ptxas -v log or None).

    Triton runs ptxas with -v but deletes the log; with dump_ptxas_log it prints it. A kernel served
    from Triton's cache was not assembled, so the log is kept beside the cache, keyed by the kernel hash.
    """
    import triton

    nvidia = triton.knobs.nvidia
    saved = nvidia.dump_ptxas_log
    buf = io.StringIO()
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            kernel = compile_fn()
    finally:
        nvidia.dump_ptxas_log = saved
    log = buf.getvalue()
    path = _log_path(kernel.metadata.hash)
    if parse_ptxas_log(log) is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(log)
        os.replace(path + ".tmp", path)
        return kernel, log
    if os.path.exists(path):
        with open(path) as f:
            return kernel, f.read()
    return kernel, None


def recompile_for_log(compile_fn) -> str | None:
    """The ptxas log of a kernel whose log was lost: compile again into a throw-away cache."""
    import triton

    saved = triton.knobs.cache.dir
    with tempfile.TemporaryDirectory(prefix="cdm-ptxas-") as tmp:
        triton.knobs.cache.dir = tmp
        try:
            _kernel, log = compile_with_log(compile_fn)
        finally:
            triton.knobs.cache.dir = saved
    return log


def analyse(compile_fn, want_text: bool) -> dict:
    """Compile and describe one kernel: resources, spills, and (want_text) its .text for the SASS pass."""
    kernel, log = compile_with_log(compile_fn)
    cubin = kernel.asm["cubin"]
    info = resource_usage(cubin)
    info["dynamic_shared"] = int(getattr(kernel.metadata, "shared", 0) or 0)
    info["num_warps"] = int(kernel.metadata.num_warps)
    # Warp-specialised partitions (tl.range(warp_specialize=True)) appear as ttg.warp_specialize ops in the TTGIR;
    # a loop only marked {tt.warp_specialize} was left as it was. PTX facts of the pipelining: cp.async groups
    # committed, TMA tensor copies, wgmma group waits.
    ttgir = kernel.asm.get("ttgir", "")
    info["ws_partitions"] = ttgir.count("ttg.warp_specialize")
    ptx = kernel.asm.get("ptx", "")
    info["ptx_cp_async_groups"] = ptx.count("cp.async.commit_group")
    info["ptx_tma_loads"] = ptx.count("cp.async.bulk.tensor")
    info["ptx_wgmma_waits"] = ptx.count("wgmma.wait_group")
    parsed = parse_ptxas_log(log) if log else None
    if parsed is None and info["stack"] > 0:  # a stack frame: spills or a local array; only ptxas can tell
        log = recompile_for_log(compile_fn)
        parsed = parse_ptxas_log(log) if log else None
    if parsed is None and info["stack"] == 0:
        parsed = {"ptxas_stack": 0, "spill_stores": 0, "spill_loads": 0}  # nothing can spill without a stack
    if parsed is None:
        raise RuntimeError("no ptxas -v log for a kernel with a stack frame")
    info.update(parsed)
    if want_text or info["spill_stores"] or info["spill_loads"]:  # a spill: its SASS decides whether it is hot
        info["text"] = kernel_text(cubin, kernel.metadata.name)
    return info


# ----------------------------------------------------------------------------- SASS

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def disassemble_many(arch: int, texts: list[bytes]) -> list[str]:
    """SASS of each raw .text, in one nvdisasm call (sections are multiples of 16-byte instructions)."""
    if not texts:
        return []
    starts, pos = [], 0
    for text in texts:
        if len(text) % 16:
            raise ValueError("a .text section that is not a whole number of 16-byte instructions")
        starts.append(pos)
        pos += len(text)
    with tempfile.TemporaryDirectory(prefix="cdm-sass-") as tmp:
        path = os.path.join(tmp, "all.bin")
        with open(path, "wb") as f:
            f.write(b"".join(texts))
        out = subprocess.run([tool("nvdisasm"), "-b", f"SM{arch}", "-ndf", path], capture_output=True, text=True,
                             check=True).stdout
    pieces: list[list[str]] = [[] for _ in texts]
    import bisect

    for line in out.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            pieces[bisect.bisect_right(starts, int(m.group(1), 16)) - 1].append(line.strip())
    return ["\n".join(p) for p in pieces]


def _width(opcode: str) -> int:
    parts = opcode.split(".")
    for bits in ("128", "64"):
        if bits in parts:
            return int(bits)
    if any(p in ("U16", "S16") for p in parts):
        return 16
    if any(p in ("U8", "S8") for p in parts):
        return 8
    return 32


@dataclass
class SassStats:
    loads: collections.Counter = field(default_factory=collections.Counter)  # width in bits -> count (LDG/LDGSTS)
    stores: collections.Counter = field(default_factory=collections.Counter)  # width -> count (STG)
    matrix: collections.Counter = field(default_factory=collections.Counter)  # HGMMA/QGMMA/HMMA/IMMA -> count
    # asynchronous global -> shared copies: LDGSTS (cp.async) and UTMALDG (TMA); what a multi-stage software
    # pipeline of K/V tiles compiles to
    async_copies: collections.Counter = field(default_factory=collections.Counter)
    # WARPGROUP.DEPBAR: waits on outstanding wgmma groups (Hopper). Fewer waits than wgmma groups means MMAs are
    # left in flight across other work; one wait per MMA means each MMA is waited for at once.
    wgmma_waits: int = 0
    local_stores: int = 0
    local_loads: int = 0
    sincos_guards: int = 0  # FSETP against 105615: the branch into the Payne-Hanek slow path
    constant_table_loads: int = 0  # LDG.E.CONSTANT: the slow path reading the 2/pi table
    instructions: int = 0
    hot_local: int = 0  # local-memory accesses outside every sin/cos slow path (executed on the fast path)


_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@(!?)(P[0-9]))?\s*BRA\s+(?:`\()?(?:0x)?([0-9a-f]+)")
_GUARD = re.compile(r"/\*([0-9a-f]{4,})\*/\s+FSETP\.GE\.AND\s+(P[0-9]),\s*PT,\s*\|?R\d+\|?,\s*105615\b")
_LOCAL = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?P[T0-9]+\s+)?(?:STL|LDL)\b")


def slow_path_regions(sass: str) -> list[tuple[int, int]]:
    """[start, end) address ranges of the Payne-Hanek slow paths of sin/cos.

    Each begins at a guard `FSETP.GE.AND Pn, PT, |x|, 105615`. Inline layout: the next `@!Pn BRA t`
    skips the slow path, which runs from that branch to t. Out-of-line layout: `@Pn BRA t` jumps to
    the slow path at t, which ends with the first unconditional BRA back (to an address below t).
    """
    branches = [(int(a, 16), pred, neg == "!", int(t, 16)) for a, _p, neg, pred, t in _BRANCH.findall(sass)]
    regions = []
    for addr_hex, pred in _GUARD.findall(sass):
        addr = int(addr_hex, 16)
        for b_addr, b_pred, negated, target in branches:
            if b_addr <= addr or b_pred != pred:
                continue
            if negated and target > b_addr:
                regions.append((b_addr, target))
            elif not negated and target > b_addr:
                back = [a for a, p, _n, t in branches if a >= target and not p and t < target]
                if back:
                    regions.append((target, min(back) + 16))
            break
    return regions


def sass_stats(sass: str) -> SassStats:
    st = SassStats()
    for m in _SASS_LINE.finditer(sass):
        opcode, operands = m.group(2), m.group(3)
        base = opcode.split(".")[0]
        st.instructions += 1
        if base in ("LDGSTS", "UTMALDG"):
            st.async_copies[base] += 1
        elif opcode.startswith("WARPGROUP.DEPBAR"):
            st.wgmma_waits += 1
        if base in ("LDG", "LDGSTS"):
            st.loads[_width(opcode)] += 1
            st.constant_table_loads += ".CONSTANT" in opcode
        elif base == "STG":
            st.stores[_width(opcode)] += 1
        elif base == "STL":
            st.local_stores += 1
        elif base == "LDL":
            st.local_loads += 1
        elif base == "FSETP" and re.search(r"\b105615\b", operands):
            st.sincos_guards += 1
    from .attention.int8_sass import mma_counts  # one tensor-core opcode counter for both reports

    st.matrix.update(mma_counts(sass))
    regions = slow_path_regions(sass)
    st.hot_local = sum(not any(lo <= int(a, 16) < hi for lo, hi in regions) for a in _LOCAL.findall(sass))
    return st


# ----------------------------------------------------------------------------- gates and the table

def gate(label: str, arch: int, info: dict, stats: SassStats | None, aligned: bool) -> list[str]:
    """Failure messages for one compiled kernel (stats: its SASS, for the kernels at the real shapes)."""
    fails = []
    # A spill fails unless every local-memory access of the kernel sits inside a sin/cos slow path, which
    # the Box-Muller argument (2 pi u, u in [0, 1)) never enters; without its SASS a spill fails.
    spilled = info["spill_stores"] + info["spill_loads"]
    known = spilled <= known_spill_bytes(label, arch)
    if spilled and not known and (stats is None or stats.hot_local):
        where = "" if stats is None else f", {stats.hot_local} local accesses on the fast path"
        fails.append(f"spills {info['spill_stores']} B stores / {info['spill_loads']} B loads{where}")
    if stats is not None and aligned:
        if label in HOT_LOAD_KERNELS and not stats.loads[128]:
            fails.append(f"no 128-bit global load (widths {dict(stats.loads)})")
        if label in HOT_STORE_KERNELS and not stats.stores[128]:
            fails.append(f"no 128-bit global store (widths {dict(stats.stores)})")
    if stats is not None and label == FP8_ATTENTION_KERNEL and arch >= 90 and not stats.matrix["QGMMA"]:
        fails.append(f"FP8 attention without QGMMA on sm_{arch} (matrix ops {dict(stats.matrix)})")
    # Its K/V tiles are meant to stream through shared memory ahead of the MMAs (num_stages >= 2): without an
    # asynchronous copy the loads sit on the critical path of every key block.
    if stats is not None and label == FP8_ATTENTION_KERNEL and arch >= 90 and not (
            stats.async_copies["LDGSTS"] or stats.async_copies["UTMALDG"]):
        fails.append(f"FP8 attention on sm_{arch} without asynchronous K/V copies (no LDGSTS/UTMALDG: not pipelined)")
    if stats is not None and label == FP8_ATTENTION_KERNEL and arch >= 90 and info.get("use_tma") and not (
            stats.async_copies["UTMALDG"]):
        fails.append(f"FP8 attention TMA variant on sm_{arch} without UTMALDG (tensor descriptors lowered to plain "
                     f"loads: copies {dict(stats.async_copies)})")
    if stats is not None and label == INT8_ATTENTION_KERNEL and arch < 90 and not stats.matrix["IMMA"]:
        fails.append(f"INT8 attention without IMMA on sm_{arch} (matrix ops {dict(stats.matrix)})")
    return fails


@dataclass
class Row:
    """One table row: a kernel variant (constexprs other than block sizes, input dtype) on one arch,
    aggregated over the real shapes that reach it (worst case of each column)."""
    regs: int = 0
    stack: int = 0
    spills: int = 0
    shared: int = 0
    ldg128: int | None = None
    ldg_narrow: int = 0
    stg128: int | None = None
    stg_narrow: int = 0
    matrix: str = ""
    local: str = ""
    sincos: str = ""
    shapes: set = field(default_factory=set)

    def add(self, info: dict, stats: SassStats | None, shape: str) -> None:
        self.regs = max(self.regs, info["regs"])
        self.stack = max(self.stack, info["stack"])
        self.spills = max(self.spills, info["spill_stores"] + info["spill_loads"])
        self.shared = max(self.shared, info["static_shared"] + info["dynamic_shared"])
        self.shapes.add(shape)
        if stats is None:
            return
        ldg = stats.loads[128]
        stg = stats.stores[128]
        self.ldg128 = ldg if self.ldg128 is None else min(self.ldg128, ldg)
        self.stg128 = stg if self.stg128 is None else min(self.stg128, stg)
        self.ldg_narrow = max(self.ldg_narrow, sum(n for w, n in stats.loads.items() if w < 128))
        self.stg_narrow = max(self.stg_narrow, sum(n for w, n in stats.stores.items() if w < 128))
        self.matrix = " ".join(f"{k} {v}" for k, v in sorted(stats.matrix.items())) or self.matrix
        if stats.local_stores or stats.local_loads:
            self.local = f"STL {stats.local_stores} / LDL {stats.local_loads}"
        if stats.sincos_guards:
            self.sincos = f"{stats.sincos_guards} guards, {stats.constant_table_loads} table loads"


def variant_label(fn, specialization, first_dtype: str) -> str:
    flags = []
    for param, spec in zip(fn.params, specialization):
        if param.is_constexpr and not param.name.startswith("BLOCK") and param.name not in ("ROUND_BF16",):
            value = spec[1]
            flags.append(f"{param.name}={int(value) if isinstance(value, bool) else value}")
    return f"{' '.join(flags)} {first_dtype}".strip()


def markdown_table(rows: dict[tuple, Row], triton_version: str, header: bool = True) -> str:
    """One row per (kernel, variant, arch); `header=False` for the rows of a second Triton under the first's."""
    lines = [
        "| kernel | variant | arch | triton | regs | spill B | stack B | smem B | LDG.128 / narrower "
        "| STG.128 / narrower | MMA | local mem (STL / LDL) | sin/cos slow path | shapes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ] if header else []
    for (label, variant, arch), r in sorted(rows.items()):
        ldg = "-" if r.ldg128 is None else f"{r.ldg128} / {r.ldg_narrow}"
        stg = "-" if r.stg128 is None else f"{r.stg128} / {r.stg_narrow}"
        lines.append(f"| {label} | {variant} | sm_{arch} | {triton_version} | {r.regs} | {r.spills} | {r.stack} "
                     f"| {r.shared} | {ldg} | {stg} | {r.matrix or '-'} | {r.local or '-'} | {r.sincos or '-'} "
                     f"| {', '.join(sorted(r.shapes))} |")
    return "\n".join(lines) + "\n"


def _keep_in_summary(kernel: str, variant: str, arch: str) -> bool:
    """The RESULTS_ops.md excerpt: sm_80 and sm_90; the fp32 inputs the trainer hands the loss / Euler ops (model
    outputs are upcast), bf16 inputs of the attention kernels."""
    if arch not in ("sm_80", "sm_90"):
        return False
    if "attention" in kernel or "quantize" in kernel:
        return variant.endswith("*bf16") or "fp8e4nv" in variant or "PV_DTYPE=bf16" in variant
    return variant.endswith("*fp32")


def merge_tables(paths: list[str], summary: bool = False) -> str:
    """Rows of several --report-md tables (one per Triton) under one header, sorted by kernel, variant, arch."""
    header, rows = [], []
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith(("| kernel", "|---")):
                    if len(header) < 2:
                        header.append(line.rstrip())
                elif line.startswith("| "):
                    cells = [c.strip() for c in line.strip().strip("|").split("|")]
                    if not summary or _keep_in_summary(cells[0], cells[1], cells[2]):
                        rows.append((cells[:4], line.rstrip()))
    return "\n".join(header + [line for _key, line in sorted(rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cdm_kernels.machine_code",
                                     description="merge compile_check --report-md tables (one per Triton)")
    parser.add_argument("tables", nargs="+")
    parser.add_argument("--summary", action="store_true", help="only the RESULTS_ops.md excerpt (sm_80/90, fp32/bf16)")
    args = parser.parse_args(argv)
    print(merge_tables(args.tables, args.summary), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
