"""Flux: packed 2x2 latents, position ids, the guidance embedding, dynamic shift, and the trainer on a tiny Flux."""

import pytest
import torch

from cdm_train.adapters import FluxAdapter, flux_image_ids, pack_latents, unpack_latents
from cdm_train.config import make_config
from cdm_train.presets import build_models, resolve_shift
from cdm_train.schedule import Shift, flux_mu
from cdm_train.trainer import Trainer

from .helpers import one_iteration

diffusers = pytest.importorskip("diffusers")


def flux_config(tmp_path, *overrides):
    base = [f"train.out_dir={tmp_path}", "train.progress=false", "train.tensorboard=false", "train.log_every=1"]
    return make_config("flux-tiny", overrides=base + list(overrides))


def test_packing_and_ids_are_fluxpipelines():
    from diffusers import FluxPipeline

    x = torch.randn(3, 16, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), x)  # exact round trip
    assert torch.equal(unpack_latents(packed, 8, 12), FluxPipeline._unpack_latents(packed, 8 * 8, 12 * 8, 8))
    assert torch.equal(flux_image_ids(8, 12, "cpu"), FluxPipeline._prepare_latent_image_ids(3, 4, 6, "cpu",
                                                                                          torch.float32))


def test_adapter_is_a_direct_transformer_call_with_guidance(tmp_path):
    from diffusers import FluxPipeline

    m = build_models(flux_config(tmp_path), torch.device("cpu"))
    assert isinstance(m.adapter, FluxAdapter) and m.adapter.guidance_embeds
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *m.latent_shape, generator=g)
    sigma = torch.rand(2, generator=g)
    cond = m.sample_cond(2, g)
    assert torch.equal(cond["guidance"], torch.full((2,), 3.5))  # model.flux_guidance
    with torch.no_grad():
        ours = m.adapter(m.teacher, x, sigma, cond)
        direct = m.teacher(hidden_states=FluxPipeline._pack_latents(x, 2, 16, 8, 8),
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"], timestep=sigma, guidance=cond["guidance"],
                           img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                           txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3), return_dict=False)[0]
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(direct, 64, 64, 8), rtol=0, atol=0)


