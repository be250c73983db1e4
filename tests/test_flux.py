"""Flux: packed 2x2 latents, position ids, the guidance embedding, dynamic shift, and the trainer on a tiny Flux."""

import pytest
import torch

from cdm_train.config import make_config
from cdm_train.models.base import pack_latents, unpack_latents
from cdm_train.models.build import build_models, resolve_shift
from cdm_train.models.flux import FluxAdapter, flux_image_ids
from cdm_train.schedule import Shift, flux_mu
from cdm_train.trainer import Trainer

from .helpers import one_iteration
from .test_equivalence import OFF, _assert_same

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


@pytest.mark.parametrize("switch", ["shared_student_forward", "early_exit_rollout", "batched_teacher_calls"])
def test_each_exact_speed_switch_changes_nothing_on_flux(tmp_path, switch):
    """tests/test_equivalence.py on flux-tiny: losses, fake-teacher loss and both networks' gradients."""
    on = [o for o in OFF if switch not in o]
    fixed = "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]"
    base = one_iteration(flux_config(tmp_path, fixed, "train.batch_size=4", *OFF))
    fast = one_iteration(flux_config(tmp_path, fixed, "train.batch_size=4", *on))
    assert base["losses"].total > 0 and base["losses"].cdm > 0 and base["losses"].ca > 0
    assert any(g.abs().sum() > 0 for g in base["student_grads"])
    _assert_same(base, fast)
    if switch == "early_exit_rollout":
        assert fast["rollout"].nfe < base["rollout"].nfe


