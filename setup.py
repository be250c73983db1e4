"""Build script: metadata lives in pyproject.toml; this file only adds the optional
C++ CPU extension (csrc/) when it can be built.

The extension is skipped cleanly (pure-Python install) when torch is not importable
in the build environment, when there is no C++ compiler, when compiling or linking it
fails, when csrc/ holds no sources, or when CDM_KERNELS_NO_CPP=1. Install with
`pip install --no-build-isolation -e .` so the build sees the environment's torch instead of
downloading another one.
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _cpp_extension_kwargs():
    if os.environ.get("CDM_KERNELS_NO_CPP") == "1":
        print("cdm-kernels: CDM_KERNELS_NO_CPP=1, skipping the C++ extension", file=sys.stderr)
        return {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return {}
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        print("cdm-kernels: no C++ compiler found, skipping the C++ extension", file=sys.stderr)
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("cdm-kernels: torch not importable at build time, skipping the C++ extension",
              file=sys.stderr)
        return {}
    flags = ["-O3", "-fopenmp", "-march=x86-64-v2", "-std=c++17"]
    if os.uname().machine not in ("x86_64", "AMD64"):
        flags.remove("-march=x86-64-v2")
    ext = CppExtension(
        name="cdm_kernels._C",
        sources=sources,
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    base = BuildExtension.with_options(use_ninja=False)

    class OptionalBuildExtension(base):
        """A compile or link failure (e.g. a compiler without OpenMP) skips the extension, never the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure means "no C++ backend"
                print(f"cdm-kernels: building the C++ extension failed ({type(exc).__name__}: {exc}); "
                      "installing without it (the reference backend serves the CPU)", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                print(f"cdm-kernels: building {ext.name} failed ({type(exc).__name__}: {exc}); skipped",
                      file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_cpp_extension_kwargs())
