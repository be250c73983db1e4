"""Training configuration: dataclasses with the official SD3 recipe as defaults (batch size and length aside).

A config is built from (1) the defaults below, (2) a preset (its family's file in `models/`), (3) an
optional YAML file and (4) `--set section.key=value` overrides, in that order. Unknown
keys and bad values raise ConfigError naming the key; the CLI turns it into exit code 2.

Not official: `train.batch_size` (4 here; the official SD3 run uses 16 per GPU on 8 GPUs) and
`train.steps` (1,000 here; the official run is about 4,000 iterations).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .lora import validate_lora
from .models import PRESETS, family_of
from .models.base import ModelFamily

# speed.attention_backend's values: cdm_kernels.attention.sdpa_backend.BACKENDS (tests hold the two equal; kept
# literal here so that reading a config imports no torch).
ATTENTION_BACKENDS = ("auto", "sdpa-default", "cudnn", "flash", "efficient", "math", "fa3", "te")

__all__ = ["Config", "ConfigError", "make_config", "config_from_dict", "reference_mode", "to_yaml"]


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | digits | sd3-medium(-shape) | flux(-shape, -tiny) | longcat(-shape, -tiny)
    path: str | None = None  # sd3-medium / flux / longcat: local diffusers directory (holding transformer/)
    # sd3-medium / flux / longcat: precomputed text embeddings (a file, or an encode-prompts directory)
    prompt_embeds: str | None = None
    teacher_path: str | None = None  # digits: teacher checkpoint (None: the one shipped in the package)
    layers: int | None = None  # sd3-medium-shape: depth (None: 24); flux-shape: L double + 2L single (None: 19+38)
    resolution: int = 1024  # sd3-medium*/flux/flux-shape: image side in pixels (latent = resolution / 8)
    teacher_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    flux_guidance: float = 3.5  # flux presets: the guidance embedding of guidance-distilled teachers (Flux-dev)


@dataclass
class ScheduleConfig:
    max_steps: int = 28  # Nmax: N ~ U{1..Nmax} rollout steps per iteration
    # How N is drawn. Both give every rank the same N at a step (only the inner sigmas are per rank).
    # official: random.Random((epoch, batch_idx)).randint(1, Nmax) as the official train.py (Python 3.10 seeds a
    #   tuple by its hash; with num_batches_per_epoch = 1, (step, 0)): depends on the step only, not on train.seed.
    # seeded: from (train.seed, step), so runs with different seeds also see different schedule lengths.
    length_draw: str = "official"
    inner_sigma_min: float = 0.25  # inner sigmas ~ U(inner_sigma_min, inner_sigma_max)
    inner_sigma_max: float = 0.95
    fixed: list[float] | None = None  # a fixed schedule instead (e.g. [1.0, 0.75, 0.5, 0.25]); 0 is appended
    # The model scheduler's shift, applied (as diffusers does) to the rollout schedule and at sampling, not to the
    # directly drawn training sigmas (cdm_train/schedule.py). None: the model's own (sd3-medium: its
    # scheduler_config.json, else 3.0; sd3-medium-shape 3.0; flux and longcat presets: dynamic, mu from the image
    # token count and the directory's scheduler config, docs/flux.md); the tiny and digits presets set 1.0.
    shift: float | None = None
    sigma_clamp_min: float = 0.02  # every sampled training sigma is clamped to [min, max]
    sigma_clamp_max: float = 0.98


@dataclass
class LossConfig:
    guidance_scale: float = 7.0  # alpha of the CFG-augmentation target
    norm_clip_min: float = 0.1  # per-sample normaliser floor
    ca_weight: float = 1.0
    dm_weight: float = 1.0
    cdm_weight: float = 1.0  # the off-trajectory (continuous-time) DM loss; 0 disables it


@dataclass
class OptimConfig:
    student_lr: float = 1e-5
    fake_lr: float = 5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # student EMA (the cap of the warm-up below)
    ema_warmup: bool = True  # official: decay = min((1 + s) / (10 + s), ema_decay), s = student steps so far
    fake_merge_decay: float = 0.999  # fake <- decay * fake + (1 - decay) * student, every fake step
    update_ratio: int = 2  # fake-teacher steps per student step
    # Linear LR warm-up from 0 (official create_lr_lambda: lr_k = lr * k / warmup for optimizer step k < warmup,
    # then constant); 0 disables it. Counted in each optimizer's own steps.
    student_warmup_steps: int = 100
    fake_warmup_steps: int = 100
    # The official schedulers are wrapped by accelerate's prepare(), whose AcceleratedScheduler steps the LambdaLR
    # num_processes times per optimizer step (split_batches=False, accelerate's default): optimizer step k uses
    # lr * min(1, W * k / warmup). W = warmup_processes; None: this run's world size (1 without torchrun). Set 8 to
    # reproduce the documented 8-GPU run on fewer GPUs, 1 to count the warm-up in optimizer steps. In the
    # LoRA + LoRA mode the official fake-teacher scheduler is not prepared, so its warm-up always counts W = 1.
    warmup_processes: int | None = None


@dataclass
class SpeedConfig:
    """Accelerations. Each one is exact (same losses and gradients) or measured; see the README's "Speed switches"."""

    backend: str = "auto"  # cdm_kernels backend: auto | reference | triton | cpp
    shared_student_forward: bool = True  # (a) one student forward serves CA and DM
    early_exit_rollout: bool = True  # (b) samples leave the rollout after their step i
    batched_teacher_calls: bool = True  # (c) real-teacher cond/uncond/DM/CDM calls in one batch
    # FP8 for passes without gradient (measured, not exact; see docs/fp8.md). Off by default.
    fp8_attention_teacher: bool = False  # real teacher: every call
    fp8_attention_fake: bool = False  # fake teacher: its no-grad scoring calls (its training step stays bf16)
    fp8_attention_rollout: bool = False  # student: the no-grad rollout (the student step stays bf16)
    fp8_linear_teacher: bool = False  # real teacher's linear layers via torchao float8 (sm_89+, else no-op)
    # fp8_linear_teacher through a PyTorch emulation of the same row-wise e4m3 rounding (any device, every linear
    # outside the AdaLN / embedders): for measuring FP8 linears' effect on quality without FP8 hardware.
    fp8_linear_emulate: bool = False
    # The fp8_attention_* switches run the PyTorch twin of the FP8 kernel (same e4m3 roundings, any device and
    # head dim, slower than SDPA) instead of the kernel: for measuring FP8's effect on quality without a GPU.
    fp8_attention_emulate: bool = False
    # 8-bit format of the fp8_attention_* switches: auto (the 8-bit kernel the device has, FP8 on sm_89+ or
    # INT8-QK on sm_80/86, but only where cdm_kernels' speed table measured it faster than the best bf16 attention;
    # elsewhere bf16, logged; emulated: the FP8 twin) | fp8 (the 8-bit kernel always, e.g. for its memory saving)
    # | int8 (the INT8-QK kernel on any sm_80+ GPU; emulated: its twin). See docs/attention.md and docs/fp8.md.
    attention_8bit: str = "auto"
    # Exact attention of every pass that is not 8-bit (student, fake, teacher; grad and no-grad), see
    # docs/attention.md: auto (cuDNN on sm_90 with cuDNN >= 9.15.1, flash on other GPUs, FA3 where importable;
    # the CPU: torch's own) | sdpa-default (diffusers' default, untouched) | cudnn | flash | efficient | math |
    # fa3 | te (optional packages).
    attention_backend: str = "auto"
    # CUDA graphs, streams, compile (docs/graphs.md). Eager fallback on the CPU. Off by default.
    cuda_graphs_teacher: bool = False  # real teacher + fake no-grad scoring replayed as CUDA graphs (one per shape)
    overlap_teacher_calls: bool = False  # real and fake teacher at the same x_t concurrently on two streams
    # Regional torch.compile of the transformer blocks of every network and pass (student, fake teacher, real
    # teacher, EMA); CPU too (inductor's C++ backend). Replaces compile_student (still accepted, with a warning).
    compile_blocks: bool = False
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (the last two: debugging and tests)
    rollout_graphs: bool = False  # the student's no-grad rollout as graphs, one per batch size
    rollout_graph_mode: str = "capture"  # capture (GraphedForward) | compile (torch.compile reduce-overhead)
    # The student step's CA + DM + CDM loss block (after the model forwards) as one torch.compile(fullgraph)
    # region on CUDA: the weighted sum and its backward fuse, one Python call. Eager on the CPU. Off until measured.
    compile_loss_block: bool = False


