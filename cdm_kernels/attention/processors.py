"""diffusers attention processors that run FP8 attention for passes that need no gradient.

``patch_attention(model, mode)`` swaps our processors in for diffusers' stock ones:

- SD3 / SD3.5 (``JointAttnProcessor2_0`` on ``Attention`` modules, joint and dual attention),
- Flux (``FluxAttnProcessor`` on ``FluxAttention`` modules),
- LongCat-Image (``LongCatImageAttnProcessor``: Flux's code with its own projections helper).

Each of ours repeats the stock processor's code line for line and differs only in the
attention call: in mode "fp8_no_grad" it calls ``fp8_attention`` when no gradient can flow
through the attention (grad mode off, or q/k/v not requiring grad) and there is no mask;
otherwise (and always in mode "bf16") it makes exactly the stock call, so the result is
bit-identical to diffusers'. Mode "fp8_emulated_no_grad" replaces the kernel by its PyTorch twin
(``fp8_attention_reference``: the same e4m3 roundings, any device, any head dim, slower than
SDPA): for measuring what FP8 numerics do to training quality where the kernel cannot run,
e.g. the digits demo on CPU (head dim 32). Modes "int8_no_grad" and "int8_emulated_no_grad" do the
same with the INT8-QK kernel (``fp8_attention(path="int8")``, head dims 64/128, SDPA otherwise) and its
twin (``int8_attention_reference``). ("fp8_no_grad" already takes the INT8-QK kernel on A100-class GPUs,
through path="auto".) Processors of other types are left in place and reported.
``unpatch_attention(model)`` restores the original processor objects.

``backend`` (see ``sdpa_backend.py``) picks the exact attention every pass that does not take the 8-bit kernel
runs (grad and no-grad): "sdpa-default" (the default) is the stock call unchanged; "auto" states an SDPA kernel
priority per device (cuDNN on sm_90 with cuDNN >= 9.15.1, flash elsewhere, FA3 where importable); "cudnn",
"flash", "efficient", "math", "fa3", "te" by name. Mode "bf16" with a backend other than "sdpa-default" is the
way to get the fast exact attention without any 8-bit pass.

Plain Python processors, so torch.compile traces through them (``fp8_attention`` is one
opaque custom op to the compiler).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .fp8_attention import SUPPORTED_HEAD_DIMS, fp8_attention
from .int8_attention import SUPPORTED_INT8_HEAD_DIMS
from .int8_reference import int8_attention_reference
from .reference import fp8_attention_reference
from .sdpa_backend import check_backend, choose_backend, device_facts, run_attention, sdpa_context

log = logging.getLogger("cdm_kernels")

MODES = ("fp8_no_grad", "fp8_emulated_no_grad", "int8_no_grad", "int8_emulated_no_grad", "bf16")
_ORIGINALS_ATTR = "_cdm_attn_original_processors"


def _stock_classes() -> dict[str, type]:
    classes = {}
    try:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        classes["sd3"] = JointAttnProcessor2_0
    except ImportError:  # pragma: no cover - depends on the diffusers version
        pass
    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        classes["flux"] = FluxAttnProcessor
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers.models.transformers.transformer_longcat_image import LongCatImageAttnProcessor

        classes["longcat"] = LongCatImageAttnProcessor
    except ImportError:  # pragma: no cover - diffusers before 0.36
        pass
    return classes


class _FP8ProcessorBase:
    def __init__(self, mode: str = "fp8_no_grad", backend: str = "sdpa-default"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_backend(backend)
        self.mode = mode
        self.backend = backend

    def _choice(self, query: torch.Tensor, seq_len: int, attention_mask=None):
        return choose_backend(self.backend, device_facts(query.device), seq_len=seq_len,
                              has_mask=attention_mask is not None)

    def _use_fp8(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask=None) -> bool:
        if self.mode == "bf16" or attention_mask is not None:
            return False
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return False
        if self.mode == "int8_no_grad":
            return q.shape[-1] in SUPPORTED_INT8_HEAD_DIMS
        return self.mode in ("fp8_emulated_no_grad", "int8_emulated_no_grad") or q.shape[-1] in SUPPORTED_HEAD_DIMS

    def _fp8(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp8_emulated_no_grad":
            return fp8_attention_reference(q, k, v).to(q.dtype)
        if self.mode == "int8_emulated_no_grad":
            return int8_attention_reference(q, k, v).to(q.dtype)
        if self.mode == "int8_no_grad":
            return fp8_attention(q, k, v, path="int8")
        return fp8_attention(q, k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, backend={self.backend!r})"


class CDMJointAttnProcessor(_FP8ProcessorBase):
    """SD3's ``JointAttnProcessor2_0`` with FP8 attention for no-grad passes."""

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        if self._use_fp8(query, key, value):
            hidden_states = self._fp8(query, key, value)
        elif self.backend == "sdpa-default":
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            hidden_states = run_attention(query, key, value, backend=self.backend)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class CDMFluxAttnProcessor(_FP8ProcessorBase):
    """Flux's ``FluxAttnProcessor`` with FP8 attention for no-grad passes."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, mode: str = "fp8_no_grad", backend: str = "sdpa-default"):
        super().__init__(mode, backend)
        # Imported here, not per call: keeps `import cdm_kernels` free of diffusers and the traced code simple.
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        self._dispatch_attention_fn = dispatch_attention_fn
        self._apply_rotary_emb = apply_rotary_emb
        self._get_qkv_projections = _get_qkv_projections

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = self._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = self._apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = self._apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self._use_fp8(query, key, value, attention_mask) and self._parallel_config is None:
            # (B, S, H, D) -> (B, H, S, D) views; the output's memory is (B, S, H, D) already.
            hidden_states = self._fp8(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            hidden_states = hidden_states.transpose(1, 2)
        else:
            hidden_states = self._exact(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        return hidden_states


    def _exact(self, query, key, value, attention_mask):
        """The stock dispatch call, under our backend choice when diffusers' own backend is its default."""
        if self.backend == "sdpa-default" or self._attention_backend is not None or self._parallel_config is not None:
            return self._dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                               backend=self._attention_backend, parallel_config=self._parallel_config)
        choice = self._choice(query, key.shape[1], attention_mask)
        if choice.kind in ("fa3", "te"):  # (B, S, H, D) in and out, like the dispatch
            return run_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 backend=self.backend).transpose(1, 2)
        with sdpa_context(choice):
            return self._dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                               backend=self._attention_backend, parallel_config=self._parallel_config)


