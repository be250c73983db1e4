"""LongCat-Image: packed latents, the pipeline's position ids, sigma timesteps, true CFG on the encoded empty
prompt, dynamic shift, the official preset, LoRA on LongCat's linears, encode-prompts with a Qwen2.5-VL text
encoder, export to a LongCatImagePipeline directory and sampling (all on tiny random-init models, CPU)."""

import json

import pytest
import torch

from cdm_train.config import make_config
from cdm_train.models.base import pack_latents, unpack_latents
from cdm_train.models.build import build_models, resolve_shift
from cdm_train.models.longcat import (
    LONGCAT_FF_TARGETS,
    LONGCAT_TARGETS,
    LONGCAT_TINY_ARCH,
    LongCatAdapter,
    longcat_image_ids,
    longcat_text_ids,
)
from cdm_train.schedule import Shift, flux_mu
from cdm_train.trainer import Trainer

from .helpers import one_iteration
from .test_equivalence import OFF, _assert_same

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "LongCatImagePipeline"):
    pytest.skip("this diffusers has no LongCat-Image (0.36+)", allow_module_level=True)

BASE = ["train.progress=false", "train.tensorboard=false", "train.log_every=1"]


def longcat_config(tmp_path, *overrides):
    return make_config("longcat-tiny", overrides=[f"train.out_dir={tmp_path}", *BASE, *overrides])


def test_packing_and_position_ids_are_the_pipelines():
    from diffusers import LongCatImagePipeline
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    x = torch.randn(3, 16, 8, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, LongCatImagePipeline._pack_latents(x, 3, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), LongCatImagePipeline._unpack_latents(packed, 8, 12, 1))
    assert torch.equal(longcat_text_ids(7, "cpu"), prepare_pos_ids(modality_id=0, type="text", num_token=7))
    # the image offset is the pipeline's tokenizer_max_length (512), whatever the text length
    assert torch.equal(longcat_image_ids(8, 12, "cpu"),
                       prepare_pos_ids(modality_id=1, type="image", start=(512, 512), height=4, width=6))


def test_adapter_is_a_direct_transformer_call(tmp_path):
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

    m = build_models(longcat_config(tmp_path), torch.device("cpu"))
    assert isinstance(m.adapter, LongCatAdapter) and m.latent_shape == (16, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *m.latent_shape, generator=g)
    sigma = torch.rand(2, generator=g)
    cond = m.sample_cond(2, g)
    assert set(cond) == {"encoder_hidden_states"}  # no pooled vector, no guidance embedding
    text = cond["encoder_hidden_states"]
    with torch.no_grad():
        ours = m.adapter(m.teacher, x, sigma, cond)
        # as LongCatImagePipeline calls it: timestep = t / 1000 = sigma, ids from prepare_pos_ids
        direct = m.teacher(hidden_states=pack_latents(x), timestep=sigma, guidance=None, encoder_hidden_states=text,
                           txt_ids=prepare_pos_ids(0, "text", num_token=text.shape[1]),
                           img_ids=prepare_pos_ids(1, "image", start=(512, 512), height=4, width=4),
                           return_dict=False)[0]
        uncond = m.adapter.uncond(cond)
    torch.testing.assert_close(ours, unpack_latents(direct, 8, 8), rtol=1e-6, atol=1e-6)
    assert uncond["encoder_hidden_states"].shape == text.shape  # the null prompt, broadcast to the batch


