"""The machine-code report's parsers and gates (cdm_kernels.machine_code), on checked-in SASS and one tiny compile."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdm_kernels import machine_code as mc

SNIPPET = (Path(__file__).parent / "data" / "sass_sincos_slow_path_sm90.txt").read_text()
# A real ptxas -v log (triton 3.9's ptxas, sm_80), and one of a kernel that spills.
PTXAS_LOG = ("ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function '_scale_kernel' for 'sm_80'\n"
             "ptxas info    : Function properties for _scale_kernel\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 28 registers, used 0 barriers, 392 bytes cmem[0]\n")
INFO = {"regs": 46, "stack": 32, "static_shared": 0, "dynamic_shared": 1040, "spill_stores": 0, "spill_loads": 0}


def test_sass_stats_counts_access_widths_and_the_sincos_slow_path():
    st = mc.sass_stats(SNIPPET)
    assert st.loads[128] == 2 and st.loads[32] == 1  # two LDG.E.128, one LDG.E.CONSTANT (the 2/pi table)
    assert st.constant_table_loads == 1
    assert st.stores[32] == 1 and st.stores[128] == 0
    assert st.sincos_guards == 1
    assert (st.local_stores, st.local_loads) == (2, 3)
    regions = mc.slow_path_regions(SNIPPET)
    assert regions == [(0x2AE0, 0x2E50)]  # from `@!P2 BRA 0x2e50` after the |x| >= 105615 guard
    assert st.hot_local == 0  # every STL/LDL of the frame is inside the slow path


def test_a_local_access_outside_the_slow_path_is_a_hot_spill():
    planted = SNIPPET.replace("/*2f70*/", "/*2f70*/                   STL [R1+0x20], R9 ;\n/*2f80*/", 1)
    st = mc.sass_stats(planted)
    assert st.hot_local == 1
    fails = mc.gate("flow_matching._forward_kernel", 80, {**INFO, "spill_stores": 4, "spill_loads": 4}, st, True)
    assert any("spills 4 B stores" in f and "1 local accesses on the fast path" in f for f in fails)
    # The same spill bytes with every local access inside the slow path do not fail; without SASS they do.
    assert mc.gate("flow_matching._forward_kernel", 80, {**INFO, "spill_stores": 4}, mc.sass_stats(SNIPPET),
                   True) == []
    assert mc.gate("euler._euler_step_kernel", 90, {**INFO, "spill_stores": 4}, None, True)


def test_gates_on_access_width_and_matrix_instructions():
    st = mc.sass_stats(SNIPPET)
    assert mc.gate("flow_matching._forward_kernel", 90, INFO, st, aligned=True) == []  # no store gate: loss forward
    narrow = mc.sass_stats(SNIPPET.replace("LDG.E.128", "LDG.E.64"))
    fails = mc.gate("flow_matching._forward_kernel", 90, INFO, narrow, aligned=True)
    assert fails and "no 128-bit global load" in fails[0]
    assert mc.gate("flow_matching._forward_kernel", 90, INFO, narrow, aligned=False) == []  # unaligned: exempt
    assert any("no 128-bit global store" in f for f in mc.gate("euler._euler_step_kernel", 90, INFO, st, True))
    fp8 = mc.FP8_ATTENTION_KERNEL
    assert any("without QGMMA" in f for f in mc.gate(fp8, 90, INFO, st, True))
    wgmma = mc.sass_stats(SNIPPET + "\n/*3000*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;")
    assert wgmma.matrix["QGMMA"] == 1
    assert any("without asynchronous K/V copies" in f for f in mc.gate(fp8, 90, INFO, wgmma, True))  # not pipelined
    piped = mc.sass_stats(SNIPPET + "\n/*3000*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;"
                          "\n/*3010*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64] ;")
    assert piped.async_copies["LDGSTS"] == 1 and piped.loads[128] == 3 and mc.gate(fp8, 90, INFO, piped, True) == []
    assert mc.gate(fp8, 89, INFO, st, True) == []  # no wgmma before Hopper: not asked for there
    int8 = mc.INT8_ATTENTION_KERNEL
    assert any("without IMMA" in f for f in mc.gate(int8, 80, INFO, st, True))
    imma = mc.sass_stats(SNIPPET + "\n/*3000*/                   IMMA.16832.S8.S8 R4, R8.ROW, R12.COL, R4 ;")
    assert mc.gate(int8, 80, INFO, imma, True) == []
    # HFMA2.MMA is an FMA issued on the MMA pipe, not a matrix instruction
    pipe = mc.sass_stats(SNIPPET + "\n/*3000*/                   HFMA2.MMA R46, -RZ, RZ, 0, 0 ;")
    assert sum(pipe.matrix.values()) == 0


def test_known_spills_are_bounded():
    pytest.importorskip("triton")
    import triton

    version = ".".join(triton.__version__.split(".")[:2])
    label, arch = next((k[0], k[1]) for k in mc.KNOWN_SPILLS if k[2] == version)
    hot = mc.sass_stats(SNIPPET.replace("/*2f70*/", "/*2f70*/                   STL [R1+0x20], R9 ;\n/*2f80*/", 1))
    limit = mc.known_spill_bytes(label, arch)
    # (aligned=False: only the spill gate speaks)
    assert mc.gate(label, arch, {**INFO, "spill_stores": limit // 2, "spill_loads": limit // 2}, hot, False) == []
    assert mc.gate(label, arch, {**INFO, "spill_stores": limit, "spill_loads": 4}, hot, False)  # more: fails
    assert mc.gate(label, 89 if arch != 89 else 80, {**INFO, "spill_stores": 4, "spill_loads": 4}, hot, False)


def test_ptxas_log_parser():
    assert mc.parse_ptxas_log(PTXAS_LOG) == {"ptxas_stack": 0, "spill_stores": 0, "spill_loads": 0}
    spilled = PTXAS_LOG.replace("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
                                "8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads")
    assert mc.parse_ptxas_log(spilled) == {"ptxas_stack": 8, "spill_stores": 4, "spill_loads": 4}
    assert mc.parse_ptxas_log("no log") is None


TINY = '''
import json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cdm_kernels import machine_code as mc


@triton.jit
def _scale_kernel(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < N) * 2.0, mask=i < N)


out = {}
aligned = {(k,): [["tt.divisibility", 16]] for k in range(3)}
for name, attrs in (("aligned", aligned), ("unaligned", {})):
    src = ASTSource(_scale_kernel, {"X": "*fp32", "Y": "*fp32", "N": "i32", "BLOCK": "constexpr"}, {(3,): 1024}, attrs)
    info = mc.analyse(lambda: triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}), True)
    st = mc.sass_stats(mc.disassemble_many(90, [info.pop("text")])[0])
    out[name] = {**info, "loads": dict(st.loads), "stores": dict(st.stores)}
print(json.dumps(out))
'''


def test_a_tiny_kernel_compiled_for_sm90_has_128_bit_accesses_only_when_aligned(tmp_path):
    """The whole chain on a real cubin: ptxas log, ELF .text, nvdisasm, the width counts."""
    pytest.importorskip("triton")
    script = tmp_path / "tiny_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(textwrap.dedent(TINY))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    aligned, unaligned = out["aligned"], out["unaligned"]
    # 1024 fp32 over 128 threads: 8 per thread = two 16-byte accesses each way when the pointers are aligned
    assert aligned["loads"] == {"128": 2} and aligned["stores"] == {"128": 2}
    assert "128" not in unaligned["loads"] and unaligned["loads"].get("32", 0) == 8
    for info in (aligned, unaligned):
        assert 0 < info["regs"] < 64 and info["stack"] == 0 and info["spill_stores"] == info["spill_loads"] == 0
