"""`cdm-train export`: a tiny SD3 pipeline built offline, 2 training steps, export, and diffusers loads it."""

import json

import pytest
import torch

from cdm_train.cli import main

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
# The tiny pipeline has no text encoders (the checks feed precomputed embeddings): say so when loading it.
NO_TEXT = {name: None for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                                   "tokenizer_3", "image_encoder", "feature_extractor")}


@pytest.fixture(scope="module")
def sd3_pipeline_dir(tmp_path_factory):
    """transformer (the tiny preset's architecture), scheduler with SD3's shift 3, a one-block VAE; no text
    encoders (training and the checks use precomputed embeddings)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from cdm_train.models.sd3 import TINY_ARCH

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**TINY_ARCH),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    root = tmp_path_factory.mktemp("sd3-tiny")
    pipe.save_pretrained(root)
    g = torch.Generator().manual_seed(1)
    embeds = {"encoder_hidden_states": torch.randn(6, 5, 16, generator=g),
              "pooled_projections": torch.randn(6, 8, generator=g),
              "null_encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
              "null_pooled_projections": torch.randn(1, 8, generator=g)}
    torch.save(embeds, root / "embeds.pt")
    return root


def _train(run, model_dir, *extra):
    args = ["train", "--preset", "sd3-medium", "--set", f"model.path={model_dir}", "--set",
            f"model.prompt_embeds={model_dir / 'embeds.pt'}", "--set", "model.resolution=64", "--set",
            "train.batch_size=2", "--set", "schedule.max_steps=3", "--set", "optim.update_ratio=1",
            "--set", "optim.student_lr=1e-2", "--set", "optim.student_warmup_steps=0", "--set", "optim.ema_decay=0.5",
            "--steps", "2", "--out", str(run), "--no-progress"]
    for e in extra:
        args += ["--set", e]
    assert main(args) == 0


def _pipeline_latents(pipe, embeds, noise, sigmas):
    out = pipe(prompt_embeds=embeds["encoder_hidden_states"], pooled_prompt_embeds=embeds["pooled_projections"],
               latents=noise.clone(), sigmas=sigmas, num_inference_steps=len(sigmas), guidance_scale=1.0,
               height=8, width=8, output_type="latent", return_dict=False)[0]
    return out.float()


def test_exported_pipeline_loads_and_matches_our_sampler(sd3_pipeline_dir, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from cdm_train.checkpoint import load
    from cdm_train.config import config_from_dict
    from cdm_train.models.build import build_teacher, resolve_shift
    from cdm_train.sampling import sample_euler

    run, out = tmp_path / "run", tmp_path / "export"
    _train(run, sd3_pipeline_dir)
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    meta = json.loads((out / "cdm_export.json").read_text())
    assert meta["sigmas"] == [1.0, 0.75, 0.5, 0.25] and meta["shift"] == 3.0 and meta["ema"] is True
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    assert (out / "vae").is_dir() and (out / "model_index.json").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out), torch_dtype=torch.float32, **NO_TEXT)

    state = load(run)
    cfg = config_from_dict(state["config"])
    ours, adapter, _, latent = build_teacher(cfg, torch.device("cpu"))
    ours.load_state_dict(state["ema"])
    teacher = SD3Transformer2DModel.from_pretrained(str(sd3_pipeline_dir), subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), teacher.parameters()))  # it trained
    g = torch.Generator().manual_seed(7)
    embeds = {k: v[:2] for k, v in torch.load(sd3_pipeline_dir / "embeds.pt").items() if not k.startswith("null")}
    noise = torch.randn(2, *latent, generator=g)
    theirs = _pipeline_latents(pipe, embeds, noise, meta["sigmas"])
    with torch.no_grad():
        mine = sample_euler(ours.eval(), adapter, embeds, noise, 4, sigmas=meta["sigmas"] + [0.0],
                            shift=resolve_shift(cfg))
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)

    # --format transformer: the same weights, loadable on their own.
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "tr"), "--format", "transformer",
                 "--dtype", "fp32"]) == 0
    alone = SD3Transformer2DModel.from_pretrained(str(tmp_path / "tr"))
    assert all(torch.equal(a, b) for a, b in zip(alone.parameters(), pipe.transformer.parameters()))
    # --no-ema: the raw student (not the EMA); the default dtype is bf16.
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "raw"), "--format", "transformer",
                 "--no-ema"]) == 0
    from safetensors.torch import load_file

    stored = load_file(str(next((tmp_path / "raw").glob("*.safetensors"))))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    raw = SD3Transformer2DModel.from_pretrained(str(tmp_path / "raw"), torch_dtype=torch.bfloat16)
    for name, p in raw.named_parameters():
        assert torch.equal(p, state["student"][name].to(torch.bfloat16)), name
    assert any(not torch.equal(state["student"][n], state["ema"][n]) for n in state["student"])
    # A full student as a LoRA: truncated SVD of (student - teacher) on the target linears. At full rank (16
    # covers every tiny linear) the fused LoRA reproduces the student's target weights; what stays outside
    # the targets (biases, norms, embeddings) is measured, not hidden.
    for rank in (16, 2):
        assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / f"svd{rank}"), "--format", "lora",
                     "--lora-rank", str(rank), "--dtype", "fp32"]) == 0
    full_rank = json.loads((tmp_path / "svd16" / "cdm_export.json").read_text())["lora_extraction"]
    low_rank = json.loads((tmp_path / "svd2" / "cdm_export.json").read_text())["lora_extraction"]
    # 8 attention + 4 FFN linears per block; the last (context_pre_only) block has no to_add_out / ff_context
    assert full_rank["rank"] == 16 and full_rank["modules"] == 12 + 9
    assert full_rank["target_delta_relative_error"] < 1e-6 < low_rank["target_delta_relative_error"] < 1
    assert 0 < full_rank["untargeted_delta_fraction"] == pytest.approx(low_rank["untargeted_delta_fraction"])
    base = StableDiffusion3Pipeline.from_pretrained(str(sd3_pipeline_dir), torch_dtype=torch.float32, **NO_TEXT)
    base.load_lora_weights(str(tmp_path / "svd16"))
    base.fuse_lora()
    base.unload_lora_weights()
    fused = dict(base.transformer.named_parameters())
    targets = [n for n in fused if n.endswith(".weight") and (".attn." in n or ".ff" in n) and "norm" not in n]
    assert len(targets) == 21
    for n in targets:
        torch.testing.assert_close(fused[n], state["ema"][n], rtol=0, atol=1e-5)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--format", "transformer",
                 "--lora-rank", "4"]) == 2


def test_lora_file_loads_into_the_base_pipeline_like_the_merged_export(sd3_pipeline_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    run = tmp_path / "run"
    _train(run, sd3_pipeline_dir, "lora.student=true", "lora.fake=true", "lora.rank=4", "lora.alpha=8",
           "lora.include_ff=true")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "lora"), "--format", "lora",
                 "--dtype", "fp32"]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    merged = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "merged"), torch_dtype=torch.float32, **NO_TEXT)
    base = StableDiffusion3Pipeline.from_pretrained(str(sd3_pipeline_dir), torch_dtype=torch.float32, **NO_TEXT)
    g = torch.Generator().manual_seed(3)
    embeds = {k: v[:2] for k, v in torch.load(sd3_pipeline_dir / "embeds.pt").items() if not k.startswith("null")}
    noise = torch.randn(2, 4, 8, 8, generator=g)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    plain = _pipeline_latents(base, embeds, noise, sigmas)
    base.load_lora_weights(str(tmp_path / "lora"))
    with_lora = _pipeline_latents(base, embeds, noise, sigmas)
    from_merged = _pipeline_latents(merged, embeds, noise, sigmas)
    assert not torch.allclose(plain, from_merged, atol=1e-4)  # the adapter changed the model
    torch.testing.assert_close(with_lora, from_merged, rtol=1e-4, atol=1e-4)


def test_export_reads_an_fsdp2_distributed_checkpoint(sd3_pipeline_dir, tmp_path):
    """An FSDP2 run leaves checkpoint_dcp/ (tensors, saved by every rank) + meta.pt; export converts it."""
    import torch.distributed.checkpoint as dcp
    from diffusers import SD3Transformer2DModel

    from cdm_train.checkpoint import load, save_atomic

    run = tmp_path / "run"
    _train(run, sd3_pipeline_dir)
    state = load(run)
    dcp_run = tmp_path / "fsdp_run"
    dcp.save({k: state[k] for k in ("student", "fake", "ema")}, checkpoint_id=str(dcp_run / "checkpoint_dcp"))
    save_atomic({k: state[k] for k in ("step", "config", "counters", "rng")}, dcp_run / "checkpoint_dcp" / "meta.pt")
    for src, name in ((run, "a"), (dcp_run, "b")):
        assert main(["export", "--checkpoint", str(src), "--out", str(tmp_path / name), "--format", "transformer",
                     "--dtype", "fp32"]) == 0
    a = SD3Transformer2DModel.from_pretrained(str(tmp_path / "a"))
    b = SD3Transformer2DModel.from_pretrained(str(tmp_path / "b"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2


def test_sample_decodes_pngs_from_an_sd3_checkpoint(sd3_pipeline_dir, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    _train(run, sd3_pipeline_dir)
    out = tmp_path / "imgs"
    assert main(["sample", "--checkpoint", str(run), "--num", "3", "--out", str(out), "--device", "cpu"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 3 and (out / "prompts.txt").is_file()
    arrays = [torch.tensor(list(Image.open(f).getdata())) for f in files]
    assert Image.open(files[0]).size == (8, 8)  # the one-block VAE keeps the latent's 8x8
    assert not torch.equal(arrays[0], arrays[1])  # different noise, different images
    # Prompts need text encoders; the tiny pipeline has none: a clear message, exit 2.
    assert main(["sample", "--checkpoint", str(run), "--prompt", "a cat", "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2


@pytest.fixture(scope="module")
def sd3_text_pipeline_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from .helpers import save_tiny_sd3_text_pipeline

    return save_tiny_sd3_text_pipeline(tmp_path_factory.mktemp("sd3-text"))


def test_prompts_encode_train_export_and_sample_the_same_images(sd3_text_pipeline_dir, tmp_path):
    """The walk-through on a tiny SD3 with text encoders: encode-prompts -> train -> sample --prompt from the
    run, and export -> sample --pipeline from the exported directory: the same PNGs (same noise, same
    schedule and shift, prompts encoded at the length the training embeddings had)."""
    from PIL import Image

    from cdm_train.config import config_from_dict
    from cdm_train.export import load_run
    from cdm_train.prompts import PromptEmbeds
    from cdm_train.sample_images import conditioning

    model = sd3_text_pipeline_dir
    texts = ["a cat on the moon", "a red car", "photo of a blue dog", "the moon"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    emb = tmp_path / "emb"
    assert main(["encode-prompts", "--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--out", str(emb),
                 "--device", "cpu", "--dtype", "float32", "--max-sequence-length", "8"]) == 0
    run = tmp_path / "run"
    args = ["train", "--preset", "sd3-medium", "--set", f"model.path={model}", "--set", f"model.prompt_embeds={emb}",
            "--set", "model.resolution=64", "--set", "train.batch_size=2", "--set", "schedule.max_steps=3",
            "--set", "optim.update_ratio=1", "--set", "optim.student_lr=1e-2", "--set",
            "optim.student_warmup_steps=0", "--set", "optim.ema_decay=0.5", "--steps", "2", "--out", str(run),
            "--no-progress"]
    assert main(args) == 0
    # Prompts encoded at sampling time equal the training rows (same T5 length, read from the embeddings' index).
    cfg = config_from_dict(load_run(run)["config"])
    cond, labels = conditioning(cfg, [texts[1], texts[3]], 2, torch.Generator(), torch.device("cpu"), None)
    rows = PromptEmbeds(emb).rows([1, 3])
    for key in ("encoder_hidden_states", "pooled_projections"):
        torch.testing.assert_close(cond[key], rows[key].float())

    two = [texts[0], texts[2]]
    assert main(["sample", "--checkpoint", str(run), "--prompt", two[0], "--prompt", two[1], "--out",
                 str(tmp_path / "from_run"), "--device", "cpu", "--seed", "4"]) == 0
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    meta = json.loads((out / "cdm_export.json").read_text())
    assert meta["max_sequence_length"] == 8
    (tmp_path / "two.txt").write_text("\n".join(two) + "\n")
    assert main(["sample", "--pipeline", str(out), "--prompts", str(tmp_path / "two.txt"), "--out",
                 str(tmp_path / "from_pipeline"), "--device", "cpu", "--seed", "4"]) == 0
    for d in ("from_run", "from_pipeline"):
        assert (tmp_path / d / "prompts.txt").read_text().splitlines() == two
    a = [torch.tensor(list(Image.open(tmp_path / "from_run" / f"{i:04d}.png").getdata())) for i in range(2)]
    b = [torch.tensor(list(Image.open(tmp_path / "from_pipeline" / f"{i:04d}.png").getdata())) for i in range(2)]
    assert not torch.equal(a[0], a[1])
    for x, y in zip(a, b):
        assert int((x - y).abs().max()) <= 1  # uint8 rounding of the same decoded image
    # --pipeline needs prompts; an exported directory without cdm_export.json is refused.
    assert main(["sample", "--pipeline", str(out), "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert main(["sample", "--pipeline", str(model), "--prompt", "a cat", "--out", str(tmp_path / "y"),
                 "--device", "cpu"]) == 2
