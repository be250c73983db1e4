"""LoRA students and fake teachers (peft) on the frozen teacher's own weights.

Supported combinations (`lora.student`, `lora.fake`):

- full + full (default): three full copies (student, fake teacher, frozen teacher), as before.
- LoRA + LoRA (the official code's LoRA mode): ONE frozen base holds two adapters, "student" and
  "fake"; the real teacher is the same base with adapters disabled. One model in memory instead of
  three (plus the adapters and their AdamW states). The fake<-student merge blends the two adapters
  (same rank and targets), as the official `ema_merge_ft_with_student` does.
- full student + LoRA fake teacher: the fake teacher is an adapter on the frozen teacher's weights
  (one full model less). The official code has no such mode; the fake<-student merge is undefined
  between a full student and an adapter, so it must be off (`optim.fake_merge_decay: 1.0`).
- LoRA student + full fake teacher: refused (no memory saving over full + full that LoRA + LoRA does
  not give better, and no official counterpart).

Each network the trainer sees is an `AdapterView`: a module whose parameters are only its adapter's
(so the optimizer, grad clipping, the merge, the EMA and checkpoints see exactly the trainable
tensors) and whose forward activates its adapter on the shared base (or disables adapters: the real
teacher). Adapter B matrices start at zero (peft's "gaussian" init, as the official code), so the
first student and fake forwards equal the teacher's.

Several GPUs: DDP works (each adapter view is its own DDP module: only the adapters are all-reduced and
broadcast; the frozen base is built identically on every rank). Tested against a single process.

Refused with LoRA (a clear ConfigError): FSDP (it would shard the shared base under three views), the
teacher CUDA graphs and the teacher/fake FP8 switches (a captured graph would bake in one adapter; patching
the shared base's attention or linears would change every network on it), and with a LoRA student also
rollout graphs and FP8 rollout attention. A full student (with a LoRA fake teacher) is its own copy: its
switches (rollout_graphs, fp8_attention_rollout) keep working. Regional compile (speed.compile_blocks) works in
every combination: the shared base's blocks are compiled once, and dynamo keeps one graph per active adapter
(peft's adapter state is guarded), so switching adapters reuses graphs instead of recompiling.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

STUDENT, FAKE = "student", "fake"


def target_modules(cfg: Config) -> list[str]:
    """lora.target_modules, else the model family's official targets (attention linears, + FFN with include_ff)."""
    lc = cfg.lora
    if lc.target_modules is not None:
        return list(lc.target_modules)
    return cfg.family.lora_targets(lc.include_ff)


def validate_lora(cfg: Config) -> None:
    lc, sp = cfg.lora, cfg.speed
    if not (lc.student or lc.fake):
        return
    if lc.student and not lc.fake:
        raise ConfigError("lora.student: a LoRA student needs a LoRA fake teacher too (set lora.fake=true; the "
                          "supported combinations are full+full, LoRA+LoRA and full student + LoRA fake teacher)")
    if lc.fake and not lc.student and cfg.optim.fake_merge_decay < 1.0:
        raise ConfigError("optim.fake_merge_decay: the fake<-student merge is undefined between a full student and a "
                          "LoRA fake teacher; set optim.fake_merge_decay=1.0 (off), or lora.student=true")
    if cfg.train.parallel == "fsdp":
        raise ConfigError("train.parallel: fsdp is not supported with LoRA (FSDP2 would shard the one base that "
                          "the student, fake and real teacher share); use train.parallel=ddp (the base is small "
                          "next to three full copies) or none")
    for key in ("cuda_graphs_teacher", "fp8_attention_teacher", "fp8_attention_fake", "fp8_linear_teacher"):
        if getattr(sp, key):
            raise ConfigError(f"speed.{key}: not supported with a LoRA fake teacher (the real and fake teacher "
                              f"share one base model; a graph or a patched attention would apply to both)")
    # The student-only switches touch the student alone: fine on a full student (its own copy).
    for key in ("rollout_graphs", "fp8_attention_rollout"):
        if lc.student and getattr(sp, key):
            raise ConfigError(f"speed.{key}: not supported with a LoRA student (its base is shared with the real "
                              f"and fake teacher; a graph, compile or patched attention would apply to all three)")
    if lc.rank < 1:
        raise ConfigError("lora.rank: must be >= 1")
    if lc.alpha <= 0:
        raise ConfigError("lora.alpha: must be > 0")


