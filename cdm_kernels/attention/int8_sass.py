"""Machine-code report of the INT8-QK attention kernel, without a GPU.

    python -m cdm_kernels.attention.int8_sass [--arch 80 --arch 86 ...] [--head-dim 64] [--dtype bf16]

Compiles the kernels for each target (``_int8_kernels.aot_compile``: triton's bundled ptxas), disassembles
the cubin with the ``cuobjdump`` shipped in the triton wheel and counts the tensor-core instructions of the
attention kernel: IMMA (the int8 QK^T MMA) and HMMA (the fp16/bf16 PV MMA) on sm_80/86/89; on sm_90
Triton may emit wgmma instead (HGMMA/IGMMA in SASS). Also checks the PTX for the round-half-even adds
(1.5 * 2^23 = 0f4B400000, not contracted into an FMA). Exit 1 when the attention kernel of an Ampere
target has no IMMA, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile


def cuobjdump_path() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def sass(cubin: bytes, tool: str) -> str:
    with tempfile.TemporaryDirectory(prefix="cdm-sass-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


def mma_counts(sass_text: str) -> dict[str, int]:
    """Tensor-core opcodes (IMMA, HMMA, HGMMA, IGMMA, ...) and how often each occurs.

    Opcodes only: the `.MMA` modifier of other instructions (`HFMA2.MMA`: an FMA issued on the MMA pipe) is not one.
    """
    ops = re.findall(r"(?<![.\w])([A-Z]*MMA)(?:\.[A-Z0-9.]+)?\b", sass_text)
    return dict(collections.Counter(ops))


def report(arch: int, head_dim: int, dtype: str, tool: str) -> dict:
    from ._int8_kernels import aot_compile

    out = aot_compile(arch, head_dim, dtype, even_n=False)
    attn = out["attention"]
    text = sass(attn["cubin"], tool)
    return {
        "arch": arch, "head_dim": head_dim, "dtype": dtype,
        "mma": mma_counts(text),
        "ptx_int8_mma": len(re.findall(r"mma\.sync\.aligned\.\S*s8\.s8", attn["ptx"]))
        + len(re.findall(r"wgmma\.mma_async\S*s8", attn["ptx"])),
        "rne_adds": len(re.findall(r"add\.f32\s[^;]*0f4B400000", out["quantize"]["ptx"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdm_kernels.attention.int8_sass",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 86, 89, 90])
    parser.add_argument("--head-dim", type=int, action="append", choices=[64, 128])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("int8_sass: unset TRITON_INTERPRET (it must be 0 or absent)", file=sys.stderr)
        return 2
    tool = cuobjdump_path()
    if tool is None:
        print("int8_sass: cuobjdump not found (triton wheel without its NVIDIA binaries?)", file=sys.stderr)
        return 2
    import triton

    ok = True
    print(f"triton {triton.__version__}; attention kernel tensor-core instructions (SASS) per target")
    for arch in args.arch or [80, 86, 89, 90]:
        for d in args.head_dim or [64, 128]:
            r = report(arch, d, args.dtype, tool)
            print(f"sm_{arch} D={d} {args.dtype}: SASS {r['mma']}, PTX int8 MMAs {r['ptx_int8_mma']}, "
                  f"quantize RNE adds {r['rne_adds']}")
            if arch < 90 and r["mma"].get("IMMA", 0) == 0:
                print(f"FAIL sm_{arch} D={d}: no IMMA in the attention kernel")
                ok = False
            if r["rne_adds"] == 0:
                print(f"FAIL sm_{arch} D={d}: the quantize kernel lost its round-half-even add")
                ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