def test_all_exact_switches_on_flux_on_the_dynamic_schedule(tmp_path):
    for step in (0, 1):  # different schedule lengths and index patterns
        base = one_iteration(flux_config(tmp_path, "train.batch_size=3", *OFF), step=step)
        fast = one_iteration(flux_config(tmp_path, "train.batch_size=3"), step=step)
        assert fast["rollout"].nfe <= base["rollout"].nfe
        _assert_same(base, fast)


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

    from cdm_train.models.flux import FLUX_TINY_ARCH

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

    from cdm_train.checkpoint import load
    from cdm_train.cli import main
    from cdm_train.config import config_from_dict
    from cdm_train.export import load_student
    from cdm_train.models.base import pack_latents
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
    from cdm_train.models.build import resolve_shift

    with torch.no_grad():
        mine = sample_euler(model, adapter, cond, noise, 4, sigmas=meta["sigmas"] + [0.0], shift=resolve_shift(cfg))
    torch.testing.assert_close(theirs.float(), pack_latents(mine), rtol=1e-4, atol=1e-5)
    imgs = tmp_path / "imgs"
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--out", str(imgs), "--device", "cpu"]) == 0
    assert len(list(imgs.glob("*.png"))) == 2


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_flux_rollout_sigmas_are_the_dynamic_shift_schedulers(tmp_path, resolution):
    """The rollout's anchor sigmas equal FluxPipeline's: FlowMatchEulerDiscreteScheduler (use_dynamic_shifting)
    given the raw schedule as `sigmas` and mu = calculate_shift(image tokens) from the directory's scheduler
    config (non-default shift bounds here, so reading the directory matters)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from cdm_train.draws import draw_iteration
    from cdm_train.schedule import shift_from_scheduler_config

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.save_pretrained(tmp_path / "scheduler")
    cfg = make_config("flux", overrides=[f"model.path={tmp_path}", "model.prompt_embeds=x.pt",
                                         f"model.resolution={resolution}", "schedule.fixed=[1.0, 0.8, 0.55, 0.3]"])
    seq_len = (resolution // 16) ** 2  # packed 2x2 tokens of the (res/8)^2 latent
    mu = calculate_shift(seq_len, 256, 4096, 0.4, 1.3)
    shift = resolve_shift(cfg)
    assert shift == shift_from_scheduler_config(tmp_path, seq_len) and shift.mu == pytest.approx(mu)
    d = draw_iteration(cfg, lambda b, g: torch.zeros(b), (1, 1, 1), shift, rank=0, step=0, device=torch.device("cpu"))
    sched.set_timesteps(sigmas=d.raw_sigmas[:-1], mu=mu)
    assert d.sigmas == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
    assert d.sigmas[0] == 1.0 and d.sigmas[-1] == 0.0


def test_trainer_rollout_on_flux_tiny_uses_the_dynamic_shift(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = Trainer(flux_config(tmp_path, "schedule.fixed=[1.0, 0.75, 0.5, 0.25]"))
    assert tr.models.shift == Shift(mu=flux_mu(16))  # 8x8 latent -> 4x4 = 16 packed tokens
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=flux_mu(16))
    assert tr.draws(0).sigmas == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


def test_trainer_ca_is_teacher_at_guidance_g_minus_teacher_at_guidance_1(tmp_path):
    """The CA term the trainer computes (batched teacher calls on) equals cfg_loss with the teacher called
    directly at the run's guidance g (cond) and at guidance 1.0 on the same prompt (uncond), scaled by
    loss.guidance_scale; DM uses the teacher and fake teacher at g."""
    import cdm_kernels as ck
    from cdm_train.rng import NOISE_CA, NOISE_DM
    from cdm_train.rollout import rollout
    from cdm_train.steps import student_losses, training_sigmas

    cfg = flux_config(tmp_path, "model.flux_guidance=4.0", "loss.guidance_scale=3.0", "speed.backend=reference",
                      "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]")
    tr = Trainer(cfg)
    m = tr.models
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for net, scale in ((m.fake, 0.05), (m.student, 0.02)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    d = tr.draws(0)
    assert torch.equal(d.cond["guidance"], torch.full((cfg.train.batch_size,), 4.0))
    with ck.use_backend("reference"):
        ro = rollout(m.student, m.adapter, d.cond, d.noise, d.sigmas, d.indices, early_exit=True)
        sg = training_sigmas(cfg, d.uniform, ro.sigma_i)
        losses = student_losses(cfg, m.student, m.teacher, m.fake, m.adapter, ro, d.cond, sg, d.rnd)

        b, _, h, w = ro.x_i.shape
        text = d.cond["encoder_hidden_states"]

        def direct(net, x, sigma, guidance):  # FluxTransformer2DModel called as FluxPipeline calls it
            out = net(hidden_states=pack_latents(x), encoder_hidden_states=text,
                      pooled_projections=d.cond["pooled_projections"], timestep=sigma, guidance=guidance,
                      img_ids=flux_image_ids(h, w, "cpu"), txt_ids=torch.zeros(text.shape[1], 3),
                      return_dict=False)[0]
            return unpack_latents(out, h, w)

        with torch.no_grad():
            v_student = direct(m.student, ro.x_i, ro.sigma_i, torch.full((b,), 4.0))
            _, xt_ca = ck.predict_x0_renoise(ro.x_i, v_student, ro.sigma_i, sg.ca_teacher, seed=d.rnd.seeds[NOISE_CA])
            _, xt_dm = ck.predict_x0_renoise(ro.x_i, v_student, ro.sigma_i, sg.dm_teacher, seed=d.rnd.seeds[NOISE_DM])
            v_g = direct(m.teacher, xt_ca, sg.ca_teacher, torch.full((b,), 4.0))
            v_1 = direct(m.teacher, xt_ca, sg.ca_teacher, torch.ones(b))
            ca = ck.cfg_loss(v_student, v_g, v_1, ro.x_i, xt_ca, ro.sigma_i, sg.ca_teacher, guidance_scale=3.0)
            dm = ck.dm_loss(v_student, direct(m.teacher, xt_dm, sg.dm_teacher, torch.full((b,), 4.0)),
                            direct(m.fake, xt_dm, sg.dm_teacher, torch.full((b,), 4.0)), ro.x_i, xt_dm, ro.sigma_i,
                            sg.dm_teacher)
    assert float(ca) > 0 and float(dm) > 0
    torch.testing.assert_close(losses.ca.detach(), ca, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(losses.dm.detach(), dm, rtol=1e-5, atol=1e-8)
    # guidance 1 is not a no-op input of the embedding: the two teacher calls differ
    assert not torch.allclose(v_g, v_1)


def test_flux_without_guidance_embedding_uses_the_null_prompt(tmp_path):
    """A Flux teacher without a guidance embedding (schnell-like): guidance=None reaches the model and CA
    contrasts the prompt with the null (empty-prompt) embeddings, as for SD3."""
    from diffusers import FluxTransformer2DModel

    from cdm_train.models.flux import FLUX_TINY_ARCH

    torch.manual_seed(0)
    net = FluxTransformer2DModel(**dict(FLUX_TINY_ARCH, guidance_embeds=False)).eval()
    g = torch.Generator().manual_seed(2)
    null = {"encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "pooled_projections": torch.randn(1, 8,
                                                                                                        generator=g)}
    adapter = FluxAdapter(null, guidance_embeds=False)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 16, generator=g), "pooled_projections": torch.randn(2, 8,
                                                                                                       generator=g),
            "guidance": torch.full((2,), 3.5)}
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ours = adapter(net, x, sigma, cond)
        direct = net(hidden_states=pack_latents(x), encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], timestep=sigma, guidance=None,
                     img_ids=flux_image_ids(8, 8, "cpu"), txt_ids=torch.zeros(6, 3), return_dict=False)[0]
    assert torch.equal(ours, unpack_latents(direct, 8, 8))
    un = adapter.uncond(cond)
    assert torch.equal(un["encoder_hidden_states"], null["encoder_hidden_states"].expand(2, 6, 16))
    assert torch.equal(un["pooled_projections"], null["pooled_projections"].expand(2, 8))


def test_tiny_flux_training_lowers_the_fake_teacher_loss(tmp_path):
    """20 steps of flux-tiny: the fake teacher's flow-matching loss on a fixed held-out batch of the student's
    samples goes down (as test_trainer checks for the SD3-architecture tiny preset)."""
    import cdm_kernels as ck
    from cdm_train.sampling import sample_euler

    tr = Trainer(flux_config(tmp_path, "train.steps=20"))
    m = tr.models
    g = torch.Generator().manual_seed(123)
    cond = m.sample_cond(32, g)
    with torch.no_grad():
        x0 = sample_euler(m.student, m.adapter, cond, torch.randn(32, *m.latent_shape, generator=g), 4, shift=m.shift)
    sigma = torch.rand(32, generator=g).clamp(0.02, 0.98)

    def heldout_loss():
        with torch.no_grad():
            xt = ck.renoise(x0, sigma, seed=99)
            return float(ck.flow_matching_loss(m.adapter(m.fake, xt, sigma, cond), x0, seed=99))

    before = heldout_loss()
    tr.train()
    after = heldout_loss()
    assert after < 0.99 * before, (before, after)  # deterministic on CPU: 2.241 -> 2.171 when written


def test_encode_prompts_for_flux_then_train_the_flux_preset(tmp_path):
    """`cdm-train encode-prompts` on a FluxPipeline (tiny CLIP-L for the pooled vector + tiny T5 for the token
    embeddings, built offline): the shards hold what FluxPipeline.encode_prompt returns, and the flux preset
    trains from that directory (guidance embedding and dynamic shift from the model directory)."""
    pytest.importorskip("transformers")
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from cdm_train.cli import main
    from cdm_train.models.flux import FLUX_TINY_ARCH
    from cdm_train.prompts import PromptEmbeds

    from .test_prompts import WORDS, _tokenizer

    torch.manual_seed(0)
    vocab = len(WORDS) + 3
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2))  # pooled width 8 = pooled_projection_dim
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                        text_encoder=clip, tokenizer=_tokenizer(77), text_encoder_2=t5, tokenizer_2=_tokenizer(32),
                        transformer=FluxTransformer2DModel(**FLUX_TINY_ARCH))
    model = tmp_path / "flux"
    pipe.save_pretrained(model)
    prompts = tmp_path / "p.txt"
    texts = ["a cat on the moon", "a red car", "photo of a blue dog"]
    prompts.write_text("\n".join(texts) + "\n")
    emb = tmp_path / "emb"
    assert main(["encode-prompts", "--model", str(model), "--prompts", str(prompts), "--out", str(emb),
                 "--device", "cpu", "--dtype", "float32", "--max-sequence-length", "12"]) == 0
    assert json.loads((emb / "index.json").read_text())["num_prompts"] == 3
    data = PromptEmbeds(emb)
    rows = data.rows([2, 0])
    assert rows["encoder_hidden_states"].shape == (2, 12, 16)  # T5 tokens only (CLIP gives the pooled vector)
    assert rows["pooled_projections"].shape == (2, 8)
    pipe = FluxPipeline.from_pretrained(str(model), transformer=None, vae=None)  # eval mode, as encode-prompts
    embeds, pooled, _ = pipe.encode_prompt([texts[2], texts[0]], None, device="cpu", max_sequence_length=12)
    torch.testing.assert_close(rows["encoder_hidden_states"], embeds)
    torch.testing.assert_close(rows["pooled_projections"], pooled)
    null, null_pooled, _ = pipe.encode_prompt([""], None, device="cpu", max_sequence_length=12)
    torch.testing.assert_close(data.null()["encoder_hidden_states"], null)
    torch.testing.assert_close(data.null()["pooled_projections"], null_pooled)

    cfg = make_config("flux", overrides=[f"model.path={model}", f"model.prompt_embeds={emb}", "model.resolution=64",
                                         "train.batch_size=2", "schedule.max_steps=2", "train.steps=2",
                                         f"train.out_dir={tmp_path / 'r'}", "train.progress=false",
                                         "train.tensorboard=false", "train.log_every=1"])
    tr = Trainer(cfg)
    assert tr.models.latent_shape == (16, 8, 8) and tr.models.shift == Shift(mu=flux_mu(16))
    tr.train()
    assert [r["step"] for r in tr.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss_fake"])) for r in tr.history)
