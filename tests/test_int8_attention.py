"""INT8-QK attention (smoothed K, SageAttention's scheme): the quantisation equals its PyTorch twin
exactly, the kernel matches the twin tightly, both are accurate against float64 attention (SQNR),
masked tails, strides, dtypes, offset keys, NaN handling, argument errors, path selection (faked
compute capabilities), the processors' int8 modes and the trainer switch.

On CPU the Triton kernel runs through the interpreter (conftest sets TRITON_INTERPRET=1): tiny
shapes. GPU tests carry the `gpu` mark.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import cdm_kernels.attention.processors as processors_mod
from cdm_kernels.attention import (
    attention_float,
    fp8_attention,
    fp8_attention_reference,
    int8_attention,
    int8_attention_reference,
    int8_kernel_config,
    patch_attention,
    sqnr_db,
    unpatch_attention,
)
from cdm_kernels.attention.fp8_attention import check_triton_path_device, cuda_auto_path
from cdm_kernels.attention.int8_attention import check_int8_path_device, native_int8_available
from cdm_kernels.attention.int8_reference import pv_dtype, quantize_int8_blocks

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
# On a CUDA machine the kernel needs sm_80+; on CPU it needs the interpreter.
KERNEL_RUNS = (CUDA and native_int8_available(torch.device("cuda"))) or (not CUDA and INTERPRETED)
needs_kernel = pytest.mark.skipif(not (HAS_TRITON and KERNEL_RUNS), reason="INT8-QK kernel cannot run here")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _qkv(b, h, s, d, dtype=torch.bfloat16, seed=0, key_offset=0.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    return q.to(device, dtype), (k + key_offset).to(device, dtype), v.to(device, dtype)


def _blocks(d):
    cfg = int8_kernel_config(d)
    return {"block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"]}


def _attend(q, k, v, softmax_scale=None):
    with torch.no_grad():
        return int8_attention(q, k, v, softmax_scale)


def _assert_same(got, expected):
    """Bit for bit in the interpreter; on a GPU K's mean (a torch reduction) may sum in another order."""
    if INTERPRETED:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        assert sqnr_db(got, expected) >= 50.0


# ----------------------------------------------------------------------------- the twin's rounding


def test_twin_rounds_half_to_even_onto_int8():
    """Values landing exactly on .5 after scaling go to the even integer; the block's amax maps to 127."""
    # One block of 4 tokens x 2 channels with amax 127: inv = 1 exactly, so x * inv = x.
    x = torch.tensor([[0.5, 1.5], [2.5, -0.5], [-1.5, -2.5], [126.5, 127.0]]).view(1, 1, 4, 2)
    x8, scale = quantize_int8_blocks(x, block=4)
    assert x8.flatten().tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, 127.0]
    assert scale.item() == 1.0
    # amax 254: inv = 0.5; 3 -> 1.5 -> 2, 5 -> 2.5 -> 2, 7 -> 3.5 -> 4, -254 -> -127 (never -128)
    x8, scale = quantize_int8_blocks(torch.tensor([3.0, 5.0, 7.0, -254.0]).view(1, 1, 4, 1), block=4)
    assert x8.flatten().tolist() == [2.0, 2.0, 4.0, -127.0] and scale.item() == 2.0


def test_twin_flags_non_finite_blocks_with_nan_scale():
    x = torch.randn(1, 1, 8, 4)
    x[0, 0, 5, 1] = float("nan")
    x[0, 0, 2, 0] = float("inf")
    _, scale = quantize_int8_blocks(x, block=4)
    assert torch.isnan(scale).all()  # each of the two blocks holds one non-finite value
    x[0, 0, 2, 0] = 1.0
    _, scale = quantize_int8_blocks(x, block=4)
    assert torch.isfinite(scale[..., 0]).all() and torch.isnan(scale[..., 1]).all()


