"""Reference mode against an independent transcription of the official CDM iteration.

The transcription below follows the official code (github byliutao/cdm: `scripts/train.py`,
`cdm/pipeline/pipeline.py` TrainingSchedulerWrapper, `cdm/training/losses.py`,
`cdm/models/ema.py`, `cdm/training/model_utils.py` create_lr_lambda / ema_merge_ft_with_student,
`cdm/utils/common.py` sample_sigmas, `config/config.py` sd3 preset) line by line. It uses none of
cdm_train's schedule, rollout, loss or optimizer code: diffusers' own FlowMatchEulerDiscreteScheduler
(shift 3, the SD3-Medium value) runs the rollout, a wrapper records all_xt / all_x0 / all_v as the
official wrapper does, and the official index, sigma and loss formulas, AdamW with LambdaLR warm-up,
grad-norm clipping, the fake<-student merge and the warmed-up student EMA follow.

Only the random draws are shared: the transcription is fed the very draws our trainer makes
(`Trainer.draws(step)`: the unshifted schedule handed to the scheduler, trajectory indices, prompts,
initial noise, the U(0, 1) draws behind each training sigma, and the re-noising noise, materialised
from its Philox seed). The official code draws them from torch's global RNG in another order; which
numbers are drawn does not change the algorithm.
"""

from __future__ import annotations

import copy

import pytest
import torch

import cdm_kernels as ck
from cdm_train.draws import U_CA, U_CDM_STUDENT, U_CDM_TEACHER, U_DM, U_FAKE
from cdm_train.trainer import Trainer

from .helpers import tiny_config

SHIFT = 3.0  # SD3-Medium's scheduler shift
SIGMA_MIN, SIGMA_MAX = 0.02, 0.98  # config.train.sigma_min / sigma_max
GUIDANCE, NORM_CLIP_MIN = 7.0, 0.1
MERGE_DECAY, EMA_DECAY, MAX_GRAD_NORM = 0.999, 0.999, 1.0


# ------------------------------------------------------------------ the transcription


class Recorder:
    """cdm/pipeline/pipeline.py TrainingSchedulerWrapper: all_xt and all_x0 start with the initial noise."""

    def __init__(self, scheduler, initial_latents):
        self.scheduler = scheduler
        self.original_step = scheduler.step
        self.all_xt, self.all_x0, self.all_v = [initial_latents], [initial_latents], []
        scheduler.step = self.step

    def step(self, model_output, timestep, sample, **kwargs):
        step_index = self.scheduler._step_index
        if step_index is None:
            self.scheduler._init_step_index(timestep)
            step_index = self.scheduler._step_index
        sigma = self.scheduler.sigmas[step_index]
        self.all_x0.append((sample.float() - sigma * model_output.float()).to(sample.dtype))
        self.all_v.append(model_output.clone())
        result = self.original_step(model_output, timestep, sample, **kwargs)
        self.all_xt.append(result[0])
        return result


def transformer(model, latents, timesteps, embeds):
    return model(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds["encoder_hidden_states"],
                 pooled_projections=embeds["pooled_projections"], return_dict=False)[0]