@dataclass
class TrainConfig:
    steps: int = 1000  # iterations (official SD3 run: ~4,000); each: rollout + fake step (+ student step)
    batch_size: int = 4  # per process (official SD3 run: 16 per GPU x 8 GPUs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs/cdm"
    log_every: int = 10
    checkpoint_every: int = 100
    max_nonfinite: int = 5  # this many non-finite steps in a row stop training
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # null (auto): a progress bar when stderr is a terminal, else one plain log line per log_every steps on stdout
    # (step, losses, lr, NFE, it/s, GPU memory: readable in a cluster's log file); true / false: bar / lines.
    progress: bool | None = None
    tensorboard: bool = True  # used when the tensorboard package is installed
    # Weights & Biases: each log record to wandb (rank 0), when the wandb package is importable (else a warning).
    # No network: WANDB_MODE=offline writes the run under train.out_dir/wandb/ (`wandb sync` uploads it later).
    wandb: bool = False
    wandb_project: str = "cdm-kernels"
    wandb_entity: str | None = None  # your W&B team or user (None: the default of your login)
    parallel: str = "none"  # none | ddp | fsdp (multi-process under torchrun; see docs/distributed.md)
    # Activation checkpointing of the student's and fake teacher's blocks: auto (the fastest plan whose estimated
    # peak fits the GPU: none, else selective, else full; none on a CPU; memory_plan.py) | none | full (recompute
    # each block in backward; the official setting) | selective (keep matmul and attention outputs, recompute the
    # elementwise ops). true / false are read as full / none.
    grad_checkpointing: str = "auto"
    # epoch: prompts without replacement, as the official DistributedKRepeatSampler (k = 1): a permutation of the
    #   prompt rows (reshuffled with seed + e) is walked in global-batch slices of world x batch rows; each slice is
    #   shuffled (seed + step) and split across ranks. A function of (seed, step, rank, world): resumes exactly.
    # random: rows drawn with replacement from the step's own generator.
    # Applies to prompt-embedding datasets; the digits preset draws balanced class labels either way.
    prompt_order: str = "epoch"
    # The rollout trajectory's dtype. float32 (default): x_k, v_k and x0_k are kept in fp32 between steps.
    # bfloat16: the official precision (the pipeline holds latents in the bf16 embeddings' dtype and casts all_x0 to
    # it; the training steps upcast them to the model's fp32 again). Measured on digits: benchmarks/RESULTS_quality.md.
    rollout_dtype: str = "float32"


