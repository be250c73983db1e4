"""quantize_frozen: layer selection (anywhere), the no-op path (CPU), torchao FP8 (GPU, sm_89+)."""

from __future__ import annotations

import logging

import pytest
import torch

from cdm_kernels.fp8 import plan_fp8_linears, quantize_frozen, torchao_available


def _tiny_sd3(dtype=torch.bfloat16):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # Wide enough (hidden 512) that the attention and MLP linears are eligible.
    model = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=8,
        joint_attention_dim=64, caption_projection_dim=512, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16,
    )
    return model.to(dtype).eval().requires_grad_(False)


def test_plan_selects_large_aligned_linears_and_says_why_others_are_skipped():
    model = _tiny_sd3()
    eligible, skipped = plan_fp8_linears(model)
    assert "transformer_blocks.0.attn.to_q" in eligible
    assert "transformer_blocks.0.ff.net.2" in eligible  # 2048 -> 512
    assert "context_embedder" not in eligible and "thinner than 512" in skipped["context_embedder"]  # 64 -> 512
    assert "thinner" in skipped["proj_out"]  # 512 -> 16
    assert "AdaLayerNormZero" in skipped["transformer_blocks.0.norm1.linear"]
    assert "AdaLayerNormContinuous" in skipped["norm_out.linear"]
    assert "Timestep" in skipped["time_text_embed.timestep_embedder.linear_1"]
    assert not set(eligible) & set(skipped)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(eligible) + len(skipped) == n_linear


def test_plan_reports_unaligned_and_non_bf16():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1000), torch.nn.Linear(1000, 1024)).to(torch.bfloat16)
    model.append(torch.nn.Linear(1024, 1024))  # fp32
    eligible, skipped = plan_fp8_linears(model)
    assert eligible == []
    assert "divisible by 16" in skipped["0"] and "divisible by 16" in skipped["1"]
    assert "bf16" in skipped["2"]


def test_noop_on_cpu_with_one_log_line(caplog):
    model = _tiny_sd3()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="cdm_kernels"):
        report = quantize_frozen(model)
    assert not report.applied and "cpu" in report.reason
    assert len([r for r in caplog.records if "quantize_frozen" in r.getMessage()]) == 1
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and type(after[k]) is torch.Tensor for k in before)
    assert all(type(m.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_refuses_trainable_weights():
    model = _tiny_sd3().requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        quantize_frozen(model)


@pytest.mark.skipif(not torchao_available(), reason="torchao not installed (optional [fp8] extra)")
def test_torchao_config_builds():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    assert cfg is not None


@pytest.mark.gpu
def test_gpu_quantize_frozen_teacher_velocity():
    if not torchao_available():
        pytest.skip("torchao not installed (optional [fp8] extra)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89+")
    model = _tiny_sd3().cuda()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 13, 64, generator=g),
        "pooled_projections": torch.randn(2, 64, generator=g),
        "timestep": torch.tensor([500.0, 900.0]),
    }
    inputs = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v.cuda()
              for k, v in inputs.items()}
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0].float()
        report = quantize_frozen(model)
        out = model(**inputs, return_dict=False)[0].float()
    assert report.applied and report.quantized
    w = model.transformer_blocks[0].attn.to_q.weight
    assert "float8" in f"{type(w)} {type(w.data)}".lower()  # a torchao float8 tensor subclass now
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 0.1, f"relative error {rel:.3f}"