# ----------------------------------------------------------------------------- kernel vs twin


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantisation_equals_twin_exactly(dtype):
    """The kernel's int8 Q and K and their scales are the twin's, bit for bit (odd S, offset keys)."""
    from cdm_kernels.attention._int8_kernels import quantize_qk_int8
    from cdm_kernels.attention.reference import LOG2E

    b, h, s, d = 2, 1, 150, 64
    q, k, _ = _qkv(b, h, s, d, dtype=dtype, seed=21, key_offset=3.0)
    bm, bn = 128, 64
    q8, k8, q_scale, k_scale = quantize_qk_int8(q, k, 0.125, bm, bn)
    # The twin on the kernel's device: the same torch.mean call then gives the same mean, bit for bit.
    qf = q.float() * torch.tensor(0.125 * LOG2E, dtype=torch.float32, device=q.device)
    kf = k.float() - torch.mean(k, dim=2, dtype=torch.float32, keepdim=True)
    tq8, tq_scale = quantize_int8_blocks(qf, bm)
    tk8, tk_scale = quantize_int8_blocks(kf, bn)
    assert torch.equal(q8.float(), tq8.view(b * h, -1, d))
    assert torch.equal(k8.float(), tk8.view(b * h, -1, d))
    assert torch.equal(q_scale, tq_scale.view(b * h, -1))
    assert torch.equal(k_scale, tk_scale.view(b * h, -1))
    assert q8.abs().max() == 127 and k8.abs().max() == 127  # each block's amax maps to 127
    assert (q8[:, s:] == 0).all() and (k8[:, s:] == 0).all()  # padded rows are zeros


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("s", "d"), [(150, 64), (77, 128), (128, 64)])
def test_kernel_matches_twin(dtype, s, d):
    """Only the float32 summation order and exp2's last bit differ; 16-bit outputs then round alike."""
    q, k, v = _qkv(2, 1, s, d, dtype=dtype, seed=s + d, key_offset=2.0)
    out = _attend(q, k, v, 0.1)
    assert out.dtype == dtype and out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    ref = int8_attention_reference(q.cpu(), k.cpu(), v.cpu(), 0.1, **_blocks(d))
    if dtype == torch.float32:
        assert sqnr_db(out.cpu(), ref) >= (80.0 if INTERPRETED else 50.0)
    else:  # the output's own rounding: within one ulp of the twin rounded to the same dtype
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        err = (out.cpu().float() - ref.to(dtype).float()).abs()
        assert (err <= ulp * ref.abs().clamp_min(2.0**-6) + 1e-6).all()
        assert sqnr_db(out.cpu(), ref) >= 50.0


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("s", "d"), [(77, 128), (130, 64), (200, 64), (1, 64), (65, 128)])
def test_sqnr_vs_float64(dtype, s, d):
    """Odd lengths (masked tails), a single token, both head dims: >= 30 dB, above the FP8 path's 25."""
    q, k, v = _qkv(1, 2, s, d, dtype=dtype, seed=s)
    out = _attend(q, k, v)
    assert torch.isfinite(out).all()
    exact = attention_float(q, k, v)
    db = sqnr_db(out, exact)
    assert db >= 30.0, f"SQNR {db:.2f} dB < 30 dB"
    assert sqnr_db(int8_attention_reference(q, k, v, **_blocks(d)), exact) >= 30.0


@needs_kernel
def test_non_contiguous_inputs():
    """(B, S, H, D) memory viewed as (B, H, S, D) (what the processors pass), a head slice and a
    transposed-D copy: the same result as contiguous inputs."""
    b, h, s, d = 2, 3, 70, 64
    g = torch.Generator().manual_seed(4)
    bshd = [torch.randn(b, s, h, d, generator=g).to(DEVICE, torch.bfloat16) for _ in range(3)]
    views = [t.transpose(1, 2) for t in bshd]
    assert not views[0].is_contiguous()
    expected = _attend(*[t.contiguous() for t in views])
    _assert_same(_attend(*views), expected)
    wide = [torch.randn(b, 2 * h, s, d, generator=g).to(DEVICE, torch.bfloat16)[:, 1::2] for _ in range(3)]
    _assert_same(_attend(*wide), _attend(*[t.contiguous() for t in wide]))
    d_strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in views]  # stride 1 along S
    _assert_same(_attend(*d_strided), expected)


@needs_kernel
@pytest.mark.parametrize("offset", [8.0, 50.0])
def test_keys_with_common_offset(offset):
    """Smoothing (subtracting K's mean) keeps the accuracy when every key shares a large offset."""
    q, k, v = _qkv(1, 2, 130, 64, seed=3, key_offset=offset)
    exact = attention_float(q, k, v)
    db = sqnr_db(_attend(q, k, v), exact)
    assert db >= 30.0, f"SQNR {db:.2f} dB with key offset {offset}"
    unsmoothed = sqnr_db(int8_attention_reference(q, k, v, smooth_k=False, **_blocks(64)), exact)
    assert unsmoothed < db - 3.0  # what smoothing buys, measured on the twin