@dataclass
class LoraSection:
    """LoRA (peft) for the student and/or the fake teacher on the frozen teacher's weights (cdm_train/lora.py)."""

    student: bool = False  # the student is an adapter (needs fake too: one shared base, official LoRA mode)
    fake: bool = False  # the fake teacher is an adapter on the frozen teacher's weights
    rank: int = 64  # official default
    alpha: float = 128.0  # official default
    include_ff: bool = True  # also the feed-forward linears (official lora_include_ff)
    target_modules: list[str] | None = None  # None: the official SD3 attention projections (+ FFN)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def family(self) -> ModelFamily:
        """The model family of model.preset, resolved once per config (the one place a run resolves it): every
        layer that needs the family asks the run's config. Resolved again only if model.preset is changed."""
        cached = self.__dict__.get("_family")
        if cached is None or cached[0] != self.model.preset:
            cached = (self.model.preset, family_of(self.model.preset))
            self.__dict__["_family"] = cached  # not a dataclass field: never in to_dict / to_yaml / equality
        return cached[1]


# ---------------------------------------------------------------------------------------------
# Building and overriding


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and gently convert) a value against a field's type annotation."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "float": float, "int": int, "str": str, "bool": bool})
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _section(cfg: Config, name: str, key: str):
    if name not in {f.name for f in dataclasses.fields(cfg)}:
        sections = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"{key}: unknown section {name!r} (sections: {sections})")
    return getattr(cfg, name)