def test_guidance_distilled_cfg_augmentation_pair(tmp_path):
    """CA for a guidance-distilled teacher: same prompt, guidance g (cond) vs guidance 1 (uncond)."""
    m = build_models(flux_config(tmp_path), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    cond = m.sample_cond(3, g)
    uncond = m.adapter.uncond(cond)
    assert torch.equal(uncond["encoder_hidden_states"], cond["encoder_hidden_states"])  # no empty-prompt pass
    assert torch.equal(uncond["pooled_projections"], cond["pooled_projections"])
    assert torch.equal(uncond["guidance"], torch.ones(3))
    x, sigma = torch.randn(3, *m.latent_shape, generator=g), torch.full((3,), 0.6)
    with torch.no_grad():
        v_g, v_1 = m.adapter(m.teacher, x, sigma, cond), m.adapter(m.teacher, x, sigma, uncond)
    assert not torch.allclose(v_g, v_1)  # the guidance embedding is what the CA direction measures
    # Without a guidance embedding the SD3 semantics apply: the null (empty-prompt) condition.
    plain = FluxAdapter({k: v[:1] * 0 + 7 for k, v in cond.items() if k != "guidance"}, guidance_embeds=False)
    assert torch.equal(plain.uncond(cond)["encoder_hidden_states"], torch.full_like(cond["encoder_hidden_states"], 7))


def test_flux_shift_is_dynamic_by_resolution():
    assert resolve_shift(make_config("flux-shape", overrides=["model.resolution=1024"])) == Shift(mu=flux_mu(4096))
    assert flux_mu(4096) == pytest.approx(1.15) and flux_mu(256) == pytest.approx(0.5)
    assert resolve_shift(make_config("flux-shape", overrides=["model.resolution=512"])) == Shift(mu=flux_mu(1024))
    assert resolve_shift(make_config("flux-shape", overrides=["schedule.shift=3.0"])) == Shift(3.0)


def test_exact_speed_switches_change_nothing_on_flux(tmp_path):
    off = ["speed.shared_student_forward=false", "speed.early_exit_rollout=false",
           "speed.batched_teacher_calls=false", "speed.backend=reference"]
    fixed = "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]"
    base = one_iteration(flux_config(tmp_path, fixed, "train.batch_size=4", *off))
    fast = one_iteration(flux_config(tmp_path, fixed, "train.batch_size=4"))
    assert base["losses"].total > 0 and base["losses"].cdm > 0
    assert fast["rollout"].nfe < base["rollout"].nfe
    for name in ("ca", "dm", "cdm", "total"):
        torch.testing.assert_close(getattr(base["losses"], name), getattr(fast["losses"], name), rtol=1e-5, atol=1e-7)
    for a, b in zip(base["student_grads"], fast["student_grads"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_tiny_flux_trains_and_resumes_exactly(tmp_path):
    straight = Trainer(flux_config(tmp_path / "a", "train.steps=6", "train.checkpoint_every=3"))
    straight.train()
    first = Trainer(flux_config(tmp_path / "b", "train.steps=6", "train.checkpoint_every=3"))
    first.train(steps=3)
    resumed = Trainer(flux_config(tmp_path / "b", "train.steps=6", "train.checkpoint_every=3"))
    resumed.resume()
    resumed.train()
    key = [(r["step"], r["loss_fake"], r.get("loss_student")) for r in straight.history]
    assert [(r["step"], r["loss_fake"], r.get("loss_student")) for r in first.history + resumed.history] == key
    fakes = [r["loss_fake"] for r in straight.history]
    assert all(f == f and f > 0 for f in fakes)  # finite, non-trivial losses


@pytest.fixture(scope="module")
def flux_pipeline_dir(tmp_path_factory):
    """A tiny FluxPipeline directory: the flux-tiny transformer, Flux's dynamic-shift scheduler, a one-block
    16-channel VAE, no text encoders (precomputed embeddings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from cdm_train.presets import FLUX_TINY_ARCH

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), latent_channels=16,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.3611, shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=FluxTransformer2DModel(**FLUX_TINY_ARCH))
    root = tmp_path_factory.mktemp("flux-tiny")
    pipe.save_pretrained(root)
    g = torch.Generator().manual_seed(1)
    torch.save({"encoder_hidden_states": torch.randn(6, 5, 16, generator=g),
                "pooled_projections": torch.randn(6, 8, generator=g),
                "null_encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
                "null_pooled_projections": torch.randn(1, 8, generator=g)}, root / "embeds.pt")
    return root


def test_flux_export_pipeline_and_images(flux_pipeline_dir, tmp_path):
    import json

    from diffusers import FluxPipeline

    from cdm_train.adapters import pack_latents
    from cdm_train.checkpoint import load
    from cdm_train.cli import main
    from cdm_train.config import config_from_dict
    from cdm_train.export import load_student
    from cdm_train.sampling import sample_euler

    run, out = tmp_path / "run", tmp_path / "export"
    args = ["train", "--preset", "flux", "--set", f"model.path={flux_pipeline_dir}", "--set",
            f"model.prompt_embeds={flux_pipeline_dir / 'embeds.pt'}", "--set", "model.resolution=64",
            "--set", "train.batch_size=2", "--set", "schedule.max_steps=3", "--set", "optim.update_ratio=1",
            "--set", "optim.student_warmup_steps=0", "--set", "optim.student_lr=1e-2", "--steps", "2",
            "--out", str(run), "--no-progress"]
    assert main(args) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    meta = json.loads((out / "cdm_export.json").read_text())
    assert meta["pipeline"] == "FluxPipeline" and meta["guidance_scale"] == 3.5 and meta["dynamic_shift_mu"]
    no_text = {k: None for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    pipe = FluxPipeline.from_pretrained(str(out), torch_dtype=torch.float32, **no_text)
    state = load(run)
    cfg = config_from_dict(state["config"])
    model, adapter, sample_cond, latent = load_student(state, cfg, ema=True)
    g = torch.Generator().manual_seed(4)
    cond = sample_cond(2, g)
    noise = torch.randn(2, *latent, generator=g)
    theirs = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                  latents=pack_latents(noise), sigmas=meta["sigmas"], num_inference_steps=4,
                  guidance_scale=meta["guidance_scale"], height=8, width=8, output_type="latent",
                  return_dict=False)[0]
    from cdm_train.presets import resolve_shift

    with torch.no_grad():
        mine = sample_euler(model, adapter, cond, noise, 4, sigmas=meta["sigmas"] + [0.0], shift=resolve_shift(cfg))
    torch.testing.assert_close(theirs.float(), pack_latents(mine), rtol=1e-4, atol=1e-5)
    imgs = tmp_path / "imgs"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--out", str(imgs), "--device", "cpu"]) == 0
    assert len(list(imgs.glob("*.png"))) == 2