@needs_kernel
def test_no_nan_from_finite_input_and_nan_never_hidden():
    cases = [
        torch.zeros(1, 1, 70, 64),  # all-zero blocks: the amax floor keeps scales finite
        torch.full((1, 1, 70, 64), 3.0),  # constant keys: smoothing makes K exactly zero
        torch.randn(1, 1, 70, 64, generator=torch.Generator().manual_seed(0)) * 1e4,  # huge scores
        torch.randn(1, 1, 1, 128, generator=torch.Generator().manual_seed(1)),  # a single token
    ]
    for x in cases:
        x = x.to(DEVICE, torch.bfloat16)
        out = _attend(x, x, x)
        assert torch.isfinite(out).all()
        if x.shape[2] == 1:  # one key: the output is that key's value
            torch.testing.assert_close(out.float(), x.float(), rtol=0, atol=0)
    # A NaN or inf in a key reaches every query (each attends to it); in a query, at least its own row.
    q, k, v = _qkv(1, 1, 70, 64, seed=2)
    k_bad = k.clone()
    k_bad[0, 0, 66, 3] = float("nan")
    assert torch.isnan(_attend(q, k_bad, v)).all()
    q_bad = q.clone()
    q_bad[0, 0, 5, 0] = float("inf")
    out = _attend(q_bad, k, v)
    assert torch.isnan(out[0, 0, 5]).all()
    v_bad = v.clone()
    v_bad[0, 0, 9, 7] = float("nan")
    assert torch.isnan(_attend(q, k, v_bad)[..., 7]).all()


@needs_kernel
def test_fp8_attention_path_int8_is_the_int8_kernel():
    q, k, v = _qkv(1, 2, 77, 64, seed=8)
    with torch.no_grad():
        via_path = fp8_attention(q, k, v, path="int8")
    torch.testing.assert_close(via_path, _attend(q, k, v), rtol=0, atol=0)


@needs_kernel
def test_compiles_fullgraph():
    q, k, v = _qkv(1, 2, 40, 64, dtype=torch.float32, seed=7)
    fn = torch.compile(lambda a, b, c: int8_attention(a, b, c) * 2.0, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = int8_attention(q, k, v) * 2.0
        got = fn(q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- arguments, paths


def test_bad_arguments_raise_value_error_naming_the_argument():
    q, k, v = _qkv(1, 1, 16, 64)
    with pytest.raises(ValueError, match="shape"):
        int8_attention(q, k[:, :, :8], v)
    with pytest.raises(ValueError, match="dtype"):
        int8_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="^q must be a 4-d"):
        int8_attention(q[0], k, v)
    with pytest.raises(ValueError, match="^v must be bf16"):
        int8_attention(q, k, v.to(torch.int8))
    q32, k32, v32 = _qkv(1, 1, 16, 32)
    with pytest.raises(ValueError, match="^q: head dim 32"):
        int8_attention(q32, k32, v32)
    with pytest.raises(ValueError, match="^q: head dim 32"):
        fp8_attention(q32, k32, v32, path="int8")
    with pytest.raises(ValueError, match="^q must hold at least one token"):
        int8_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="int8_attention is forward-only"):
        int8_attention(q, k, v)


@pytest.mark.parametrize(("cap", "d", "expected"), [
    ((8, 0), 64, "int8"), ((8, 0), 128, "int8"), ((8, 6), 64, "int8"), ((8, 6), 128, "int8"),
    ((8, 7), 128, "int8"),
    ((8, 0), 32, "sdpa"),  # the INT8 kernel covers head dims 64 and 128 only
    ((8, 9), 64, "triton"), ((9, 0), 128, "triton"), ((9, 0), 32, "triton"), ((10, 0), 64, "triton"),
    ((7, 5), 64, "sdpa"), ((7, 0), 128, "sdpa"),
    ((9, 0), 80, "sdpa"),
])
def test_auto_path_by_capability(cap, d, expected):
    assert cuda_auto_path(cap, d) == expected


