"""FP8 attention (Triton) for passes that need no gradient, and diffusers processors using it."""

from .fp8_attention import fp8_attention, kernel_config, native_fp8_available
from .processors import CDMFluxAttnProcessor, CDMJointAttnProcessor, is_patched, patch_attention, unpatch_attention
from .reference import attention_float, fp8_attention_reference, sqnr_db

__all__ = [
    "fp8_attention",
    "fp8_attention_reference",
    "attention_float",
    "sqnr_db",
    "kernel_config",
    "native_fp8_available",
    "patch_attention",
    "unpatch_attention",
    "is_patched",
    "CDMJointAttnProcessor",
    "CDMFluxAttnProcessor",
]