# Renamed keys: old name -> new name (read with a warning, so old config files and checkpoints keep working).
def _is_checkpointing_plan(value) -> bool:
    from .memory_plan import parse_plan  # lazily: memory_plan imports torch

    try:
        parse_plan(value)
    except ValueError:
        return False
    return True


def _plan_syntax() -> str:
    from .memory_plan import PLAN_SYNTAX

    return PLAN_SYNTAX


RENAMED_KEYS = {"speed.compile_student": "speed.compile_blocks"}


def set_value(cfg: Config, dotted_key: str, value: Any) -> None:
    if dotted_key in RENAMED_KEYS:
        new_key = RENAMED_KEYS[dotted_key]
        logging.getLogger("cdm_train").warning("%s is now %s (it compiles every network's blocks); read as %s=%s",
                                               dotted_key, new_key, new_key, value)
        dotted_key = new_key
    if dotted_key == "train.grad_checkpointing" and isinstance(value, bool):  # the earlier boolean key
        value = "full" if value else "none"
    parts = dotted_key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted_key}: keys look like section.name (e.g. train.steps)")
    section = _section(cfg, parts[0], dotted_key)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if parts[1] not in fields:
        raise ConfigError(f"{dotted_key}: unknown key (keys of {parts[0]}: {', '.join(fields)})")
    setattr(section, parts[1], _coerce(dotted_key, value, fields[parts[1]].type))


def _collect(problems: list[str], fn, *args) -> None:
    """Run fn(*args), adding its ConfigError's problems to `problems` (one report of everything wrong)."""
    try:
        fn(*args)
    except ConfigError as exc:
        problems.extend(exc.problems)