def test_official_preset_values_and_dynamic_shift():
    cfg = make_config("longcat", overrides=["model.path=x", "model.prompt_embeds=y"])
    # config/config.py longcat(): batch 8, update ratio 2, lr 1e-5 / 5e-6, 1024 px; the root-level
    # random_sigma_min/max quirk leaves the inner sigmas at the sampler's U(0.25, 0.95).
    assert (cfg.train.batch_size, cfg.optim.update_ratio, cfg.optim.student_lr, cfg.optim.fake_lr) == (8, 2, 1e-5, 5e-6)
    assert (cfg.schedule.inner_sigma_min, cfg.schedule.inner_sigma_max, cfg.model.resolution) == (0.25, 0.95, 1024)
    assert (cfg.schedule.max_steps, cfg.loss.guidance_scale) == (28, 7.0)
    assert resolve_shift(cfg) == Shift(mu=flux_mu(4096)) and flux_mu(4096) == pytest.approx(1.15)
    assert resolve_shift(make_config("longcat-shape", overrides=["model.resolution=512"])) == Shift(mu=flux_mu(1024))
    from cdm_train.models import family_of

    assert family_of("longcat").default_max_sequence_length == 512


@pytest.mark.parametrize("switch", ["shared_student_forward", "early_exit_rollout", "batched_teacher_calls"])
def test_each_exact_speed_switch_changes_nothing_on_longcat(tmp_path, switch):
    on = [o for o in OFF if switch not in o]
    fixed = "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]"
    base = one_iteration(longcat_config(tmp_path, fixed, "train.batch_size=4", *OFF))
    fast = one_iteration(longcat_config(tmp_path, fixed, "train.batch_size=4", *on))
    assert base["losses"].total > 0 and base["losses"].cdm > 0 and base["losses"].ca > 0
    assert any(g.abs().sum() > 0 for g in base["student_grads"])
    _assert_same(base, fast)
    if switch == "early_exit_rollout":
        assert fast["rollout"].nfe < base["rollout"].nfe


def test_all_exact_switches_on_longcat(tmp_path):
    for step in (0, 1):
        base = one_iteration(longcat_config(tmp_path, "train.batch_size=3", *OFF), step=step)
        fast = one_iteration(longcat_config(tmp_path, "train.batch_size=3"), step=step)
        assert fast["rollout"].nfe <= base["rollout"].nfe
        _assert_same(base, fast)


def test_tiny_longcat_trains_and_resumes_exactly(tmp_path):
    run = ["train.steps=6", "train.checkpoint_every=3"]
    straight = Trainer(longcat_config(tmp_path / "a", *run))
    straight.train()
    first = Trainer(longcat_config(tmp_path / "b", *run))
    first.train(steps=3)
    resumed = Trainer(longcat_config(tmp_path / "b", *run))
    resumed.resume()
    resumed.train()
    key = [(r["step"], r["loss_fake"], r.get("loss_student")) for r in straight.history]
    assert [(r["step"], r["loss_fake"], r.get("loss_student")) for r in first.history + resumed.history] == key
    assert all(r["loss_fake"] == r["loss_fake"] and r["loss_fake"] > 0 for r in straight.history)


