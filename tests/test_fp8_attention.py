"""FP8 attention: accuracy (SQNR vs float64 attention), kernel == reference twin, rounding,
error handling, diffusers processors (equivalence, patch/unpatch, torch.compile).

On CPU the Triton kernel runs through the interpreter (conftest sets TRITON_INTERPRET=1):
shapes stay tiny. GPU tests (real SD3/Flux shapes) carry the `gpu` mark.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import cdm_kernels.attention.processors as processors_mod
from cdm_kernels.attention import (
    attention_float,
    fp8_attention,
    fp8_attention_reference,
    is_patched,
    kernel_config,
    patch_attention,
    sqnr_db,
    unpatch_attention,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
CUDA = torch.cuda.is_available()
# conftest sets TRITON_INTERPRET=1 on CPU-only machines; with a GPU, CPU models take the SDPA fallback.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"


def _qkv(b, h, s, d, dtype=torch.bfloat16, seed=0, key_offset=0.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    return q.to(device, dtype), (k + key_offset).to(device, dtype), v.to(device, dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from cdm_kernels.attention._kernels import _to_e4m3

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        tl.store(y_ptr + offs, _to_e4m3(x, True).to(tl.float32), mask=offs < N)


def _ref_blocks(d):
    cfg = kernel_config(d)
    return {"block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"]}


# ----------------------------------------------------------------------------- kernel


@needs_triton
def test_round_to_e4m3_matches_torch_cast():
    """The kernel's software RNE onto the e4m3 grid equals torch's cast, ties and subnormals included."""
    import triton

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: must go to the even neighbour
    g = torch.Generator().manual_seed(1)
    x = torch.cat([
        grid, mids,
        torch.nextafter(mids, torch.full_like(mids, 1e9)), torch.nextafter(mids, torch.full_like(mids, -1e9)),
        torch.randn(2000, generator=g) * 50, torch.randn(1000, generator=g) * 0.01,
        torch.tensor([0.0, -0.0, 448.0, -448.0, 460.0, 1e6, -1e6, 2.0**-10, 2.0**-10 * 1.0001, 3 * 2.0**-10]),
    ]).float()
    y = torch.empty_like(x)
    x, y = x.to(DEVICE), y.to(DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize(("s", "d"), [(77, 128), (130, 64), (200, 64)])
def test_sqnr_random(s, d):
    q, k, v = _qkv(1, 2, s, d, seed=s)
    with torch.no_grad():
        out = fp8_attention(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    db = sqnr_db(out, attention_float(q, k, v))
    assert db >= 25.0, f"SQNR {db:.2f} dB < 25 dB"


@needs_triton
@pytest.mark.parametrize("offset", [8.0, 50.0])
def test_sqnr_keys_with_common_offset(offset):
    """Keys sharing a large offset: smoothing (subtracting the mean key) keeps the accuracy."""
    q, k, v = _qkv(1, 2, 130, 64, seed=3, key_offset=offset)
    with torch.no_grad():
        out = fp8_attention(q, k, v)
    db = sqnr_db(out, attention_float(q, k, v))
    assert db >= 20.0, f"SQNR {db:.2f} dB < 20 dB with key offset {offset}"
    # What smoothing buys, measured on the reference twin: without it the offset costs >= 10 dB.
    unsmoothed = sqnr_db(fp8_attention_reference(q, k, v, smooth_k=False, **_ref_blocks(64)),
                         attention_float(q, k, v))
    assert unsmoothed < db - 5.0


@needs_triton
def test_kernel_matches_reference_twin():
    """fp32 inputs: the kernel and its PyTorch twin make the same roundings (only sum order differs)."""
    q, k, v = _qkv(2, 1, 150, 64, dtype=torch.float32, seed=5, key_offset=2.0)
    with torch.no_grad():
        out = fp8_attention(q, k, v, softmax_scale=0.1)
    ref = fp8_attention_reference(q.cpu(), k.cpu(), v.cpu(), softmax_scale=0.1, **_ref_blocks(64))
    # The interpreter sums like the twin; a GPU's FP8 MMA accumulates in another order and precision.
    assert sqnr_db(out.cpu(), ref) >= (80.0 if INTERPRETED else 40.0)
    assert sqnr_db(ref, attention_float(q, k, v, softmax_scale=0.1).cpu()) >= 25.0


def _sm90_interpreter_variants() -> list:
    """(D, config) of every stored sm_90 launch config and probe, one per interpreter-visible variant: num_warps and
    num_stages change nothing in the interpreter, so configs differing only there run once."""
    if not HAS_TRITON:
        return []
    from cdm_kernels.attention._kernels import PROBE_CONFIGS, config_label, kernel_configs

    seen, out = set(), []
    for d in (64, 128):
        for cfg in [*kernel_configs(d, (9, 0)), *PROBE_CONFIGS.get((90, d), [])]:
            key = (d, cfg["BLOCK_M"], cfg["BLOCK_N"], bool(cfg.get("tma")), bool(cfg.get("warp_specialize")))
            if key not in seen:
                seen.add(key)
                out.append(pytest.param(d, cfg, id=f"D{d}-{config_label(cfg).replace(' ', '-')}"))
    return out


@needs_triton
def test_sm90_stored_default_is_128x128_with_8_warps():
    from cdm_kernels.attention._kernels import PROBE_CONFIGS, kernel_configs
    from cdm_kernels.attention.fp8_attention import reference_blocks

    for d in (64, 128):
        cfgs = kernel_configs(d, (9, 0))
        assert (cfgs[0]["BLOCK_M"], cfgs[0]["BLOCK_N"], cfgs[0]["num_warps"]) == (128, 128, 8)
        assert not cfgs[0].get("tma") and not cfgs[0].get("warp_specialize")  # the default stays the plain loop
        assert reference_blocks(d, (9, 0)) == {"block_m": 128, "block_n": 128}
        assert any(c.get("tma") for c in cfgs)  # the TMA candidate is timed by the GPU run
        # BLOCK_M is a tl.arange length: only powers of two compile (192-row tiles are not a config)
        for cfg in [*cfgs, *PROBE_CONFIGS.get((90, d), [])]:
            assert cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1) == 0 and cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0


@needs_triton
@pytest.mark.parametrize(("d", "cfg"), _sm90_interpreter_variants())
def test_sm90_launch_configs_under_the_interpreter(d, cfg):
    """Every sm_90 launch config (the default's 128 x 128 tiles, the candidates: 128 x 64, TMA tensor descriptors;
    the warp-specialised probe) through the interpreter: odd S, offset keys, a non-contiguous (B, S, H, D) view; the
    same roundings as the twin with the config's blocks, >= 25 dB vs float64; a NaN in the input reaches the output."""
    from cdm_kernels.attention._kernels import triton_fp8_attention

    blocks = {"block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"]}
    s = 331  # three 128-key blocks or six 64-key blocks, the last one partial
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, s, 2, d, generator=g).transpose(1, 2) for _ in range(3))  # non-contiguous views
    with torch.no_grad():
        out = triton_fp8_attention(q, k, v, d ** -0.5, cfg)
        shifted = triton_fp8_attention(q, k + 8.0, v, d ** -0.5, cfg)
    twin = fp8_attention_reference(q, k, v, **blocks)
    assert torch.isfinite(out).all() and torch.isfinite(shifted).all()
    if INTERPRETED:  # (offset keys: the mean's summation order differs from the twin's and flips a rounding or two)
        assert sqnr_db(out, twin) >= 80.0
    assert sqnr_db(out, attention_float(q, k, v, dtype=torch.float64)) >= 25.0
    assert sqnr_db(shifted, attention_float(q, k + 8.0, v, dtype=torch.float64)) >= 25.0
    # NaN never passes the SQNR rule these checks use
    broken = out.clone()
    broken[0, 0, 5, 0] = float("nan")
    assert not sqnr_db(broken, twin) >= 25.0
    # A NaN in one head's V is not hidden by the quantisation (a finite scale, a finite output); the other head,
    # which never reads it, stays finite.
    v_nan = v.clone()
    v_nan[0, 1, s - 3, 7] = float("nan")  # in the last, partial key block
    with torch.no_grad():
        out_nan = triton_fp8_attention(q, k, v_nan, d ** -0.5, cfg)
    assert torch.isnan(out_nan[0, 1]).any()
    assert torch.isfinite(out_nan[0, 0]).all()


