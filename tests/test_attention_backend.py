"""The exact attention backend (cdm_kernels/attention/sdpa_backend.py, issue 24): the per-device choice with the
device facts faked, the known cuDNN faults, the SDPA context it installs, and the SD3 / Flux / LongCat processors
giving diffusers' outputs and gradients under it (CPU, math backend). GPU tests: the chosen backend against
flash at the real shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cdm_kernels.attention import patch_attention, unpatch_attention
from cdm_kernels.attention import sdpa_backend as sb
from cdm_kernels.attention.sdpa_backend import BackendChoice, DeviceFacts, choose_backend

H100_NEW = DeviceFacts("cuda", (9, 0), 91501)
H100_OLD = DeviceFacts("cuda", (9, 0), 91002)
A100 = DeviceFacts("cuda", (8, 0), 91501)
CPU = DeviceFacts("cpu")
C, FL, EF, MA = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)


# ----------------------------------------------------------------------------- the choice (faked devices)


@pytest.mark.parametrize(("facts", "kw", "first"), [
    (H100_NEW, {}, C),  # sm_90, cuDNN 9.15.1: cuDNN first
    (H100_NEW, {"seq_len": 4429}, C),  # fixed in 9.15.1: any length
    (H100_NEW, {"has_mask": True}, FL),  # a mask: never cuDNN in auto
    (H100_OLD, {"seq_len": 4608}, FL),  # older cuDNN: torch's reason for not preferring it stands
    (A100, {}, FL),  # not Hopper: flash
    (DeviceFacts("cuda", (8, 9), 91501), {}, FL),
    (DeviceFacts("cuda", (9, 0), None), {}, FL),  # no cuDNN loaded
])
def test_auto_on_faked_cuda_devices(facts, kw, first):
    choice = choose_backend("auto", facts, **kw)
    assert choice.kind == "sdpa" and choice.priority[0] == first and choice.priority[-1] == MA
    if kw.get("has_mask"):
        assert C not in choice.priority


def test_auto_off_cuda_and_sdpa_default_install_nothing():
    assert choose_backend("auto", CPU).kind == "sdpa-default"
    assert choose_backend("sdpa-default", H100_NEW).kind == "sdpa-default"
    assert isinstance(sb.sdpa_context(choose_backend("sdpa-default", H100_NEW)), type(sb.contextlib.nullcontext()))


def test_optional_backends_only_when_importable():
    fa3 = DeviceFacts("cuda", (9, 0), 91501, frozenset({"fa3"}))
    assert choose_backend("auto", fa3).kind == "fa3"
    assert choose_backend("auto", fa3, has_mask=True).priority[0] == FL  # FA3 takes no mask
    assert choose_backend("auto", DeviceFacts("cuda", (8, 0), 91501, frozenset({"fa3"}))).priority[0] == FL
    assert choose_backend("auto", DeviceFacts("cuda", (9, 0), 91501, frozenset({"te"}))).priority[0] == C
    assert choose_backend("te", DeviceFacts("cuda", (9, 0), 91501, frozenset({"te"}))).kind == "te"
    with pytest.raises(ValueError, match="backend='fa3'.*flash_attn_interface"):
        choose_backend("fa3", H100_NEW)


def test_cudnn_known_faults():
    # Before 9.15.1: illegal memory access for S not a multiple of 128 (SD3 1024 px: S = 4429).
    assert choose_backend("cudnn", H100_OLD, seq_len=4429).priority[0] == FL
    assert choose_backend("cudnn", H100_OLD, seq_len=None).priority[0] == FL  # unknown length: not safe
    assert choose_backend("cudnn", H100_OLD, seq_len=4608).priority[0] == C
    assert choose_backend("cudnn", H100_NEW, seq_len=4429).priority[0] == C
    with pytest.raises(ValueError, match="attention_mask"):
        choose_backend("cudnn", H100_NEW, has_mask=True)


@pytest.mark.parametrize(("name", "first"), [("flash", FL), ("efficient", EF), ("math", MA), ("cudnn", C)])
def test_named_sdpa_backends(name, first):
    for facts in (H100_NEW, A100, CPU):
        assert choose_backend(name, facts, seq_len=4608).priority[0] == first


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("flash3", H100_NEW)
    with pytest.raises(ValueError, match="backend"):
        patch_attention(torch.nn.Linear(1, 1), mode="bf16", backend="cuDNN")


def test_device_facts_read_from_torch(monkeypatch):
    monkeypatch.setattr(sb, "_FACTS", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91400)
    facts = sb.device_facts("cuda:0")
    assert facts == DeviceFacts("cuda", (9, 0), 91400, sb.optional_available())
    assert sb.device_facts(torch.device("cuda", 0)) is facts  # read once per device
    assert sb.device_facts("cpu").device_type == "cpu" and sb.device_facts("cpu").capability is None


def test_context_sets_torch_priority_and_enables_only_the_list():
    order_before = torch._C._get_sdp_priority_order()
    choice = BackendChoice("sdpa", (EF, MA))
    with sb.sdpa_context(choice):
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
        if sb._HAS_SET_PRIORITY:
            order = torch._C._get_sdp_priority_order()
            assert list(order[:2]) == [int(EF), int(MA)]
    assert torch._C._get_sdp_priority_order() == order_before and torch.backends.cuda.flash_sdp_enabled()


def test_run_attention_matches_sdpa_with_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g, requires_grad=True) for _ in range(3))
    with sdpa_kernel([MA]):
        ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = sb.run_attention(q, k, v, backend="math")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(16), -1) @ v.double()
    for name in ("auto", "sdpa-default", "flash", "efficient"):
        torch.testing.assert_close(sb.run_attention(q, k, v, backend=name).double(), exact, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- processors (CPU, tiny models)


def _tiny_longcat():
    from diffusers.models.transformers.transformer_longcat_image import LongCatImageTransformer2DModel

    from cdm_train.models.longcat import LONGCAT_TINY_ARCH

    torch.manual_seed(0)
    return LongCatImageTransformer2DModel(**LONGCAT_TINY_ARCH).eval()


def _longcat_inputs(b=2, img=64, txt=6):
    g = torch.Generator().manual_seed(3)
    side = int(math.isqrt(img))
    axis = torch.arange(side).float()
    ids = torch.stack(torch.meshgrid(torch.ones(1), axis + 512, axis + 512, indexing="ij"), -1).reshape(-1, 3)
    return {"hidden_states": torch.randn(b, img, 64, generator=g),
            "encoder_hidden_states": torch.randn(b, txt, 16, generator=g),
            "timestep": torch.tensor([0.3, 0.8][:b]), "img_ids": ids, "txt_ids": torch.zeros(txt, 3)}


def _models():
    pytest.importorskip("diffusers")
    from tests.test_fp8_attention import _flux_inputs, _sd3_inputs, _tiny_flux, _tiny_sd3

    return {"sd3": (_tiny_sd3, _sd3_inputs, 2), "flux": (lambda: _tiny_flux(32), _flux_inputs, 2),
            "longcat": (_tiny_longcat, _longcat_inputs, 2)}


def _output_and_grads(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().mean(), params)
    return out.detach(), grads


@pytest.mark.parametrize("family", ["sd3", "flux", "longcat"])
def test_processors_give_diffusers_outputs_and_gradients(family, monkeypatch):
    """Every pass (grad and no-grad) through our processors under a backend equals diffusers' stock processors
    under the same SDPA kernel: bit for bit with math; the 8-bit modes keep this for passes with gradients."""
    build, make_inputs, n_attn = _models()[family]
    model, inputs = build(), make_inputs()
    with sdpa_kernel([MA]):
        stock_out, stock_grads = _output_and_grads(model, inputs)
        with torch.no_grad():
            stock_nograd = model(**inputs, return_dict=False)[0]
    default_out, _ = _output_and_grads(model, inputs)
    ran = []
    real_choose = sb.choose_backend

    def spy(*a, **kw):
        ran.append(real_choose(*a, **kw))
        return ran[-1]

    import cdm_kernels.attention.processors as processors_mod

    monkeypatch.setattr(processors_mod, "choose_backend", spy)
    monkeypatch.setattr(sb, "choose_backend", spy)
    try:
        report = patch_attention(model, mode="bf16", backend="math")
        assert len(report["patched"]) == n_attn and not report["skipped"]
        out, grads = _output_and_grads(model, inputs)
        with torch.no_grad():
            nograd = model(**inputs, return_dict=False)[0]
        assert ran and all(c.priority == (MA,) for c in ran)  # the choice was made, per call
        assert torch.equal(out, stock_out) and torch.equal(nograd, stock_nograd)
        assert all(torch.equal(a, b) for a, b in zip(grads, stock_grads))
        # auto on the CPU: torch's own order, i.e. exactly diffusers' default.
        patch_attention(model, mode="bf16", backend="auto")
        assert torch.equal(_output_and_grads(model, inputs)[0], default_out)
        # the emulated 8-bit mode: passes with gradients still take the exact backend.
        patch_attention(model, mode="fp8_emulated_no_grad", backend="math")
        out8, grads8 = _output_and_grads(model, inputs)
        assert torch.equal(out8, stock_out) and all(torch.equal(a, b) for a, b in zip(grads8, stock_grads))
    finally:
        assert unpatch_attention(model) == n_attn


def test_flux_processor_passes_the_mask_and_never_takes_cudnn_with_it(monkeypatch):
    """A mask reaches the dispatch under a priority without cuDNN (auto, faked sm_90 with a new cuDNN)."""
    pytest.importorskip("diffusers")
    import cdm_kernels.attention.processors as processors_mod
    from tests.test_fp8_attention import _flux_inputs, _tiny_flux

    monkeypatch.setattr(processors_mod, "device_facts", lambda device: H100_NEW)
    seen = []
    real_context = sb.sdpa_context

    def spy(choice):
        seen.append(choice)
        return real_context(BackendChoice("sdpa", (MA,)))  # run on the CPU

    monkeypatch.setattr(processors_mod, "sdpa_context", spy)
    flux = _tiny_flux(32)
    proc = processors_mod.CDMFluxAttnProcessor(mode="bf16", backend="auto")
    attn = flux.transformer_blocks[0].attn
    inputs = _flux_inputs()
    hidden = torch.randn(1, 64, attn.query_dim)
    enc = torch.randn(1, 13, attn.query_dim)
    mask = torch.ones(1, 77, dtype=torch.bool)
    with torch.no_grad():
        proc(attn, hidden, enc)
        proc(attn, hidden, enc, attention_mask=mask)
    assert seen[0].priority[0] == C and C not in seen[1].priority
    assert inputs  # the fixture builds (shapes above follow it)
    with pytest.raises(ValueError, match="attention_mask"):
        with torch.no_grad():
            processors_mod.CDMFluxAttnProcessor(mode="bf16", backend="cudnn")(attn, hidden, enc, attention_mask=mask)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "h", "s", "d"), [(2, 24, 4429, 64), (1, 24, 4608, 128), (2, 24, 4096, 128)])
def test_gpu_chosen_backend_matches_flash(b, h, s, d):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out = sb.run_attention(q, k, v, backend="auto")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = sb.run_attention(q, k, v, backend="flash")
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, r in zip(grads, ref_grads):
        rel = float((a.float() - r.float()).norm() / r.float().norm())
        assert rel < 2e-2, rel


def test_backend_choice_compiles_fullgraph(monkeypatch, tmp_path):
    """The per-call choice and the sdpa_kernel context trace into one graph (no break, same values)."""
    pytest.importorskip("diffusers")
    from tests.test_fp8_attention import _sd3_inputs, _tiny_sd3

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, inputs = _tiny_sd3(), _sd3_inputs()
    patch_attention(model, mode="bf16", backend="math")
    try:
        with torch.no_grad():
            eager = model(**inputs, return_dict=False)[0]
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            assert torch.equal(compiled(**inputs, return_dict=False)[0], eager)
    finally:
        unpatch_attention(model)
        torch._dynamo.reset()


def test_environment_log_names_the_sdpa_kernel_that_ran():
    """gpu_checks env records which SDPA implementation really ran under a backend (profiler names)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks.py"
    spec = importlib.util.spec_from_file_location("_gpu_checks_for_test", path)
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    math_row = gpu_checks.sdpa_kernels_that_ran("cpu", "math", "tiny", (1, 2, 33, 16))
    default_row = gpu_checks.sdpa_kernels_that_ran("cpu", "sdpa-default", "tiny", (1, 2, 33, 16))
    assert "error" not in math_row and math_row["choice"] == "sdpa[math]"
    assert any("math" in name for name in math_row["aten_ops"])
    assert default_row["choice"] == "sdpa-default" and not any("math" in n for n in default_row["aten_ops"])
    assert "error" in gpu_checks.sdpa_kernels_that_ran("cpu", "no-such-backend", "tiny", (1, 2, 33, 16))
