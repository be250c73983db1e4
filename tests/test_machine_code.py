"""The machine-code report's parsers and gates (cdm_kernels.machine_code), on checked-in SASS and one tiny compile."""

import importlib.util
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
import importlib.util
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


def test_tma_variant_gate_and_wgmma_wait_count():
    fp8 = mc.FP8_ATTENTION_KERNEL
    base = SNIPPET + "\n/*3000*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ;"
    plain = mc.sass_stats(base + "\n/*3010*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64] ;"
                          "\n/*3020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;")
    assert plain.wgmma_waits == 1
    # A TMA variant whose tensor descriptors came out as cp.async copies did not get what it was compiled for...
    fails = mc.gate(fp8, 90, {**INFO, "use_tma": True}, plain, True)
    assert any("without UTMALDG" in f for f in fails)
    assert mc.gate(fp8, 90, {**INFO, "use_tma": False}, plain, True) == []  # ...the pointer variant did
    tma = mc.sass_stats(base + "\n/*3010*/                   UTMALDG.2D [UR8], [UR10], desc[UR12] ;")
    assert tma.async_copies["UTMALDG"] == 1 and mc.gate(fp8, 90, {**INFO, "use_tma": True}, tma, True) == []


CANDIDATES = '''
import json, sys
import torch
from cdm_kernels import compile_check as cc
from cdm_kernels import machine_code as mc

d = int(sys.argv[1])
# The launches the package makes on an sm_90 GPU at one real shape (S = 4429: the last key block partial), recorded
# and specialised like a GPU launch (the compile check's own path), for every stored config and probe.
launches = []
with cc.triton_on_cpu_tensors(), cc.recording(launches, [f"fp8-attention {cc.SM90_ONLY} D={d} S=4429"]):
    cc.exercise_attention(1, 2, 4429, d, torch.bfloat16, "fp8-sm90")
launches = [x for x in launches if x.fn.__name__ == "_fp8_attention_fwd_kernel"]
cc.plan(launches, [90], report=True)
cc._REPORT[0] = True
results = [cc._compile_one(i) for i in range(len(cc._WORK))]
assert not any(err for err, _info in results), results
infos = [info for _err, info in results]
sass = mc.disassemble_many(90, [info["text"] for info in infos])
stats = {i: mc.sass_stats(text) for i, text in enumerate(sass)}
rows = cc.candidate_rows(infos, stats)
fails = [mc.gate(mc.FP8_ATTENTION_KERNEL, 90, info, stats[i], True) for i, info in enumerate(infos)]
hot_local = [stats[i].hot_local + stats[i].local_stores + stats[i].local_loads for i in range(len(infos))]
print(json.dumps({"rows": rows, "fails": fails, "local": hot_local, "ptx_tma": [i["ptx_tma_loads"] for i in infos],
                  "compiled": len(infos)}))
'''


@pytest.mark.parametrize("d", [64])
def test_every_sm90_fp8_attention_candidate_passes_the_machine_code_gates(tmp_path, d):
    """Each stored sm_90 launch config (default and candidates) and the probe, compiled ahead for sm_90 with the
    installed Triton at one shape (S not a multiple of the key block): FP8 wgmma (QGMMA), no spill and no local
    memory, a register count within the 255 limit, the K/V copies asynchronous (cp.async, or TMA for the TMA
    variants), and the wgmma waits in place."""
    pytest.importorskip("triton")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    script = tmp_path / "candidates.py"
    script.write_text(textwrap.dedent(CANDIDATES))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), str(d)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    from cdm_kernels.attention._kernels import PROBE_CONFIGS, config_label, kernel_configs

    rows = out["rows"]
    stored = [config_label(c) for c in kernel_configs(d, (9, 0))]
    assert [r["config"] for r in rows if r["role"] in ("default", "candidate")] == sorted(stored)
    assert {r["config"] for r in rows if r["role"] == "probe"} == {config_label(c) for c in PROBE_CONFIGS[(90, d)]}
    assert out["fails"] == [[]] * out["compiled"]  # the report's gates: QGMMA, async K/V copies, UTMALDG for TMA
    assert out["local"] == [0] * out["compiled"]  # no local memory at all (spills or stack arrays)
    for r in rows:
        assert r["qgmma"] > 0 and r["spill"] == 0, r
        assert 0 < r["regs"] <= 255, r
        assert r["wgmma_waits"] > 0, r  # wgmma is asynchronous: its results are waited for before the softmax
        if "tma" in r["config"].split():
            assert r["utmaldg"] > 0, r
        else:
            assert r["ldgsts"] > 0 and r["cp_async_groups"] >= 2, r  # cp.async stages
    # the stored configs differ in machine code (no two candidates time the same kernel)
    timed = [r for r in rows if r["role"] != "probe"]
    assert len({(r["regs"], r["ldgsts"], r["utmaldg"], r["qgmma"], r["smem"]) for r in timed}) == len(timed)