@needs_triton
def test_no_nan_from_finite_input():
    cases = [
        torch.zeros(1, 1, 70, 64),  # all-zero blocks: the amax floor keeps scales finite
        torch.full((1, 1, 70, 64), 3.0),  # constant keys: smoothing makes K exactly zero
        torch.randn(1, 1, 70, 64, generator=torch.Generator().manual_seed(0)) * 1e4,  # huge scores
        torch.randn(1, 1, 1, 64, generator=torch.Generator().manual_seed(1)),  # a single token
    ]
    for x in cases:
        x = x.to(DEVICE, torch.bfloat16)
        with torch.no_grad():
            out = fp8_attention(x, x, x)
        assert torch.isfinite(out).all()
        if x.shape[2] == 1:  # one key: the output is that key's value (up to fp8 rounding of V)
            torch.testing.assert_close(out.float(), x.float(), rtol=0.07, atol=1e-2)


def test_grad_mode_error():
    q, k, v = _qkv(1, 1, 16, 64, dtype=torch.float32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        fp8_attention(q, k, v)


def test_bad_arguments():
    q, k, v = _qkv(1, 1, 16, 64)
    with pytest.raises(ValueError, match="shape"):
        fp8_attention(q, k[:, :, :8], v)
    with pytest.raises(ValueError, match="dtype"):
        fp8_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="4-d"):
        fp8_attention(q[0], k, v)
    with pytest.raises(ValueError, match="path"):
        fp8_attention(q, k, v, path="nope")


