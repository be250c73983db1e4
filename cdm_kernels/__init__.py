"""cdm-kernels: fused kernels and helpers for Continuous-Time Distribution Matching distillation.

Public API (a contract; see docs/python_api.md):
    euler_extrapolate, renoise, dm_loss, cfg_loss, flow_matching_loss, use_backend
plus the fused helpers the trainer uses: euler_step, predict_x0_renoise.
"""

from .api import (
    cfg_loss,
    dm_loss,
    euler_extrapolate,
    euler_step,
    flow_matching_loss,
    predict_x0_renoise,
    renoise,
)
from .attention import fp8_attention, patch_attention, unpatch_attention
from .backend import available_backends, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "euler_extrapolate",
    "renoise",
    "dm_loss",
    "cfg_loss",
    "flow_matching_loss",
    "use_backend",
    "set_backend",
    "get_backend",
    "available_backends",
    "euler_step",
    "predict_x0_renoise",
    "fp8_attention",
    "patch_attention",
    "unpatch_attention",
]