class CDMLongCatAttnProcessor(CDMFluxAttnProcessor):
    """LongCat-Image's ``LongCatImageAttnProcessor``: Flux's processor code with LongCat's projections helper
    (``unflatten(-1, (heads, -1))`` there and ``(-1, head_dim)`` here split the same; the ``.contiguous()`` before
    the output projections changes no value)."""

    def __init__(self, mode: str = "fp8_no_grad", backend: str = "sdpa-default"):
        super().__init__(mode, backend)
        from diffusers.models.transformers.transformer_longcat_image import _get_qkv_projections, apply_rotary_emb

        self._apply_rotary_emb = apply_rotary_emb
        self._get_qkv_projections = _get_qkv_projections


_OURS = (CDMJointAttnProcessor, CDMFluxAttnProcessor)  # the LongCat one is a Flux subclass


def _make_processor(original, mode: str, backend: str = "sdpa-default"):
    """Our processor replacing `original`, or None when we have none for its type."""
    stock = _stock_classes()
    # Exact type match: a subclass (IP-Adapter, PAG, fused QKV, ...) does more than we repeat.
    if "sd3" in stock and type(original) is stock["sd3"]:
        return CDMJointAttnProcessor(mode, backend)
    flux_like = {"flux": CDMFluxAttnProcessor, "longcat": CDMLongCatAttnProcessor}
    for family, ours in flux_like.items():
        if family not in stock or type(original) is not stock[family]:
            continue
        proc = ours(mode, backend)
        proc._attention_backend = getattr(original, "_attention_backend", None)
        proc._parallel_config = getattr(original, "_parallel_config", None)
        return proc
    return None


def _attention_modules(model: torch.nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            yield name, module


def patch_attention(model: torch.nn.Module, mode: str = "fp8_no_grad",
                    backend: str = "sdpa-default") -> dict[str, list[str]]:
    """Install our attention processors on every SD3/Flux/LongCat attention module of `model`.

    mode "fp8_no_grad": FP8 attention whenever no gradient flows through the attention, SDPA
    otherwise; "fp8_emulated_no_grad": the same with the kernel's PyTorch twin (any device and head
    dim; for quality studies); "int8_no_grad" / "int8_emulated_no_grad": the same with the INT8-QK
    kernel / its twin; "bf16": never 8-bit. ``backend``: the exact attention of every other pass
    (``sdpa_backend.BACKENDS``; "sdpa-default", the default, is the stock call, bit-identical to diffusers).
    Patching an already patched model only changes the mode and backend. Works on any nn.Module containing diffusers
    attention modules (a bare transformer or a wrapper around one).

    Returns {"patched": [module names], "skipped": ["name (ProcessorClass)", ...]}.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_backend(backend)
    originals: dict[str, object] = getattr(model, _ORIGINALS_ATTR, None) or {}
    patched, skipped = [], []
    for name, module in _attention_modules(model):
        current = module.processor
        if isinstance(current, _OURS):
            current.mode = mode
            current.backend = backend
            patched.append(name)
            continue
        ours = _make_processor(current, mode, backend)
        if ours is None:
            skipped.append(f"{name} ({type(current).__name__})")
            continue
        originals[name] = current
        module.set_processor(ours)
        patched.append(name)
    # A plain attribute (not a submodule or buffer): invisible to state_dict and to .to().
    object.__setattr__(model, _ORIGINALS_ATTR, originals)
    log.info("cdm_kernels.patch_attention(mode=%s, backend=%s): %d attention modules patched, %d left as they were%s",
             mode, backend, len(patched), len(skipped), f": {', '.join(skipped)}" if skipped else "")
    return {"patched": patched, "skipped": skipped}


def unpatch_attention(model: torch.nn.Module) -> int:
    """Restore the processors `patch_attention` replaced; returns how many were restored."""
    originals: dict[str, object] = getattr(model, _ORIGINALS_ATTR, None) or {}
    modules = dict(_attention_modules(model))
    restored = 0
    for name, proc in originals.items():
        module = modules.get(name)
        if module is not None and isinstance(module.processor, _OURS):
            module.set_processor(proc)
            restored += 1
    if hasattr(model, _ORIGINALS_ATTR):
        object.__delattr__(model, _ORIGINALS_ATTR)
    return restored


def is_patched(model: torch.nn.Module) -> bool:
    return any(isinstance(m.processor, _OURS) for _, m in _attention_modules(model))


__all__ = ["patch_attention", "unpatch_attention", "is_patched", "CDMJointAttnProcessor", "CDMFluxAttnProcessor",
           "CDMLongCatAttnProcessor", "MODES"]