@torch.no_grad()
def pipeline_rollout(student, embeds, sigmas, latents):
    """StableDiffusion3Pipeline.__call__ with guidance_scale 1 and custom sigmas (the scheduler shifts them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(sigmas=sigmas)
    rec = Recorder(scheduler, latents)
    for t in scheduler.timesteps:
        noise_pred = transformer(student, latents, t.expand(latents.shape[0]), embeds)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return scheduler, rec.all_xt, rec.all_x0, rec.all_v


def extract_traj(data_list, indices):
    return torch.stack([data_list[idx][i] for i, idx in enumerate(indices)])


def sample_sigmas(u, upper_bound=None):
    """cdm/utils/common.py with the u ~ U(0, 1) given: uniform, or uniform_capped by upper_bound."""
    sigmas = u * upper_bound if upper_bound is not None else u
    return sigmas.clamp(SIGMA_MIN, SIGMA_MAX)


def view(s, like):
    return s.view(-1, *([1] * (like.ndim - 1)))


def compute_cfg_loss(student_prediction, cond_prediction, uncond_prediction, xt, xt_teacher, s_student, s_teacher):
    x0_student = xt.float() - s_student.float() * student_prediction.float()
    x0_cond = xt_teacher.float() - s_teacher.float() * cond_prediction.detach().float()
    x0_uncond = xt_teacher.float() - s_teacher.float() * uncond_prediction.detach().float()
    effect = GUIDANCE * (x0_cond - x0_uncond)
    dims = tuple(range(1, x0_cond.ndim))
    norm = ((x0_cond - x0_student.detach()).abs().mean(dim=dims, keepdim=True) + 1e-8).clamp(min=NORM_CLIP_MIN)
    effect = torch.nan_to_num(effect / norm)
    target = x0_student.detach() + effect
    return torch.nn.functional.mse_loss(x0_student, target, reduction="none").mean(dim=dims).mean()


def compute_dm_loss(student_prediction, real_prediction, fake_prediction, xt, xt_teacher, s_student, s_teacher):
    x0_student = xt.float() - s_student.float() * student_prediction.float()
    x0_real = xt_teacher.float() - s_teacher.float() * real_prediction.detach().float()
    x0_fake = xt_teacher.float() - s_teacher.float() * fake_prediction.detach().float()
    dims = tuple(range(1, x0_real.ndim))
    norm = ((x0_real - x0_student.detach()).abs().mean(dim=dims, keepdim=True) + 1e-8).clamp(min=NORM_CLIP_MIN)
    effect = torch.nan_to_num((x0_real - x0_fake) / norm)
    target = x0_student.detach() + effect
    return torch.nn.functional.mse_loss(x0_student, target, reduction="none").mean(dim=dims).mean()


def create_lr_lambda(warmup_steps):
    def lr_lambda(step):  # scheduler_type "constant"
        return step / max(1, warmup_steps) if step < warmup_steps else 1.0
    return lr_lambda


class AcceleratedScheduler:
    """accelerate/scheduler.py AcceleratedScheduler.step as the official run uses it (step_with_optimizer=True,
    split_batches=False, no gradient accumulation, bf16 so no skipped optimizer steps): "the training dataloader
    batch size was multiplied by num_processes, so we need to do num_processes steps per training step"."""

    def __init__(self, scheduler, num_processes: int):
        self.scheduler, self.num_processes = scheduler, num_processes

    def step(self):
        for _ in range(self.num_processes):
            if hasattr(self.scheduler, "total_steps"):  # OneCycleLR's guard; LambdaLR has none
                if self.scheduler._step_count <= self.scheduler.total_steps:
                    self.scheduler.step()
            else:
                self.scheduler.step()


# model_utils.py LORA_TARGET_MODULES / SD3 get_lora_target_modules(include_ff=True)
OFFICIAL_SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                             "attn.to_out.0", "attn.to_q", "attn.to_v", "ff.net.0.proj", "ff.net.2",
                             "ff_context.net.0.proj", "ff_context.net.2"]


class OfficialLoraModels:
    """model_utils.py initialize_models(FT_LORA_STUDENT_LORA) and ModelManager: ONE PeftModel with the adapters
    "default" (student) and "fake_teacher"; the real teacher is the base under disable_adapter(). peft's own
    set_adapter / disable_adapter run, so their requires_grad flips happen exactly as in the official loop."""

    def __init__(self, base, rank, alpha):
        from peft import LoraConfig, get_peft_model

        def config():
            return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                              target_modules=OFFICIAL_SD3_LORA_TARGETS)

        self.peft = get_peft_model(base, config())
        self.peft.add_adapter("fake_teacher", config())
        self.peft.set_adapter("default")
        self.student_params = [p for p in self.peft.parameters() if p.requires_grad]
        self.peft.set_adapter("fake_teacher")
        self.fake_params = [p for p in self.peft.parameters() if p.requires_grad]
        self.peft.set_adapter("default")

    def _activate_student(self):
        self.peft.set_adapter("default")

    def student_forward(self, **kw):
        self._activate_student()
        return self.peft(**kw)

    def teacher_forward(self, **kw):
        with torch.no_grad():
            with self.peft.disable_adapter():
                out = self.peft(**kw)
            self._activate_student()
            return out

    def fake_teacher_forward(self, **kw):  # requires_grad: the fake-teacher step; else a DM/CDM query
        self.peft.set_adapter("fake_teacher")
        if torch.is_grad_enabled():
            return self.peft(**kw)
        out = self.peft(**kw)
        self._activate_student()
        return out


