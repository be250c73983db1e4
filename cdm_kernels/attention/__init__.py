"""8-bit attention (Triton: FP8, and INT8-QK for A100-class GPUs) for passes that need no gradient, the exact
attention backend chosen per device for every other pass, and diffusers processors using both."""

from .fp8_attention import fp8_attention, kernel_config, native_fp8_available
from .int8_attention import int8_attention, int8_kernel_config, native_int8_available
from .int8_reference import int8_attention_reference
from .processors import (
    CDMFluxAttnProcessor,
    CDMJointAttnProcessor,
    CDMLongCatAttnProcessor,
    is_patched,
    patch_attention,
    unpatch_attention,
)
from .reference import attention_float, fp8_attention_reference, sqnr_db
from .sdpa_backend import BACKENDS, DeviceFacts, choose_backend, device_facts, run_attention

__all__ = [
    "fp8_attention",
    "fp8_attention_reference",
    "int8_attention",
    "int8_attention_reference",
    "int8_kernel_config",
    "native_int8_available",
    "attention_float",
    "sqnr_db",
    "kernel_config",
    "native_fp8_available",
    "patch_attention",
    "unpatch_attention",
    "is_patched",
    "CDMJointAttnProcessor",
    "CDMFluxAttnProcessor",
    "CDMLongCatAttnProcessor",
    "BACKENDS",
    "DeviceFacts",
    "choose_backend",
    "device_facts",
    "run_attention",
]