def test_path_device_checks_by_capability():
    """path="int8" runs from sm_80 up (selectable on sm_89/90); path="triton" (FP8) only from sm_89."""
    cuda = torch.device("cuda")
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0)):
        check_int8_path_device(cuda, cap)  # no error
        assert native_int8_available(cuda, cap)
    if not INTERPRETED:  # under the interpreter every device check passes (the kernel runs on CPU there)
        with pytest.raises(ValueError, match="path='int8'.*sm_75"):
            check_int8_path_device(cuda, (7, 5))
        with pytest.raises(ValueError, match="path='triton'.*sm_80.*path='int8'"):
            check_triton_path_device(cuda, (8, 0))
    assert not native_int8_available(cuda, (7, 5))
    assert not native_int8_available(torch.device("cpu"))


def test_auto_path_on_faked_gpus(monkeypatch):
    """resolve_path on a CUDA tensor with a faked capability (an object with shape/device/dtype stands in)."""
    from cdm_kernels.attention import dispatch as fa

    class FakeCudaTensor:
        def __init__(self, d):
            self.shape = (1, 2, 16, d)
            self.device = torch.device("cuda", 0)
            self.dtype = torch.bfloat16

    monkeypatch.setattr(fa, "interpret", lambda: False)
    monkeypatch.setattr(fa, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    for cap, d, expected in (((8, 0), 64, "int8"), ((8, 6), 128, "int8"), ((9, 0), 64, "triton"),
                             ((8, 9), 128, "triton"), ((8, 0), 32, "sdpa")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert fa.resolve_path(FakeCudaTensor(d), "auto") == expected
        assert fa.resolve_path(FakeCudaTensor(d), "int8") == "int8"  # explicit paths pass through


def test_pv_dtype():
    assert pv_dtype(torch.float16) == torch.float16
    assert pv_dtype(torch.bfloat16) == torch.bfloat16
    assert pv_dtype(torch.float32) == torch.bfloat16  # bf16 keeps fp32's range: V cannot overflow


# ----------------------------------------------------------------------------- processors, trainer


@pytest.fixture(scope="module")
def sd3():
    pytest.importorskip("diffusers")
    from tests.test_fp8_attention import _tiny_sd3

    return _tiny_sd3()


def _counting(monkeypatch, name):
    calls = []
    real = getattr(processors_mod, name)

    def wrapper(q, k, v, *a, **kw):
        calls.append((tuple(q.shape), kw.get("path")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(processors_mod, name, wrapper)
    return calls


def test_sd3_int8_emulated_mode_runs_the_int8_twin(sd3, monkeypatch):
    from tests.test_fp8_attention import TEXT_TOKENS, _rel_err, _run, _sd3_inputs

    twin_calls = _counting(monkeypatch, "int8_attention_reference")

    def must_not_run(*a, **kw):
        raise AssertionError("the int8 emulated mode called a kernel or the FP8 twin")

    monkeypatch.setattr(processors_mod, "fp8_attention", must_not_run)
    monkeypatch.setattr(processors_mod, "fp8_attention_reference", must_not_run)
    inputs = _sd3_inputs()
    with torch.no_grad():
        stock = _run(sd3, inputs)
    stock_grad = _run(sd3, inputs)
    try:
        patch_attention(sd3, mode="int8_emulated_no_grad")
        with torch.no_grad():
            out = _run(sd3, inputs)
        assert [c[0] for c in twin_calls] == [(2, 2, 64 + TEXT_TOKENS, 64)] * 2
        assert torch.isfinite(out).all() and not torch.equal(out, stock)
        assert _rel_err(out, stock) < 0.02
        twin_calls.clear()
        assert torch.equal(_run(sd3, inputs), stock_grad)  # grad mode: the stock call, bit for bit
        assert twin_calls == []
    finally:
        unpatch_attention(sd3)
        sd3.zero_grad(set_to_none=True)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETED), reason="the tiny model runs on CPU: needs the interpreter")
def test_sd3_int8_no_grad_mode_runs_the_int8_kernel(sd3, monkeypatch):
    from tests.test_fp8_attention import TEXT_TOKENS, _rel_err, _run, _sd3_inputs

    calls = _counting(monkeypatch, "fp8_attention")
    inputs = _sd3_inputs()
    with torch.no_grad():
        stock = _run(sd3, inputs)
        try:
            patch_attention(sd3, mode="int8_no_grad")
            out = _run(sd3, inputs)
        finally:
            unpatch_attention(sd3)
    assert calls == [((2, 2, 64 + TEXT_TOKENS, 64), "int8")] * 2
    assert torch.isfinite(out).all() and _rel_err(out, stock) < 0.02


def test_int8_twin_beats_fp8_twin_on_sd3_activations(sd3, monkeypatch):
    """q, k, v captured from the tiny SD3 model's joint attention (S = 77): INT8-QK >= 30 dB and above FP8."""
    from tests.test_fp8_attention import _run, _sd3_inputs

    captured = []

    def capture(q, k, v, *a, **kw):
        captured.append((q.clone(), k.clone(), v.clone()))
        return fp8_attention_reference(q, k, v).to(q.dtype)

    monkeypatch.setattr(processors_mod, "fp8_attention_reference", capture)
    with torch.no_grad():
        try:
            patch_attention(sd3, mode="fp8_emulated_no_grad")
            _run(sd3, _sd3_inputs())
        finally:
            unpatch_attention(sd3)
    assert len(captured) == 2
    for q, k, v in captured:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        exact = attention_float(q, k, v)
        db_int8 = sqnr_db(int8_attention_reference(q, k, v), exact)
        assert db_int8 >= 30.0 and db_int8 > sqnr_db(fp8_attention_reference(q, k, v), exact)


def test_trainer_switch_selects_int8_modes(monkeypatch):
    """speed.attention_8bit=int8 installs the int8 processor modes (kernel, or twin with fp8_attention_emulate)."""
    import cdm_kernels
    from cdm_train.attention_setup import apply_attention
    from cdm_train.config import ConfigError, make_config

    class Models:
        teacher, fake, student = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)

    modes = []
    monkeypatch.setattr(cdm_kernels, "patch_attention", lambda net, mode, backend="sdpa-default": modes.append(
        (net, mode)))

    def run(*overrides):
        modes.clear()
        apply_attention(make_config(overrides=["speed.fp8_attention_teacher=true", *overrides]), Models)
        assert [net for net, _ in modes] == [Models.teacher]
        return modes[0][1]

    assert run() == "fp8_no_grad"
    assert run("speed.fp8_attention_emulate=true") == "fp8_emulated_no_grad"
    assert run("speed.attention_8bit=int8") == "int8_no_grad"
    assert run("speed.attention_8bit=int8", "speed.fp8_attention_emulate=true") == "int8_emulated_no_grad"
    with pytest.raises(ConfigError, match="speed.attention_8bit"):
        make_config(overrides=["speed.attention_8bit=int4"])


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s", "d"), [(2, 4429, 64), (1, 4608, 128)])
def test_gpu_int8_sqnr_real_shapes(b, s, d):
    if not native_int8_available(torch.device("cuda")):
        pytest.skip("needs sm_80+")
    q, k, v = _qkv(b, 24, s, d, device="cuda", seed=11)
    with torch.no_grad():
        out = int8_attention(q, k, v)
    db = sqnr_db(out[:1, :4], attention_float(q[:1, :4], k[:1, :4], v[:1, :4], dtype=torch.float32))
    assert db >= 30.0, f"SQNR {db:.2f} dB at B={b} S={s} D={d}"
    qo, ko, vo = _qkv(1, 4, s, d, device="cuda", seed=12, key_offset=8.0)
    with torch.no_grad():
        assert sqnr_db(int8_attention(qo, ko, vo), attention_float(qo, ko, vo, dtype=torch.float32)) >= 30.0


@pytest.mark.gpu
def test_gpu_int8_kernel_matches_twin():
    if not native_int8_available(torch.device("cuda")):
        pytest.skip("needs sm_80+")
    q, k, v = _qkv(1, 4, 1000, 64, dtype=torch.float32, device="cuda", seed=13)
    with torch.no_grad():
        out = int8_attention(q, k, v)
    ref = int8_attention_reference(q, k, v, **_blocks(64))
    assert sqnr_db(out, ref) >= 50.0  # the GPU sums in another order; its exp2 is approximate


@needs_triton
def test_sm80_machine_code_has_imma_without_a_gpu(tmp_path):
    """Compiled for A100 (triton's bundled ptxas) and disassembled (its cuobjdump): QK^T is an IMMA."""
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "cdm_kernels.attention.int8_sass", "--arch", "80", "--head-dim", "64"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 2 and "not found" in res.stderr:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("sm_80 D=64"))
    import ast

    counts = ast.literal_eval(line.split("SASS ")[1].split("}")[0] + "}")  # the printed dict of opcode counts
    assert counts.get("IMMA", 0) > 0 and counts.get("HMMA", 0) > 0, line