def apply_dict(cfg: Config, data: dict[str, Any], source: str = "config") -> None:
    """Set every key of `data`; all bad sections, keys and values are reported together."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    problems: list[str] = []
    for section_name, values in data.items():
        if not isinstance(values, dict):
            problems.append(f"{section_name}: expected a mapping of keys, got {values!r}")
            continue
        try:
            _section(cfg, section_name, str(section_name))
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        for key, value in values.items():
            _collect(problems, set_value, cfg, f"{section_name}.{key}", value)
    if problems:
        raise ConfigError(problems)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value (e.g. train.steps=20)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return key.strip(), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model, schedule, loss, "
                          f"optim, speed, train), got {type(data).__name__}")
    return data or {}


def make_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | dict[str, Any] | None = None, *, default_preset: str | None = None,
                check_inputs: bool = False) -> Config:
    """Defaults <- preset <- YAML file <- overrides, then validated; with `check_inputs`, also the files, device
    and backend a training run on this machine would use (input_problems). Every problem found is reported in one
    ConfigError.

    The preset whose values are applied is the one the finished config names: the last
    ``model.preset`` override, else the file's ``model.preset``, else ``preset``, else
    ``default_preset``, else the dataclass default. So a config never carries the values of
    one preset under the name of another, however the layers are combined.
    """
    file_data = load_yaml(config_file) if config_file is not None else {}
    problems: list[str] = []
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides or []:
            try:
                items.append(parse_override(text))
            except ConfigError as exc:
                problems.extend(exc.problems)
    chosen = preset
    file_model = file_data.get("model")
    if isinstance(file_model, dict) and "preset" in file_model:
        chosen = file_model["preset"]
    for key, value in items:
        if key == "model.preset":
            chosen = value
    if chosen is None:
        chosen = default_preset or Config().model.preset
    if not isinstance(chosen, str) or chosen not in PRESETS:  # nothing else can be checked without the preset
        raise ConfigError(problems + [f"model.preset: unknown preset {chosen!r} (presets: {', '.join(PRESETS)})"])
    cfg = Config()
    apply_dict(cfg, PRESETS[chosen], f"preset {chosen}")
    cfg.model.preset = chosen
    _collect(problems, apply_dict, cfg, file_data, str(config_file))
    for key, value in items:
        _collect(problems, set_value, cfg, key, value)
    _collect(problems, validate, cfg)  # on the keys that were set; a rejected value keeps its default
    if check_inputs:
        problems.extend(input_problems(cfg))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # each once, in the order found
    return cfg


def input_problems(cfg: Config) -> list[str]:
    """What a training run on this machine would fail on before its first step: the model files the preset
    reads (model.path, model.prompt_embeds, model.teacher_path), train.device, and speed.backend on that device.
    All of them, checked without loading anything."""
    from .models.build import resolve_device

    problems = list(cfg.family.input_problems(cfg))
    try:
        device = resolve_device(cfg.train.device)
    except ConfigError as exc:
        return problems + exc.problems
    if cfg.speed.backend in ("triton", "cpp"):
        import torch

        from cdm_kernels import backend

        with backend.use_backend(cfg.speed.backend):
            try:  # the same lookup every fused op makes at its first call
                backend.resolve("euler_step", device, torch.float32)
            except RuntimeError as exc:
                problems.append(f"speed.backend: {exc} (use auto: the fastest backend available here)")
    return problems


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    apply_dict(cfg, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every value's range and the combinations; all problems in one ConfigError."""
    problems: list[str] = []

    def _require(cond: bool, key: str, message: str) -> None:  # collects: every problem in one report
        if not cond:
            problems.append(f"{key}: {message}")

    m, s, lo, o, sp, t = cfg.model, cfg.schedule, cfg.loss, cfg.optim, cfg.speed, cfg.train
    _require(m.preset in PRESETS, "model.preset", f"unknown preset {m.preset!r} (presets: {', '.join(PRESETS)})")
    _require(m.teacher_dtype in ("auto", "float32", "bfloat16"), "model.teacher_dtype",
             "must be auto, float32 or bfloat16")
    _require(m.layers is None or m.layers >= 1, "model.layers", "must be >= 1")
    _require(m.resolution >= 16 and m.resolution % 16 == 0, "model.resolution", "must be a multiple of 16")
    _require(s.max_steps >= 1, "schedule.max_steps", "must be >= 1")
    _require(s.length_draw in ("official", "seeded"), "schedule.length_draw", "must be official or seeded")
    _require(0.0 < s.inner_sigma_min <= s.inner_sigma_max < 1.0, "schedule.inner_sigma_min",
             "need 0 < inner_sigma_min <= inner_sigma_max < 1")
    if s.fixed is not None:
        _require(len(s.fixed) >= 1 and s.fixed[0] == 1.0, "schedule.fixed", "must start at 1.0")
        _require(bool(s.fixed) and all(a > b for a, b in zip(s.fixed, s.fixed[1:])) and s.fixed[-1] > 0.0,
                 "schedule.fixed",
                 "must be strictly decreasing and above 0 (0 is appended)")
    _require(0.0 <= s.sigma_clamp_min < s.sigma_clamp_max <= 1.0, "schedule.sigma_clamp_min",
             "need 0 <= sigma_clamp_min < sigma_clamp_max <= 1")
    _require(lo.norm_clip_min > 0, "loss.norm_clip_min", "must be > 0")
    for name in ("ca_weight", "dm_weight", "cdm_weight"):
        _require(getattr(lo, name) >= 0, f"loss.{name}", "must be >= 0")
    _require(o.student_lr > 0, "optim.student_lr", "must be > 0")
    _require(o.fake_lr > 0, "optim.fake_lr", "must be > 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.eps > 0, "optim.eps", "must be > 0")
    _require(o.grad_clip > 0, "optim.grad_clip", "must be > 0")
    _require(s.shift is None or s.shift > 0, "schedule.shift", "must be > 0 (1.0: no shift)")
    _require(0 <= o.ema_decay < 1, "optim.ema_decay", "must be in [0, 1)")
    _require(o.student_warmup_steps >= 0, "optim.student_warmup_steps", "must be >= 0")
    _require(o.fake_warmup_steps >= 0, "optim.fake_warmup_steps", "must be >= 0")
    _require(o.warmup_processes is None or o.warmup_processes >= 1, "optim.warmup_processes", "must be >= 1 (or null)")
    _require(0 <= o.fake_merge_decay <= 1, "optim.fake_merge_decay", "must be in [0, 1] (1 disables the merge)")
    _require(o.update_ratio >= 1, "optim.update_ratio", "must be >= 1")
    _require(sp.backend in ("auto", "reference", "triton", "cpp"), "speed.backend",
             "must be auto, reference, triton or cpp")
    _require(sp.rollout_graph_mode in ("capture", "compile"), "speed.rollout_graph_mode",
             "must be capture or compile")
    _require(sp.attention_8bit in ("auto", "fp8", "int8"), "speed.attention_8bit", "must be auto, fp8 or int8")
    _require(sp.attention_backend in ATTENTION_BACKENDS, "speed.attention_backend",
             f"must be one of {', '.join(ATTENTION_BACKENDS)}")
    _require(sp.compile_backend in ("inductor", "aot_eager", "eager"), "speed.compile_backend",
             "must be inductor, aot_eager or eager")
    _require(not sp.fp8_linear_emulate or sp.fp8_linear_teacher, "speed.fp8_linear_emulate",
             "emulates speed.fp8_linear_teacher; set that too")
    _require(t.grad_checkpointing == "auto" or _is_checkpointing_plan(t.grad_checkpointing),
             "train.grad_checkpointing", f"must be {_plan_syntax()}, got {t.grad_checkpointing!r}")
    _require(t.steps >= 0, "train.steps", "must be >= 0")
    _require(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _require(0 <= t.seed < 2**62, "train.seed", "must be in [0, 2**62)")
    _require(isinstance(t.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
             "train.device",
             "must be auto, cpu, cuda or cuda:N")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _require(t.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    _require(t.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16")
    _require(t.parallel in ("none", "ddp", "fsdp"), "train.parallel", "must be none, ddp or fsdp")
    _require(t.prompt_order in ("epoch", "random"), "train.prompt_order", "must be epoch or random")
    _require(t.rollout_dtype in ("float32", "bfloat16"), "train.rollout_dtype", "must be float32 or bfloat16")
    if t.parallel == "fsdp":
        # FSDP2 frees and re-allocates the unsharded weights around every forward, so a CUDA graph
        # captured over them would replay on stale addresses; the second stream would race its
        # all-gathers. Not supported until tested on GPUs.
        for key in ("cuda_graphs_teacher", "rollout_graphs", "overlap_teacher_calls"):
            _require(not getattr(cfg.speed, key), f"speed.{key}", "is not supported with train.parallel=fsdp "
                     "(FSDP re-allocates the unsharded weights every forward); use ddp or switch it off")

    _collect(problems, validate_lora, cfg)
    if problems:
        raise ConfigError(problems)


def reference_mode(cfg: Config, *, official_memory_plan: bool = False) -> None:
    """Switch every acceleration off (the baseline the fast mode is measured against).

    Every boolean speed switch goes off, so a switch added later is covered without a change here.
    official_memory_plan: also the official launch's memory plan (byliutao/cdm config/config.py:
    gradient_checkpointing = True for student and fake teacher), as the benchmarks' reference mode runs it.
    It changes no loss or gradient, only time and memory.
    """
    for f in dataclasses.fields(cfg.speed):
        if isinstance(getattr(cfg.speed, f.name), bool):
            setattr(cfg.speed, f.name, False)
    cfg.speed.backend = "reference"
    if official_memory_plan:
        cfg.train.grad_checkpointing = "full"
    cfg.speed.attention_backend = "sdpa-default"  # diffusers' own attention call, untouched


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
