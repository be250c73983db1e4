"""Fused ops: Triton kernels (``cdm_kernels::*``) and C++ CPU kernels (``cdm_kernels_cpp::*``)
behind ``torch.library`` custom ops with fake functions and autograd formulas, registered
as the "triton" and "cpp" backends of ``cdm_kernels.backend`` (same signatures as
``cdm_kernels.reference``). Imported lazily by the backend on first use.
"""

from __future__ import annotations

from ..backend import register
from . import euler, flow_matching, lincomb, renoise, score_difference
from .utils import NS_CPP, NS_TRITON, cpp_available, cpp_supports, triton_supports

OP_NAMES = ("euler_extrapolate", "euler_step", "renoise", "predict_x0_renoise", "dm_loss", "cfg_loss",
            "flow_matching_loss")
_MODULES = (euler, renoise, score_difference, flow_matching)


def public_functions(ns: str) -> dict:
    """name -> function with the reference signature, running the ops of namespace ``ns``."""
    fns = {}
    for module in _MODULES:
        fns.update(module.make_public(ns))
    return fns


TRITON = public_functions(NS_TRITON)
for _name in OP_NAMES:
    register("triton", _name, TRITON[_name], supports=triton_supports)

CPP = public_functions(NS_CPP) if cpp_available() else {}
for _name, _fn in CPP.items():
    register("cpp", _name, _fn, supports=cpp_supports)

__all__ = ["OP_NAMES", "TRITON", "CPP", "public_functions", "lincomb"]