def test_trainer_ca_and_dm_are_direct_transformer_calls(tmp_path):
    """CA: the teacher on the prompt vs on the encoded empty prompt (true CFG); DM: teacher vs fake teacher;
    CDM: the same at the off-trajectory point x' = x_i + (s' - s_i) v_i."""
    import cdm_kernels as ck
    from cdm_train.rng import NOISE_CA, NOISE_CDM, NOISE_DM
    from cdm_train.rollout import rollout
    from cdm_train.steps import student_losses, training_sigmas

    cfg = longcat_config(tmp_path, "loss.guidance_scale=3.0", "speed.backend=reference",
                         "schedule.fixed=[1.0, 0.85, 0.6, 0.45, 0.3]")
    tr = Trainer(cfg)
    m = tr.models
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for net, scale in ((m.fake, 0.05), (m.student, 0.02)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        m.adapter.null_cond["encoder_hidden_states"].normal_(generator=g)  # an encoded "" is not zeros
    d = tr.draws(0)
    with ck.use_backend("reference"):
        ro = rollout(m.student, m.adapter, d.cond, d.noise, d.sigmas, d.indices, early_exit=True)
        sg = training_sigmas(cfg, d.uniform, ro.sigma_i)
        losses = student_losses(cfg, m.student, m.teacher, m.fake, m.adapter, ro, d.cond, sg, d.rnd)
        b, _, h, w = ro.x_i.shape

        def direct(net, x, sigma, text):
            out = net(hidden_states=pack_latents(x), encoder_hidden_states=text, timestep=sigma,
                      txt_ids=longcat_text_ids(text.shape[1], "cpu"), img_ids=longcat_image_ids(h, w, "cpu"),
                      return_dict=False)[0]
            return unpack_latents(out, h, w)

        text = d.cond["encoder_hidden_states"]
        null = m.adapter.null_cond["encoder_hidden_states"].expand_as(text)
        with torch.no_grad():
            v_student = direct(m.student, ro.x_i, ro.sigma_i, text)
            _, xt_ca = ck.predict_x0_renoise(ro.x_i, v_student, ro.sigma_i, sg.ca_teacher, seed=d.rnd.seeds[NOISE_CA])
            _, xt_dm = ck.predict_x0_renoise(ro.x_i, v_student, ro.sigma_i, sg.dm_teacher, seed=d.rnd.seeds[NOISE_DM])
            ca = ck.cfg_loss(v_student, direct(m.teacher, xt_ca, sg.ca_teacher, text),
                             direct(m.teacher, xt_ca, sg.ca_teacher, null), ro.x_i, xt_ca, ro.sigma_i, sg.ca_teacher,
                             guidance_scale=3.0)
            dm = ck.dm_loss(v_student, direct(m.teacher, xt_dm, sg.dm_teacher, text),
                            direct(m.fake, xt_dm, sg.dm_teacher, text), ro.x_i, xt_dm, ro.sigma_i, sg.dm_teacher)
            view = (-1, 1, 1, 1)
            x_p = ro.x_i + (sg.cdm_student - ro.sigma_i).view(view) * ro.v_i
            v_p = direct(m.student, x_p, sg.cdm_student, text)
            _, xt_cdm = ck.predict_x0_renoise(x_p, v_p, sg.cdm_student, sg.cdm_teacher, seed=d.rnd.seeds[NOISE_CDM])
            cdm = ck.dm_loss(v_p, direct(m.teacher, xt_cdm, sg.cdm_teacher, text),
                             direct(m.fake, xt_cdm, sg.cdm_teacher, text), x_p, xt_cdm, sg.cdm_student, sg.cdm_teacher)
    assert float(ca) > 0 and float(dm) > 0 and float(cdm) > 0
    torch.testing.assert_close(losses.ca.detach(), ca, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(losses.dm.detach(), dm, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(losses.cdm.detach(), cdm, rtol=1e-4, atol=1e-7)


def test_lora_targets_longcats_linears(tmp_path):
    cfg = longcat_config(tmp_path, "lora.student=true", "lora.fake=true", "lora.rank=2", "lora.alpha=2",
                         "train.steps=2", "optim.update_ratio=1")
    tr = Trainer(cfg)
    peft_model = tr.models.teacher.peft_model
    wrapped = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    # official LONGCAT_LORA_TARGET_MODULES + FF: the double blocks' attention and FFN linears and the single
    # blocks' q/k/v (they have no to_out: their output projection is proj_out, not a target)
    assert any(".transformer_blocks.0.attn.to_add_out" in n for n in wrapped)
    assert any(".transformer_blocks.0.ff_context.net.2" in n for n in wrapped)
    assert any(".single_transformer_blocks.0.attn.to_q" in n for n in wrapped)
    assert not any("proj_mlp" in n or n.endswith("proj_out") for n in wrapped)
    assert all(any(n.endswith("." + t) for t in LONGCAT_TARGETS + LONGCAT_FF_TARGETS) for n in wrapped)
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    tr.train()
    assert all(r["loss_fake"] > 0 for r in tr.history)
    for n, p in peft_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), base[n]), n  # only the adapters train


# ---------------------------------------------------------- a tiny LongCat-Image pipeline, text encoder included
WORDS = ["a", "cat", "dog", "on", "the", "moon", "red", "photo", "of", "blue", "car"]


def _qwen_text_encoder():
    """A tiny Qwen2.5-VL (the LongCat text encoder's class) and a word-level tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                        model_max_length=512)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]))
    return Qwen2_5_VLForConditionalGeneration(cfg), tokenizer


@pytest.fixture(scope="module")
def longcat_pipeline_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, LongCatImagePipeline
    from diffusers import LongCatImageTransformer2DModel as LongCatTransformer

    torch.manual_seed(0)
    encoder, tokenizer = _qwen_text_encoder()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), latent_channels=16,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.3611, shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = LongCatImagePipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                text_processor=None, transformer=LongCatTransformer(**LONGCAT_TINY_ARCH))
    root = tmp_path_factory.mktemp("longcat-tiny")
    pipe.save_pretrained(root)
    return root


def test_encode_train_export_and_sample_match_the_pipeline(longcat_pipeline_dir, tmp_path):
    """encode-prompts (Qwen2.5-VL in the pipeline's template, 512 tokens, the empty prompt too) -> train the
    longcat preset -> export a LongCatImagePipeline directory -> the pipeline samples the latents our sampler
    gives (same noise, same schedule, the pipeline's dynamic shift from its scheduler config)."""
    from diffusers import LongCatImagePipeline
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    from cdm_train.cli import main
    from cdm_train.config import config_from_dict
    from cdm_train.models.longcat import LongCatFamily
    from cdm_train.prompts import PromptEmbeds
    from cdm_train.runs import load_run, load_student
    from cdm_train.sample_images import conditioning
    from cdm_train.sampling import sample_euler

    model = longcat_pipeline_dir
    texts = ["a cat on the moon", "a red car", "photo of a blue dog", "the moon"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    emb = tmp_path / "emb"
    assert main(["encode-prompts", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--out", str(emb),
                 "--device", "cpu", "--dtype", "float32", "--max-sequence-length", "512"]) == 0
    data = PromptEmbeds(emb)
    assert data.names == ("encoder_hidden_states",)
    text_pipe = LongCatImagePipeline.from_pretrained(str(model), transformer=None, vae=None, text_processor=None)
    want, _ = text_pipe.encode_prompt([texts[1], texts[3]])
    torch.testing.assert_close(data.rows([1, 3])["encoder_hidden_states"], want)
    null, _ = text_pipe.encode_prompt([""])
    torch.testing.assert_close(data.null()["encoder_hidden_states"], null)
    assert want.shape == (2, 512, 16) and float(null.abs().mean()) > 1e-3

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--preset", "longcat", "--set", f"model.path={model}", "--set", f"model.prompt_embeds={emb}",
                 "--set", "model.resolution=64", "--set", "train.batch_size=2", "--set", "schedule.max_steps=3",
                 "--set", "optim.update_ratio=1", "--set", "optim.student_warmup_steps=0", "--set",
                 "optim.student_lr=1e-2", "--steps", "2", "--out", str(run), "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    meta = json.loads((out / "cdm_export.json").read_text())
    assert meta["pipeline"] == "LongCatImagePipeline" and meta["guidance_scale"] == 1.0 and meta["dynamic_shift_mu"]
    pipe = LongCatFamily().load_pipeline(out, torch.float32)
    state = load_run(run)
    cfg = config_from_dict(state["config"])
    student, adapter, sample_cond, latent = load_student(state, cfg, ema=True)
    assert latent == (16, 8, 8)
    assert resolve_shift(cfg).mu == pytest.approx(calculate_shift(16, 256, 4096, 0.4, 1.3))  # the directory's bounds
    g = torch.Generator().manual_seed(4)
    prompts = [texts[0], texts[2]]
    cond, _ = conditioning(cfg, prompts, 2, g, torch.device("cpu"), sample_cond)
    noise = torch.randn(2, *latent, generator=g)
    theirs = pipe(prompt=prompts, latents=pack_latents(noise), sigmas=meta["sigmas"], num_inference_steps=4,
                  guidance_scale=1.0, height=8, width=8, output_type="latent", enable_prompt_rewrite=False,
                  return_dict=False)[0]
    with torch.no_grad():
        mine = sample_euler(student, adapter, cond, noise, 4, sigmas=meta["sigmas"] + [0.0], shift=resolve_shift(cfg))
    torch.testing.assert_close(theirs.float(), pack_latents(mine), rtol=1e-4, atol=1e-5)
    imgs = tmp_path / "imgs"
    assert main(["sample", "--pipeline", str(out), "--prompt", "a cat", "--out", str(imgs), "--device", "cpu"]) == 0
    assert len(list(imgs.glob("*.png"))) == 1


def test_lora_student_exports_a_lora_file_for_longcat(tmp_path):
    """LongCatImagePipeline has no save_lora_weights: the file is written in the same layout, and loading it
    into a fresh LongCat transformer with diffusers' own load_lora_adapter gives the trained student's output."""
    from diffusers import LongCatImageTransformer2DModel
    from safetensors import safe_open

    from cdm_train.cli import main
    from cdm_train.runs import load_run, load_student

    run, out = tmp_path / "run", tmp_path / "lora"
    assert main(["train", "--preset", "longcat-tiny", "--set", "lora.student=true", "--set", "lora.fake=true",
                 "--set", "lora.rank=2", "--set", "lora.alpha=4", "--set", "optim.update_ratio=1", "--set",
                 "optim.student_warmup_steps=0", "--set", "optim.student_lr=1e-2", "--steps", "2", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "lora", "--dtype", "fp32"]) == 0
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 4
    state = load_run(run)
    from cdm_train.config import config_from_dict

    cfg = config_from_dict(state["config"])
    merged, adapter, sample_cond, latent = load_student(state, cfg, ema=True)
    torch.manual_seed(cfg.train.seed)
    base = LongCatImageTransformer2DModel(**LONGCAT_TINY_ARCH)  # the same random init as the run's teacher
    base.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="transformer")
    g = torch.Generator().manual_seed(3)
    x, sigma, cond = torch.randn(2, *latent, generator=g), torch.rand(2, generator=g), sample_cond(2, g)
    with torch.no_grad():
        want, got = adapter(merged, x, sigma, cond), adapter(base.eval(), x, sigma, cond)
    assert float((want - adapter(build_models(cfg, torch.device("cpu")).teacher, x, sigma, cond)).abs().max()) > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("resolution", [512, 1024])
def test_rollout_sigmas_are_the_pipelines_scheduler(tmp_path, resolution):
    """The trainer's rollout anchors equal what LongCatImagePipeline's scheduler makes of the raw schedule:
    set_timesteps(sigmas, mu = calculate_shift(image tokens, the directory's scheduler bounds))."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.longcat_image.pipeline_longcat_image import calculate_shift

    from cdm_train.draws import draw_iteration

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    sched.save_pretrained(tmp_path / "scheduler")
    cfg = make_config("longcat", overrides=[f"model.path={tmp_path}", "model.prompt_embeds=x",
                                            f"model.resolution={resolution}"])
    mu = calculate_shift((resolution // 16) ** 2, 256, 4096, 0.4, 1.3)
    shift = resolve_shift(cfg)
    assert shift.mu == pytest.approx(mu)
    for step in range(3):  # the official random-length schedules
        d = draw_iteration(cfg, lambda b, g: torch.zeros(b), (1, 1, 1), shift, rank=0, step=step,
                           device=torch.device("cpu"))
        sched.set_timesteps(sigmas=d.raw_sigmas[:-1], mu=mu)
        assert d.sigmas == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
        assert d.sigmas[0] == 1.0 and d.sigmas[-1] == 0.0