class OfficialLoraNet:
    """What the transcription calls `student`, `fake` or `teacher` in the LoRA mode: the manager's forward for
    that role, and that role's trainable parameters (the lists the official optimizers, clipping, the merge
    and the EMA use)."""

    def __init__(self, models: OfficialLoraModels, role: str):
        self.models, self.role = models, role

    def __call__(self, **kw):
        return getattr(self.models, f"{self.role}_forward")(**kw)

    def parameters(self):
        return iter({"student": self.models.student_params, "fake_teacher": self.models.fake_params}[self.role])


class Official:
    """The official training state and iteration (sd3 preset: share_latent_indices, x0_source x0_next, CA
    uniform_capped, DM uniform, CDM trajectory_eps + fresh_independent + student_pred).

    `num_processes`: accelerate's, for the schedulers accelerator.prepare() wraps (train.py ~L356 and ~L364);
    `lora_lora`: the FT_LORA_STUDENT_LORA mode, whose fake-teacher scheduler is not prepared (a bare LambdaLR)."""

    def __init__(self, student, fake, teacher, null_embeds, *, student_lr, fake_lr, student_warmup, fake_warmup,
                 update_ratio, num_processes=1, lora_lora=False, merge_decay=MERGE_DECAY):
        self.student, self.fake, self.teacher = student, fake, teacher
        self.merge_decay = merge_decay
        self.null = null_embeds
        kw = dict(betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        self.opt = torch.optim.AdamW(student.parameters(), lr=student_lr, **kw)
        self.ft_opt = torch.optim.AdamW(fake.parameters(), lr=fake_lr, **kw)
        self.lr_sched = AcceleratedScheduler(
            torch.optim.lr_scheduler.LambdaLR(self.opt, create_lr_lambda(student_warmup)), num_processes)
        self.ft_lr_sched = torch.optim.lr_scheduler.LambdaLR(self.ft_opt, create_lr_lambda(fake_warmup))
        if not lora_lora:
            self.ft_lr_sched = AcceleratedScheduler(self.ft_lr_sched, num_processes)
        self.lrs = {"student": [], "fake": []}  # the learning rate each optimizer step used
        self.ema = [p.detach().clone() for p in student.parameters()]  # EMAModuleWrapper(decay=0.999)
        self.update_ratio = update_ratio
        self.ft_step = self.student_step = 0

    def iteration(self, draws, noises):
        embeds, b = draws.cond, draws.noise.shape[0]
        neg = {k: v.expand(b, *v.shape[1:]) for k, v in self.null.items()}
        num_steps = len(draws.raw_sigmas) - 1
        scheduler, all_xt, all_x0, all_v = pipeline_rollout(self.student, embeds, draws.raw_sigmas[:-1], draws.noise)
        assert len(all_xt) == len(all_x0) == num_steps + 1 and len(all_v) == num_steps
        idx = list(draws.indices)  # share_latent_indices: one draw serves every branch
        u = draws.uniform
        out = {}

        # ---- 2. fake teacher
        ft_x0 = extract_traj(all_x0, [i + 1 for i in idx])  # x0_source = "x0_next"
        ft_sigma = sample_sigmas(u[U_FAKE])
        ft_xt = (1 - view(ft_sigma, ft_x0)) * ft_x0.detach() + view(ft_sigma, ft_x0) * noises["fake"]
        ft_pred = transformer(self.fake, ft_xt, ft_sigma * 1000.0, embeds)
        ft_loss = torch.nn.functional.mse_loss(ft_pred.float(), (noises["fake"] - ft_x0).detach().float())
        ft_loss.backward()
        out["fake_grads"] = [p.grad.detach().clone() for p in self.fake.parameters()]
        torch.nn.utils.clip_grad_norm_(list(self.fake.parameters()), MAX_GRAD_NORM)
        self.lrs["fake"].append(self.ft_opt.param_groups[0]["lr"])
        self.ft_opt.step()
        self.ft_lr_sched.step()
        self.ft_opt.zero_grad()
        with torch.no_grad():  # ema_merge_ft_with_student
            for fp, sp in zip(self.fake.parameters(), self.student.parameters()):
                fp.data.mul_(self.merge_decay).add_(sp.data, alpha=1.0 - self.merge_decay)
        self.ft_step += 1
        out["loss_fake"] = ft_loss.detach()

        # ---- 3. student
        if not (self.update_ratio == 1 or (self.ft_step > 0 and self.ft_step % self.update_ratio == 0)):
            return out
        idx_t = torch.tensor(idx)
        # Loss 1: CFG on trajectory
        xt = extract_traj(all_xt, idx).float()
        stop_t = scheduler.timesteps[idx_t].float()
        s = view(stop_t / 1000.0, xt)
        pred = transformer(self.student, xt, stop_t, embeds)
        x0_pred = xt - s * pred
        t_sigma = sample_sigmas(u[U_CA], upper_bound=stop_t / 1000.0)
        t_xt = (1 - view(t_sigma, x0_pred)) * x0_pred.detach() + view(t_sigma, x0_pred) * noises["ca"]
        with torch.no_grad():  # teacher_forward_cfg_batched: uncond and cond
            uncond = transformer(self.teacher, t_xt, t_sigma * 1000.0, neg)
            cond = transformer(self.teacher, t_xt, t_sigma * 1000.0, embeds)
        ca = compute_cfg_loss(pred, cond, uncond, xt, t_xt, s, view(t_sigma, xt))
        # Loss 2: DM on trajectory (its own student forward)
        xt = extract_traj(all_xt, idx)
        pred = transformer(self.student, xt, stop_t, embeds)
        x0_pred = xt - s * pred
        t_sigma = sample_sigmas(u[U_DM])
        t_xt = (1 - view(t_sigma, x0_pred)) * x0_pred.detach() + view(t_sigma, x0_pred) * noises["dm"]
        with torch.no_grad():
            real = transformer(self.teacher, t_xt, t_sigma * 1000.0, embeds)
            fake = transformer(self.fake, t_xt, t_sigma * 1000.0, embeds)
        dm = compute_dm_loss(pred, real, fake, xt, t_xt, s, view(t_sigma, xt))
        # Loss 3: CDM, trajectory_eps student point, student_pred teacher base, fresh_independent teacher
        traj_xt, traj_v = extract_traj(all_xt, idx), extract_traj(all_v, idx)
        traj_stop = torch.tensor([scheduler.sigmas[i].item() for i in idx], dtype=torch.float32)
        c_sigma = sample_sigmas(u[U_CDM_STUDENT])  # "uniform" ignores the upper bound
        c_xt = traj_xt + view(c_sigma - traj_stop, traj_xt) * traj_v
        c_pred = transformer(self.student, c_xt, c_sigma * 1000.0, embeds)
        c_x0 = (c_xt - view(c_sigma, c_xt) * c_pred).detach()
        ct_sigma = sample_sigmas(u[U_CDM_TEACHER])
        ct_xt = (1 - view(ct_sigma, c_x0)) * c_x0.detach() + view(ct_sigma, c_x0) * noises["cdm"]
        with torch.no_grad():
            real = transformer(self.teacher, ct_xt, ct_sigma * 1000.0, embeds)
            fake = transformer(self.fake, ct_xt, ct_sigma * 1000.0, embeds)
        cdm = compute_dm_loss(c_pred, real, fake, c_xt, ct_xt, view(c_sigma, c_xt), view(ct_sigma, c_xt))
        total = ca + dm + cdm
        total.backward()
        out["student_grads"] = [p.grad.detach().clone() for p in self.student.parameters()]
        torch.nn.utils.clip_grad_norm_(list(self.student.parameters()), MAX_GRAD_NORM)
        self.lrs["student"].append(self.opt.param_groups[0]["lr"])
        self.opt.step()
        self.lr_sched.step()
        self.opt.zero_grad()
        self.student_step += 1
        decay = min((1 + self.student_step) / (10 + self.student_step), EMA_DECAY)  # ema.step(params, step)
        with torch.no_grad():
            for e, p in zip(self.ema, self.student.parameters()):
                e.add_((1 - decay) * (p.data - e))
        out.update(loss_ca=ca.detach(), loss_dm=dm.detach(), loss_cdm=cdm.detach())
        return out


def materialise_noise(draws):
    """The re-noising noise our kernels draw in-kernel from Philox(seed): renoise(0, 1) = noise."""
    zeros = torch.zeros_like(draws.noise)
    with ck.use_backend("reference"):
        return {k: ck.renoise(zeros, 1.0, seed=seed) for k, seed in draws.noise_seeds.items()}


# ------------------------------------------------------------------ the comparison

ITERATIONS = 3
LRS = ["optim.student_lr=2e-3", "optim.fake_lr=3e-3", "optim.student_warmup_steps=2", "optim.fake_warmup_steps=2"]
RECIPE = ["schedule.shift=3.0", "schedule.max_steps=6", "optim.ema_decay=0.999", "optim.fake_merge_decay=0.999",
          "optim.grad_clip=1.0", "loss.guidance_scale=7.0", "train.batch_size=5", *LRS]


def _ours_and_official(tmp_path, *overrides, reference=True, num_processes=1, cfg=None, official_null=None):
    """Our trainer and the transcription from the same starting weights, ITERATIONS iterations each.

    `cfg`: a prepared config (else the tiny preset with RECIPE + overrides); `official_null`: the transcription's
    own unconditional embeddings (official: the encoded empty prompt), else our adapter's null condition."""
    cfg = cfg if cfg is not None else tiny_config(tmp_path, *RECIPE, *overrides)
    if reference:
        from cdm_train.config import reference_mode

        reference_mode(cfg)
    tr = Trainer(cfg)
    m = tr.models
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # start from distinct student / fake / teacher so every term is non-trivial
        for net, scale in ((m.fake, 0.03), (m.student, 0.02)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        tr.ema.module.load_state_dict(m.student.state_dict())
    tr.initial = {name: [p.detach().clone() for p in net.parameters()] for name, net in
                  (("student", m.student), ("fake", m.fake))}
    lora_lora = cfg.lora.student and cfg.lora.fake
    if lora_lora:
        student, fake, teacher = _official_lora_networks(cfg, m)
    else:
        student, fake, teacher = copy.deepcopy(m.student), copy.deepcopy(m.fake), copy.deepcopy(m.teacher)
    o = cfg.optim
    off = Official(student, fake, teacher, official_null if official_null is not None else m.adapter.null_cond,
                   student_lr=o.student_lr, fake_lr=o.fake_lr, student_warmup=o.student_warmup_steps,
                   fake_warmup=o.fake_warmup_steps, update_ratio=o.update_ratio, num_processes=num_processes,
                   lora_lora=lora_lora, merge_decay=o.fake_merge_decay)
    grads: dict[str, list] = {"student": [], "fake": []}
    tr.lrs = {"student": [], "fake": []}
    original = tr._optimizer_step

    def recording_step(module, opt, loss):
        name = "student" if opt is tr.student_opt else "fake"
        grads[name].append([p.grad.detach().clone() for p in module.parameters()])
        tr.lrs[name].append(opt.param_groups[0]["lr"])
        return original(module, opt, loss)

    tr._optimizer_step = recording_step
    ours, theirs = [], []
    for step in range(ITERATIONS):
        draws = tr.draws(step)
        theirs.append(off.iteration(draws, materialise_noise(draws)))
        ours.append(tr.train_step())
        tr.step += 1
    return tr, off, ours, theirs, grads


def _official_lora_networks(cfg, m):
    """The official LoRA+LoRA models built from our starting point: the same frozen base weights, and our two
    adapters' (perturbed) weights copied into "default" and "fake_teacher"."""
    ours = m.teacher.peft_model
    base = copy.deepcopy(ours).unload()  # the bare frozen transformer, LoRA layers removed
    official = OfficialLoraModels(base, cfg.lora.rank, cfg.lora.alpha)
    theirs = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in official.peft.named_parameters():
            for official_name, our_name in ((".default.", ".student."), (".fake_teacher.", ".fake.")):
                if official_name in name:
                    p.copy_(theirs[name.replace(official_name, our_name)])
                    copied += 1
    assert copied == len(official.student_params) + len(official.fake_params) == len(list(m.student.parameters())) * 2
    return (OfficialLoraNet(official, "student"), OfficialLoraNet(official, "fake_teacher"),
            OfficialLoraNet(official, "teacher"))


def _moved(net, initial):
    return max(float((p.detach() - q).abs().max()) for p, q in zip(net.parameters(), initial))


def _close(a, b, rtol, atol, what):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("update_ratio", [1, 2])
def test_reference_mode_is_the_official_iteration(tmp_path, update_ratio):
    tr, off, ours, theirs, grads = _ours_and_official(tmp_path, f"optim.update_ratio={update_ratio}")
    student_steps = [k for k in range(ITERATIONS) if (k + 1) % update_ratio == 0]
    assert [k for k, t in enumerate(theirs) if "loss_ca" in t] == student_steps
    assert len(grads["fake"]) == ITERATIONS and len(grads["student"]) == len(student_steps)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        keys = ["loss_fake"] + (["loss_ca", "loss_dm", "loss_cdm"] if k in student_steps else [])
        assert set(keys) <= set(a) and set(keys) <= set(b)
        for key in keys:
            assert float(b[key]) > 0, key  # every term is non-trivial
            _close(a[key], b[key], 2e-5, 1e-7, f"iteration {k} {key}")
    for k in range(ITERATIONS):
        for ga, gb in zip(grads["fake"][k], theirs[k]["fake_grads"]):
            _close(ga, gb, 1e-4, 1e-6, f"iteration {k} fake-teacher gradient")
    for n, k in enumerate(student_steps):
        for ga, gb in zip(grads["student"][n], theirs[k]["student_grads"]):
            _close(ga, gb, 1e-4, 1e-6, f"iteration {k} student gradient")
    m = tr.models
    # The weights really moved (LR warm-up: the first step of each optimizer has lr 0), so the comparison has teeth.
    assert _moved(m.fake, tr.initial["fake"]) > 1e-4
    if len(student_steps) >= 2:
        assert _moved(m.student, tr.initial["student"]) > 1e-4 and _moved(tr.ema.module, tr.initial["student"]) > 1e-5
    for name, mine, official in (("student", m.student.parameters(), off.student.parameters()),
                                 ("fake teacher", m.fake.parameters(), off.fake.parameters()),
                                 ("EMA", tr.ema.module.parameters(), off.ema)):
        for p, q in zip(mine, official):
            _close(p.detach(), q.detach(), 1e-5, 2e-6, f"{name} weights after {ITERATIONS} iterations")
    # The learning rates followed the official warm-up: lr * k / 2 for the k-th step, then constant.
    assert tr.fake_opt.param_groups[0]["lr"] == pytest.approx(off.ft_opt.param_groups[0]["lr"])


def test_fast_mode_matches_the_official_iteration_to_the_documented_tolerance(tmp_path):
    # All exact switches on (shared student forward, early exit, batched teacher calls, C++/Triton or
    # reference backend): the same algorithm up to summation order (README "Speed switches").
    tr, off, ours, theirs, grads = _ours_and_official(tmp_path, "optim.update_ratio=1", reference=False)
    assert tr.cfg.speed.early_exit_rollout and tr.cfg.speed.batched_teacher_calls
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss_fake", "loss_ca", "loss_dm", "loss_cdm"):
            _close(a[key], b[key], 1e-4, 1e-6, f"iteration {k} {key}")
    for p, q in zip(tr.models.student.parameters(), off.student.parameters()):
        _close(p.detach(), q.detach(), 1e-4, 1e-5, "student weights")
    for p, q in zip(tr.ema.module.parameters(), off.ema):
        _close(p.detach(), q.detach(), 1e-4, 1e-5, "EMA weights")


def test_the_transcription_notices_the_old_deviations(tmp_path, monkeypatch):
    """The comparison has teeth: the pre-fix fake-teacher target (one step late) breaks it."""
    import cdm_train.steps as steps_mod

    real = steps_mod.fake_teacher_loss

    def one_step_late(cfg, fake, adapter, ro, cond, sigmas, rnd):
        late = copy.copy(ro)
        late.x0_i = ro.x_i  # any other target than the prediction made at step i
        return real(cfg, fake, adapter, late, cond, sigmas, rnd)

    monkeypatch.setattr("cdm_train.trainer.fake_teacher_loss", one_step_late)
    tr, off, ours, theirs, grads = _ours_and_official(tmp_path, "optim.update_ratio=1")
    assert abs(float(ours[0]["loss_fake"]) - float(theirs[0]["loss_fake"])) > 1e-3


@pytest.mark.parametrize("processes, lrs", [
    (4, ["optim.student_warmup_steps=10", "optim.fake_warmup_steps=10"]),
    # The official learning rates and warm-ups of the documented 8-GPU launch (config.sd3, accelerate_ddp.yaml).
    (8, ["optim.student_lr=1e-5", "optim.fake_lr=5e-6", "optim.student_warmup_steps=100",
         "optim.fake_warmup_steps=100"]),
])
def test_lr_warmup_is_stepped_as_accelerate_steps_it(tmp_path, processes, lrs):
    """optim.warmup_processes = W reproduces a W-process accelerate launch's warm-up in one process."""
    tr, off, ours, theirs, grads = _ours_and_official(tmp_path, "optim.update_ratio=1",
                                                      f"optim.warmup_processes={processes}", *lrs,
                                                      num_processes=processes)
    o = tr.cfg.optim
    for name, base, warmup in (("student", o.student_lr, o.student_warmup_steps),
                               ("fake", o.fake_lr, o.fake_warmup_steps)):
        assert tr.lrs[name] == pytest.approx(off.lrs[name], rel=1e-12, abs=0), name
        # k-th optimizer step: lr * min(1, W k / warmup), not lr * k / warmup (the single-process reading).
        assert tr.lrs[name] == pytest.approx([base * min(1.0, processes * k / warmup) for k in range(ITERATIONS)])
        assert tr.lrs[name][1] > base * 1 / warmup * 1.5
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss_fake", "loss_ca", "loss_dm", "loss_cdm"):
            _close(a[key], b[key], 2e-5, 1e-7, f"iteration {k} {key}")
    for p, q in zip(tr.models.student.parameters(), off.student.parameters()):
        _close(p.detach(), q.detach(), 1e-5, 2e-6, "student weights")


def test_warmup_processes_default_is_the_world_size_and_lora_fake_counts_once(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "train.batch_size=2", "schedule.max_steps=2", "optim.student_warmup_steps=100",
                             "optim.fake_warmup_steps=100"))
    assert tr.warmup_processes("student") == tr.warmup_processes("fake") == 1  # one process: optimizer steps
    tr.parallel.world_size = 8  # as under an 8-process launch
    assert tr.warmup_processes("student") == tr.warmup_processes("fake") == 8
    assert tr.lr_factor("student", 12) == pytest.approx(0.96) and tr.lr_factor("student", 13) == 1.0
    tr.cfg.lora.student = tr.cfg.lora.fake = True  # FT_LORA_STUDENT_LORA: the fake scheduler is not prepared
    assert tr.warmup_processes("student") == 8 and tr.warmup_processes("fake") == 1
    assert tr.lr_factor("fake", 12) == pytest.approx(0.12)


LORA_LORA = ["lora.student=true", "lora.fake=true", "lora.rank=2", "lora.alpha=4"]


def test_lora_lora_mode_is_the_official_iteration(tmp_path):
    """FT_LORA_STUDENT_LORA: one base, adapters toggled per call (peft's own set_adapter / disable_adapter in the
    transcription), the fake<-student merge between the two adapters (decay 0.9 so that it shows), and the
    asymmetric warm-ups of a 4-process launch: the student's scheduler is prepared (stepped 4x), the fake
    teacher's is not (stepped once)."""
    tr, off, ours, theirs, grads = _ours_and_official(
        tmp_path, *LORA_LORA, "optim.update_ratio=1", "optim.fake_merge_decay=0.9", "optim.warmup_processes=4",
        "optim.student_warmup_steps=10", "optim.fake_warmup_steps=10", num_processes=4)
    o = tr.cfg.optim
    assert tr.lrs["student"] == pytest.approx(off.lrs["student"], rel=1e-12, abs=0)
    assert tr.lrs["fake"] == pytest.approx(off.lrs["fake"], rel=1e-12, abs=0)
    assert tr.lrs["student"] == pytest.approx([o.student_lr * min(1.0, 4 * k / 10) for k in range(ITERATIONS)])
    assert tr.lrs["fake"] == pytest.approx([o.fake_lr * k / 10 for k in range(ITERATIONS)])
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss_fake", "loss_ca", "loss_dm", "loss_cdm"):
            assert float(b[key]) > 0, key
            _close(a[key], b[key], 2e-5, 1e-7, f"iteration {k} {key}")
        for ga, gb in zip(grads["fake"][k], b["fake_grads"]):
            _close(ga, gb, 1e-4, 1e-6, f"iteration {k} fake-adapter gradient")
        for ga, gb in zip(grads["student"][k], b["student_grads"]):
            _close(ga, gb, 1e-4, 1e-6, f"iteration {k} student-adapter gradient")
    m = tr.models
    assert _moved(m.student, tr.initial["student"]) > 1e-4 and _moved(m.fake, tr.initial["fake"]) > 1e-4
    for name, mine, official in (("student adapter", m.student.parameters(), off.student.parameters()),
                                 ("fake adapter", m.fake.parameters(), off.fake.parameters()),
                                 ("EMA", tr.ema.module.parameters(), off.ema)):
        for p, q in zip(mine, official):
            _close(p.detach(), q.detach(), 1e-5, 2e-6, f"{name} after {ITERATIONS} iterations")
    # The frozen base did not move (only adapters train) in either.
    base = {n: p for n, p in m.teacher.peft_model.named_parameters() if "lora_" not in n}
    for n, p in off.student.models.peft.named_parameters():
        if "lora_" not in n:
            torch.testing.assert_close(p.detach(), base[n].detach(), rtol=0, atol=0)


def test_the_lora_transcription_notices_a_wrong_adapter(tmp_path, monkeypatch):
    """The LoRA comparison has teeth: a real-teacher call that leaves the student adapter on breaks it."""
    import cdm_train.lora as lora_mod

    real = lora_mod.activate

    def teacher_keeps_the_student_adapter(peft_model, adapter):
        return real(peft_model, lora_mod.STUDENT if adapter is None else adapter)

    monkeypatch.setattr(lora_mod, "activate", teacher_keeps_the_student_adapter)
    tr, off, ours, theirs, grads = _ours_and_official(tmp_path, *LORA_LORA, "optim.update_ratio=1")
    assert abs(float(ours[1]["loss_ca"]) - float(theirs[1]["loss_ca"])) > 1e-4 * float(theirs[1]["loss_ca"])


@pytest.fixture(scope="module")
def sd3_text_pipeline_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from .helpers import save_tiny_sd3_text_pipeline

    return save_tiny_sd3_text_pipeline(tmp_path_factory.mktemp("sd3-text"))


def official_null_embeds(model_dir, max_sequence_length):
    """train.py: neg_prompt_embed = model_adapter.compute_text_embeddings([""], ...): SD3's pipeline.encode_prompt
    with the empty prompt for all three encoders (cdm/models/model_adapters.py SD3 adapter)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir))  # float32, as saved
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[""], prompt_2=[""], prompt_3=[""], device="cpu",
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def test_encoded_empty_prompt_is_the_unconditional_input(tmp_path, sd3_text_pipeline_dir):
    """Prompts from `encode-prompts` (the sd3-medium preset on a tiny pipeline with text encoders): our CFG null
    condition is the encoded empty prompt, equal to the official run's own encoding of "", and not zeros."""
    from cdm_train.cli import main
    from cdm_train.config import make_config

    texts = ["a cat on the moon", "a red car", "photo of a blue dog", "the moon", "a blue car", "a dog"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    emb = tmp_path / "emb"
    assert main(["encode-prompts", "--model", str(sd3_text_pipeline_dir), "--prompts", str(tmp_path / "p.txt"),
                 "--out", str(emb), "--device", "cpu", "--dtype", "float32", "--max-sequence-length", "8"]) == 0
    null = official_null_embeds(sd3_text_pipeline_dir, 8)
    assert all(float(v.abs().mean()) > 1e-2 for v in null.values())  # the empty prompt encodes to non-zeros

    def config(out):
        return make_config("sd3-medium", overrides=[
            f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
            f"model.path={sd3_text_pipeline_dir}", f"model.prompt_embeds={emb}", "model.resolution=64",
            *RECIPE, "optim.update_ratio=1"])

    tr, off, ours, theirs, grads = _ours_and_official(tmp_path, cfg=config(tmp_path / "run"), official_null=null)
    for key, value in null.items():
        _close(tr.models.adapter.null_cond[key].float(), value, 1e-6, 1e-7, f"null condition {key}")
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("loss_fake", "loss_ca", "loss_dm", "loss_cdm"):
            _close(a[key], b[key], 2e-5, 1e-7, f"iteration {k} {key}")
    for p, q in zip(tr.models.student.parameters(), off.student.parameters()):
        _close(p.detach(), q.detach(), 1e-5, 2e-6, "student weights")
    # Teeth: an official run fed zeros as its unconditional input is another run.
    zeros = {k: torch.zeros_like(v) for k, v in null.items()}
    _, _, ours0, theirs0, _ = _ours_and_official(tmp_path, cfg=config(tmp_path / "run0"), official_null=zeros)
    assert abs(float(ours0[0]["loss_ca"]) - float(theirs0[0]["loss_ca"])) > 1e-3 * float(theirs0[0]["loss_ca"])