class AdapterView(torch.nn.Module):
    """One network on a shared peft base: `adapter` active (or None: adapters disabled, the real teacher).

    Its registered parameters are exactly the adapter's (the same tensors as in the peft model), so
    `parameters()`, `state_dict()` and `load_state_dict()` cover only what this network trains.
    """

    def __init__(self, peft_model, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: its base is not "ours"
        self.adapter = adapter
        if adapter is not None:
            for name, p in peft_model.named_parameters():
                if f".{adapter}." in name or name.endswith(f".{adapter}"):
                    self.register_parameter(name.replace(".", "__"), p)

    def forward(self, *args, **kwargs):
        with activate(self.peft_model, self.adapter):
            return self.peft_model(*args, **kwargs)

    def __deepcopy__(self, memo):
        """A detached copy of the adapter's tensors only (what the EMA keeps), never of the shared base."""
        snapshot = torch.nn.Module()
        for name, p in self.named_parameters():
            snapshot.register_parameter(name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
        return snapshot

    def base_modules(self):
        return self.peft_model.modules()

    def backward_context(self):
        """Activate this adapter for a backward pass: with gradient checkpointing the base's blocks are
        recomputed during backward, and by then a teacher or fake-teacher call may have switched adapters."""
        return activate(self.peft_model, self.adapter)


@contextlib.contextmanager
def activate(peft_model, adapter: str | None):
    """Run with `adapter` active on the shared base (None: adapters disabled, the real teacher).

    peft's set_adapter / disable_adapter also flip requires_grad (inactive or disabled adapters are
    frozen). Here every adapter must stay trainable: autograd skips accumulating into a leaf whose
    requires_grad is False *at backward time*, so a teacher call between the student's forward and its
    backward would silently drop the student's gradient. So the flags are restored after each switch.
    """
    if adapter is None:
        try:
            with peft_model.disable_adapter():
                yield
        finally:
            _restore_trainable(peft_model)
        return
    if getattr(peft_model, "_cdm_active", None) != adapter:
        peft_model.set_adapter(adapter)
        _restore_trainable(peft_model)
        peft_model._cdm_active = adapter
    yield


def _restore_trainable(peft_model) -> None:
    for p in getattr(peft_model, "_cdm_adapter_params", ()):
        p.requires_grad_(True)


def _lora_config(cfg: Config):
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights="gaussian", target_modules=target_modules(cfg))


def attach(cfg: Config, teacher: torch.nn.Module, student: torch.nn.Module | None):
    """(student, fake, teacher) networks for the configured combination; `teacher` is the frozen base."""
    from peft import get_peft_model

    lc = cfg.lora
    first = STUDENT if lc.student else FAKE
    peft_model = get_peft_model(teacher, _lora_config(cfg), adapter_name=first)
    if lc.student:
        peft_model.add_adapter(FAKE, _lora_config(cfg))
    for name, p in peft_model.named_parameters():  # adapters in fp32 whatever the base's dtype
        is_adapter = f".{STUDENT}." in name or f".{FAKE}." in name
        p.requires_grad_(is_adapter)
        if is_adapter and p.dtype != torch.float32:
            p.data = p.data.float()
    peft_model._cdm_adapter_params = [p for p in peft_model.parameters() if p.requires_grad]
    teacher_view = AdapterView(peft_model, None)
    fake_view = AdapterView(peft_model, FAKE)
    student_net = AdapterView(peft_model, STUDENT) if lc.student else student
    return student_net, fake_view, teacher_view


def adapter_state_dict(view: AdapterView, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter as diffusers' LoRA loaders name it ("transformer_blocks.0.attn.to_q.lora_A.weight").

    `values`: the view's own state_dict layout (e.g. the EMA's) to export instead of the live weights.
    """
    values = values if values is not None else view.state_dict()
    out = {}
    for key, tensor in values.items():
        name = key.replace("__", ".")
        for prefix in ("base_model.model.",):
            if name.startswith(prefix):
                name = name[len(prefix):]
        name = name.replace(f".{view.adapter}.", ".")
        out[name] = tensor.detach().cpu().contiguous()
    return out