def test_cpu_without_interpreter_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(1, 2, 33, 64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        out = fp8_attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert out.transpose(1, 2).is_contiguous()  # same layout as the FP8 path


@needs_triton
def test_compiles_fullgraph():
    q, k, v = _qkv(1, 2, 40, 64, dtype=torch.float32, seed=7)
    fn = torch.compile(lambda a, b, c: fp8_attention(a, b, c) * 2.0, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = fp8_attention(q, k, v) * 2.0
        got = fn(q, k, v)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- diffusers

TEXT_TOKENS = 13


def _tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    # 8x8 patches = 64 image tokens + 13 text tokens = 77 (odd S), 2 heads of 64.
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16,
    )
    return model.eval()


def _sd3_inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(b, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(b, TEXT_TOKENS, 32, generator=g),
        "pooled_projections": torch.randn(b, 32, generator=g),
        "timestep": torch.tensor([500.0, 900.0][:b]),
    }


def _run(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def sd3():
    pytest.importorskip("diffusers")
    return _tiny_sd3()


def test_sd3_processor_identical_in_bf16_mode_and_grad_mode(sd3):
    inputs = _sd3_inputs()
    with torch.no_grad():
        stock = _run(sd3, inputs)
    stock_grad = _run(sd3, inputs)  # params require grad: the attention needs its backward
    try:
        report = patch_attention(sd3, mode="bf16")
        assert len(report["patched"]) == 2 and not report["skipped"]
        with torch.no_grad():
            assert torch.equal(_run(sd3, inputs), stock)
        patch_attention(sd3, mode="fp8_no_grad")
        out = _run(sd3, inputs)  # grad mode, trainable weights: must take the stock SDPA path
        assert torch.equal(out, stock_grad)
        out.square().mean().backward()  # and gradients flow
        assert sd3.transformer_blocks[0].attn.to_q.weight.grad is not None
    finally:
        unpatch_attention(sd3)
        sd3.zero_grad(set_to_none=True)


@needs_triton
def test_sd3_fp8_no_grad_path(sd3, monkeypatch):
    calls = []
    real = processors_mod.fp8_attention

    def counting(q, k, v, *a, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(processors_mod, "fp8_attention", counting)
    inputs = _sd3_inputs()
    with torch.no_grad():
        stock = _run(sd3, inputs)
        try:
            patch_attention(sd3, mode="fp8_no_grad")
            out = _run(sd3, inputs)
        finally:
            unpatch_attention(sd3)
    assert calls == [(2, 2, 64 + TEXT_TOKENS, 64)] * 2
    assert torch.isfinite(out).all()
    assert _rel_err(out, stock) < 0.05


def test_sd3_emulated_mode_runs_the_reference_twin(sd3, monkeypatch):
    """fp8_emulated_no_grad: the twin's roundings without grad (any head dim), stock SDPA with grad."""
    twin_calls = []
    real_twin = processors_mod.fp8_attention_reference

    def counting_twin(q, k, v, *a, **kw):
        twin_calls.append(tuple(q.shape))
        return real_twin(q, k, v, *a, **kw)

    def kernel_must_not_run(*a, **kw):
        raise AssertionError("the emulated mode called the FP8 kernel")

    monkeypatch.setattr(processors_mod, "fp8_attention_reference", counting_twin)
    monkeypatch.setattr(processors_mod, "fp8_attention", kernel_must_not_run)
    inputs = _sd3_inputs()
    with torch.no_grad():
        stock = _run(sd3, inputs)
    stock_grad = _run(sd3, inputs)
    try:
        patch_attention(sd3, mode="fp8_emulated_no_grad")
        with torch.no_grad():
            out = _run(sd3, inputs)
        assert twin_calls == [(2, 2, 64 + TEXT_TOKENS, 64)] * 2
        assert torch.isfinite(out).all() and not torch.equal(out, stock)  # e4m3 rounding changes the result
        assert _rel_err(out, stock) < 0.05
        twin_calls.clear()
        assert torch.equal(_run(sd3, inputs), stock_grad)  # grad mode: the stock call, bit for bit
        assert twin_calls == []
    finally:
        unpatch_attention(sd3)
        sd3.zero_grad(set_to_none=True)


@needs_triton
def test_sqnr_on_sd3_activations(sd3, monkeypatch):
    """q, k, v captured from the tiny SD3 teacher's joint attention (S = 64 + 13 = 77)."""
    captured = []
    real = processors_mod.fp8_attention

    def capture(q, k, v, *a, **kw):
        captured.append((q.clone(), k.clone(), v.clone()))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(processors_mod, "fp8_attention", capture)
    with torch.no_grad():
        try:
            patch_attention(sd3, mode="fp8_no_grad")
            _run(sd3, _sd3_inputs())
        finally:
            unpatch_attention(sd3)
    assert len(captured) == 2
    for q, k, v in captured:
        qb, kb, vb = (t.to(DEVICE, torch.bfloat16) for t in (q, k, v))
        with torch.no_grad():
            out = fp8_attention(qb, kb, vb)
        db = sqnr_db(out, attention_float(qb, kb, vb))
        assert db >= 25.0, f"SQNR {db:.2f} dB on SD3 activations"


def test_patch_unpatch_round_trip(sd3):
    before = {n: p for n, p in sd3.attn_processors.items()}
    report = patch_attention(sd3, mode="fp8_no_grad")
    assert is_patched(sd3) and len(report["patched"]) == len(before)
    again = patch_attention(sd3, mode="bf16")  # re-patching switches the mode, keeps the originals
    assert again["patched"] == report["patched"]
    assert all(p.mode == "bf16" for p in sd3.attn_processors.values())
    assert unpatch_attention(sd3) == len(before)
    assert not is_patched(sd3)
    after = sd3.attn_processors
    assert all(after[n] is before[n] for n in before)  # the very same processor objects
    assert unpatch_attention(sd3) == 0  # idempotent
    assert "_cdm_attn_original_processors" not in sd3.state_dict()
    with pytest.raises(ValueError, match="mode"):
        patch_attention(sd3, mode="fp4")


def test_unknown_processors_are_left_alone():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    block = torch.nn.Module()
    block.attn = Attention(query_dim=32, heads=2, dim_head=16, processor=AttnProcessor2_0())
    report = patch_attention(block)
    assert report["patched"] == [] and report["skipped"] == ["attn (AttnProcessor2_0)"]
    assert isinstance(block.attn.processor, AttnProcessor2_0)


@needs_triton
def test_patched_sd3_under_torch_compile(sd3):
    inputs = _sd3_inputs(b=1)
    try:
        patch_attention(sd3, mode="fp8_no_grad")
        with torch.no_grad():
            eager = _run(sd3, inputs)
            compiled = torch.compile(sd3, backend="aot_eager")
            got = _run(compiled, inputs)
    finally:
        unpatch_attention(sd3)
        torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)


def _tiny_flux(head_dim):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    axes = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=axes,
    ).eval()


def _flux_inputs(b=1, img=64, txt=13):
    g = torch.Generator().manual_seed(2)
    side = int(math.isqrt(img))
    axis = torch.arange(side).float()
    ids = torch.stack(torch.meshgrid(torch.zeros(1), axis, axis, indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(b, img, 8, generator=g),
        "encoder_hidden_states": torch.randn(b, txt, 32, generator=g),
        "pooled_projections": torch.randn(b, 32, generator=g),
        "timestep": torch.full((b,), 0.7),
        "img_ids": ids.reshape(-1, 3).float(),
        "txt_ids": torch.zeros(txt, 3),
    }


@needs_triton
def test_flux_processors():
    pytest.importorskip("diffusers")
    flux = _tiny_flux(head_dim=32)
    inputs = _flux_inputs()
    with torch.no_grad():
        stock = _run(flux, inputs)
    try:
        report = patch_attention(flux, mode="bf16")
        assert len(report["patched"]) == 2 and not report["skipped"]  # one double, one single block
        with torch.no_grad():
            assert torch.equal(_run(flux, inputs), stock)
        patch_attention(flux, mode="fp8_no_grad")
        with torch.no_grad():
            out = _run(flux, inputs)
    finally:
        assert unpatch_attention(flux) == 2
    assert torch.isfinite(out).all()
    if INTERPRETED:  # the FP8 kernel really ran (CPU tensors only reach it through the interpreter)
        assert not torch.equal(out, stock)
    assert _rel_err(out, stock) < 0.05


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s", "d"), [(2, 4429, 64), (1, 4608, 128)])
def test_gpu_sqnr_real_shapes(b, s, d):
    q, k, v = _qkv(b, 24, s, d, device="cuda", seed=11)
    with torch.no_grad():
        out = fp8_attention(q, k, v)
        exact = attention_float(q, k, v, dtype=torch.float32)
    db = sqnr_db(out, exact)
    assert db >= 25.0, f"SQNR {db:.2f} dB at B={b} S={s} D={d}"
    qo, ko, vo = _qkv(1, 24, s, d, device="cuda", seed=12, key_offset=8.0)
    with torch.no_grad():
        assert sqnr_db(fp8_attention(qo, ko, vo), attention_float(qo, ko, vo, dtype=torch.float32)) >= 20.0


@pytest.mark.gpu
def test_gpu_kernel_matches_reference_twin():
    from cdm_kernels.attention.fp8_attention import native_fp8_available

    if not native_fp8_available(torch.device("cuda")):
        pytest.skip("no FP8 tensor cores: fp8_attention runs SDPA here")
    q, k, v = _qkv(1, 4, 1000, 64, dtype=torch.float32, device="cuda", seed=13)
    with torch.no_grad():
        out = fp8_attention(q, k, v)
    from cdm_kernels.attention.fp8_attention import reference_blocks

    ref = fp8_attention_reference(q, k, v, **reference_blocks(64, torch.cuda.get_device_capability()))
    assert sqnr_db(out, ref) >= 40.0  # the GPU sums in another order and its fp8 MMA accumulates differently


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fa3", "te"])
def test_gpu_optional_backends(path):
    from cdm_kernels.attention import _backends

    if not _backends.available()[path]:
        pytest.skip(f"optional backend {path!r} not installed")
    q, k, v = _qkv(1, 4, 1000, 64, device="cuda", seed=14)
    with torch.no_grad():
        out = fp8_attention(q, k, v, path=path)
    assert sqnr_db(out, attention_float(q, k, v, dtype=torch.float32)) >= 20.0


@needs_triton
def test_gpu_code_path_compiles_for_sm90_without_a_gpu(tmp_path):
    """The non-interpreted kernels compile to PTX for Hopper with FP8 wgmma (triton's bundled ptxas)."""
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    script = (
        "from cdm_kernels.attention._kernels import aot_compile\n"
        "for d in (64, 128):\n"
        "    ptx = aot_compile(90, d, 'bf16', even_n=False)\n"
        "    a = ptx['attention']\n"
        "    assert 'wgmma.mma_async' in a and 'e4m3' in a, 'no FP8 wgmma'\n"
        "    assert a.count('cp.async.commit_group') >= 2, 'K/V tiles not pipelined (cp.async stages)'\n"
        "    assert 'cvt.rn.satfinite.e4m3x2.f32' in ptx['quantize'], 'no RNE fp8 cast'\n"
        "    assert 'st.global' in ptx['colsum']\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("ptxas not available")
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
