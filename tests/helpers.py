"""Shared test utilities (imported by test modules, not collected)."""

from __future__ import annotations

import torch

from cdm_train.config import make_config
from cdm_train.rollout import rollout
from cdm_train.steps import fake_teacher_loss, student_losses, training_sigmas
from cdm_train.trainer import Trainer


def tiny_config(tmp_path, *overrides):
    base = [f"train.out_dir={tmp_path}", "train.progress=false", "train.tensorboard=false", "train.log_every=1"]
    return make_config("tiny", overrides=base + list(overrides))


def one_iteration(cfg, step: int = 0):
    """Losses and student gradients of one iteration, computed from scratch (fresh models)."""
    tr = Trainer(cfg)
    m = tr.models
    # At initialisation fake == teacher == student and every DM shift is exactly zero: perturb the
    # fake teacher and the student (deterministically) so the comparison is not trivially 0 == 0.
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for net, scale in ((m.fake, 0.05), (m.student, 0.02)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    d = tr.draws(step)
    rnd, cond = d.rnd, d.cond
    import cdm_kernels as ck

    with ck.use_backend(cfg.speed.backend):
        ro = rollout(m.student, m.adapter, cond, d.noise, d.sigmas, d.indices, early_exit=cfg.speed.early_exit_rollout)
        sg = training_sigmas(cfg, d.uniform, ro.sigma_i)
        fake = fake_teacher_loss(cfg, m.fake, m.adapter, ro, cond, sg, rnd)
        fake.backward()
        fake_grads = [p.grad.detach().clone() for p in m.fake.parameters()]
        for p in m.fake.parameters():
            p.grad = None
        sl = student_losses(cfg, m.student, m.teacher, m.fake, m.adapter, ro, cond, sg, rnd)
        sl.total.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in m.student.parameters()]
    return {"rollout": ro, "fake": fake.detach(), "losses": sl, "student_grads": grads, "fake_grads": fake_grads}


def save_tiny_sd3_text_pipeline(root):
    """Save the tiny SD3 pipeline with tiny text encoders sized for the tiny transformer (CLIP 4+4 wide: pooled
    8, padded to the T5's 16 = joint_attention_dim) under `root`, so prompts can be encoded, trained on and
    sampled. Returns `root`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from cdm_train.models.sd3 import TINY_ARCH

    from .test_prompts import WORDS, _tokenizer

    torch.manual_seed(0)
    vocab = len(WORDS) + 3

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab, hidden_size=4, intermediate_size=8,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          max_position_embeddings=77, projection_dim=4,
                                                          pad_token_id=0, bos_token_id=1, eos_token_id=2))

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=1.5, shift_factor=0.1)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2))
    pipe = StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**TINY_ARCH),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip(), tokenizer=_tokenizer(77), text_encoder_2=clip(),
                                    tokenizer_2=_tokenizer(77), text_encoder_3=t5, tokenizer_3=_tokenizer(32))
    pipe.save_pretrained(root)
    return root
