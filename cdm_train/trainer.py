"""The CDM training loop: rollout -> fake-teacher step -> (every update_ratio) student step.

Crash safety: checkpoints (student, fake teacher, EMA, both optimizers, RNG states,
step, counters) are written atomically every `train.checkpoint_every` steps and at the
end. The first Ctrl-C finishes the current iteration, writes a checkpoint and stops;
a second Ctrl-C stops at once (losing at most the work since the last checkpoint).
`resume` continues so that the resumed run produces the same losses as an
uninterrupted one (per-step randomness is derived from (seed, rank, step)).

Logs: every `train.log_every` steps a record goes to log.jsonl, TensorBoard and (train.wandb) Weights & Biases;
on a terminal a progress bar shows it, elsewhere (a cluster job's log file) one plain line on stdout per record.

Host syncs: the loss statistics stay on the device and are read once per log interval.
The one deliberate sync per optimizer step is the non-finite check that decides
whether to skip the step (the same sync torch.amp.GradScaler makes).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

import cdm_kernels as ck

from . import checkpoint as ckpt
from .accelerations import apply_accelerations
from .config import Config, ConfigError, to_yaml
from .distributed import Parallel, lerp_local_, unwrap
from .draws import IterationDraws, draw_iteration
from .ema import EMA
from .jsonutil import dumps as json_dumps
from .models.build import Models, build_models, resolve_device
from .monitor import GpuMonitor
from .rng import capture_global_rng, restore_global_rng
from .rollout import rollout
from .steps import fake_teacher_loss, student_losses, training_sigmas

log = logging.getLogger("cdm_train")

LOSS_KEYS = ("loss_fake", "loss_ca", "loss_dm", "loss_cdm", "loss_student")


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_nonfinite` non-finite steps in a row."""


class Trainer:
    def __init__(self, cfg: Config, models: Models | None = None, *, rank: int = 0):
        self.cfg = cfg
        # train.parallel != none: join the torchrun process group; rank, device and wrapping follow it.
        self.parallel = Parallel.from_config(cfg)
        self.rank = self.parallel.rank if self.parallel.enabled else rank
        self.device = self.parallel.resolve_device(resolve_device(cfg.train.device))
        self.models = models if models is not None else build_models(cfg, self.device)
        o = cfg.optim
        self.ema = EMA(self.models.student, o.ema_decay)
        # Attention, FP8 linears, checkpointing, compile, DDP/FSDP2, graphs: in this order, here only.
        self.accelerations = apply_accelerations(cfg, self.models, self.ema, self.parallel, self.device)
        adamw = adamw_options(cfg, self.device)
        self.student_opt = torch.optim.AdamW(self.models.student.parameters(), lr=o.student_lr, **adamw)
        self.fake_opt = torch.optim.AdamW(self.models.fake.parameters(), lr=o.fake_lr, **adamw)
        self.monitor = GpuMonitor(self.device)  # silently off without pynvml or a GPU
        self.step = 0
        self.counters = {"nonfinite_total": 0, "nonfinite_in_a_row": 0, "nfe_rollout": 0, "nfe_total": 0,
                         "nfe_saved_early_exit": 0,
                         "student_updates": 0, "fake_updates": 0}
        self.out_dir = Path(cfg.train.out_dir)
        self._stop_requested = False
        self._iteration_nonfinite = False
        self.history: list[dict[str, Any]] = []  # logged records (also written to log.jsonl)

    # ----------------------------------------------------------------------------------- helpers
    def autocast(self):
        p = self.cfg.train.precision
        if p == "fp32" or (p == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        # Selective checkpointing replays the block's ops in backward and matches them one by one against the
        # forward's; autocast's weight-cast cache would make the forward skip casts (cached by an earlier call in
        # the same region) that the recomputation, in a fresh autocast region, must redo: off for that policy,
        # and for mixed plans with selective blocks (none+selective:k, selective+full:k).
        cache = "selective" not in self.accelerations.checkpointing
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=cache)

    @property
    def rollout_state_dtype(self) -> torch.dtype | None:
        """train.rollout_dtype=bfloat16: the official bf16 trajectory (rollout.rollout's state_dtype)."""
        return torch.bfloat16 if self.cfg.train.rollout_dtype == "bfloat16" else None

    def ema_decay(self, student_step: int) -> float:
        """Official warm-up (cdm/models/ema.py): min((1 + s) / (10 + s), ema_decay), s = student steps taken."""
        o = self.cfg.optim
        return min((1.0 + student_step) / (10.0 + student_step), o.ema_decay) if o.ema_warmup else o.ema_decay

    def warmup_processes(self, network: str) -> int:
        """How many LambdaLR steps the official code takes per optimizer step of `network` (see
        optim.warmup_processes): accelerate's num_processes for a prepared scheduler; 1 for the LoRA + LoRA
        fake teacher, whose scheduler the official train.py does not prepare (FT_LORA_STUDENT_LORA)."""
        if network == "fake" and self.cfg.lora.student and self.cfg.lora.fake:
            return 1
        w = self.cfg.optim.warmup_processes
        return self.parallel.world_size if w is None else w

    def lr_factor(self, network: str, steps_taken: int) -> float:
        """The official create_lr_lambda at scheduler step W * k for the k-th optimizer step (from 0):
        k * W / warmup while below 1, then 1. Stateless (from the checkpointed counters): resume stays exact."""
        o = self.cfg.optim
        warmup = o.student_warmup_steps if network == "student" else o.fake_warmup_steps
        scheduler_steps = steps_taken * self.warmup_processes(network)
        return scheduler_steps / max(1, warmup) if scheduler_steps < warmup else 1.0

    def _set_lr(self, opt: torch.optim.Optimizer, network: str, base_lr: float, steps_taken: int) -> None:
        factor = self.lr_factor(network, steps_taken)
        for group in opt.param_groups:
            group["lr"] = base_lr * factor

    def _optimizer_step(self, module: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
        params = [p for p in module.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip, foreach=True)
        finite = self.parallel.all_finite(loss, total_norm)  # the same on every rank
        if not bool(finite):  # the one host sync per optimizer step (see module docstring)
            opt.zero_grad(set_to_none=True)
            self.counters["nonfinite_total"] += 1
            self._iteration_nonfinite = True
            return False
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True

    # ----------------------------------------------------------------------------------- one iteration
    def draws(self, step: int | None = None) -> IterationDraws:
        """All random draws of iteration `step` (default: the next one); a function of (seed, rank, step)."""
        m = self.models
        return draw_iteration(self.cfg, m.sample_cond, m.latent_shape, m.shift, rank=self.rank,
                              world=self.parallel.world_size, step=self.step if step is None else step,
                              device=self.device)

    def train_step(self) -> dict[str, Any]:
        """One iteration. Returns device-side stats (no host sync) plus host-side counts."""
        cfg, m = self.cfg, self.models
        d = self.draws()
        rnd, cond, batch = d.rnd, d.cond, cfg.train.batch_size
        stats: dict[str, Any] = {}
        self._iteration_nonfinite = False
        with ck.use_backend(cfg.speed.backend):
            with self.autocast(), self.parallel.rollout_context(m.student):
                ro = rollout(m.student, m.adapter, cond, d.noise, d.sigmas, d.indices,
                             early_exit=cfg.speed.early_exit_rollout, state_dtype=self.rollout_state_dtype)
            sg = training_sigmas(cfg, d.uniform, ro.sigma_i)
            with self.autocast():
                loss_fake = fake_teacher_loss(cfg, m.fake, m.adapter, ro, cond, sg, rnd)
            with getattr(unwrap(m.fake), "backward_context", contextlib.nullcontext)():
                loss_fake.backward()
            o = cfg.optim
            self._set_lr(self.fake_opt, "fake", o.fake_lr, self.counters["fake_updates"])
            if self._optimizer_step(m.fake, self.fake_opt, loss_fake):
                self.counters["fake_updates"] += 1
                lerp_local_(m.fake, m.student, cfg.optim.fake_merge_decay)
            stats["loss_fake"] = loss_fake.detach()
            nfe = ro.nfe + batch
            if (self.step + 1) % cfg.optim.update_ratio == 0:
                with self.autocast():
                    sl = student_losses(cfg, m.student, m.teacher, m.fake, m.adapter, ro, cond, sg, rnd)
                # LoRA on a shared base: recomputed (checkpointed) blocks must see the student's adapter.
                with getattr(unwrap(m.student), "backward_context", contextlib.nullcontext)():
                    sl.total.backward()
                self._set_lr(self.student_opt, "student", o.student_lr, self.counters["student_updates"])
                if self._optimizer_step(m.student, self.student_opt, sl.total):
                    self.counters["student_updates"] += 1
                    # = ema.update on local shards; official: the decay of student step s (1-based) after it
                    lerp_local_(self.ema.module, m.student, self.ema_decay(self.counters["student_updates"]))
                stats.update(loss_ca=sl.ca.detach(), loss_dm=sl.dm.detach(), loss_cdm=sl.cdm.detach(),
                             loss_student=sl.total.detach())
                nfe += sl.student_nfe + sl.teacher_nfe + sl.fake_nfe
        self.parallel.end_step(m)
        self.counters["nfe_rollout"] += ro.nfe
        self.counters["nfe_total"] += nfe
        # What early exit saved: without it every sample runs every rollout step.
        self.counters["nfe_saved_early_exit"] += batch * ro.num_steps - ro.nfe
        if self._iteration_nonfinite:
            self.counters["nonfinite_in_a_row"] += 1
            if self.counters["nonfinite_in_a_row"] >= self.cfg.train.max_nonfinite:
                raise TrainingDiverged(
                    f"{self.counters['nonfinite_in_a_row']} non-finite steps in a row at step {self.step} "
                    f"(train.max_nonfinite={self.cfg.train.max_nonfinite}); lower the learning rates or check "
                    f"the data. The last checkpoint in {self.out_dir} is intact.")
        else:
            self.counters["nonfinite_in_a_row"] = 0
        stats["nfe_rollout"] = ro.nfe
        stats["rollout_steps"] = ro.num_steps
        return stats

    # ----------------------------------------------------------------------------------- checkpoints
    def meta_state_dict(self) -> dict[str, Any]:
        """Everything in a checkpoint except the tensors of networks and optimizers."""
        return {"step": self.step, "rng": capture_global_rng(), "counters": dict(self.counters),
                "config": self.cfg.to_dict()}

    def load_meta_state_dict(self, state: dict[str, Any]) -> None:
        restore_global_rng(state["rng"])
        self.counters.update(state["counters"])
        self.step = int(state["step"])

    def state_dict(self) -> dict[str, Any]:
        m = self.models
        return {
            "student": unwrap(m.student).state_dict(),
            "fake": unwrap(m.fake).state_dict(),
            "ema": self.ema.state_dict(),
            "student_opt": self.student_opt.state_dict(),
            "fake_opt": self.fake_opt.state_dict(),
            **self.meta_state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m = self.models
        unwrap(m.student).load_state_dict(state["student"])
        unwrap(m.fake).load_state_dict(state["fake"])
        self.ema.load_state_dict(state["ema"])
        self.student_opt.load_state_dict(state["student_opt"])
        self.fake_opt.load_state_dict(state["fake_opt"])
        self.load_meta_state_dict(state)

    def save_checkpoint(self) -> Path:
        if self.parallel.enabled:  # DDP: rank 0 writes checkpoint.pt; FSDP: DCP from every rank
            path = self.parallel.save_checkpoint(self)
        else:
            path = ckpt.save_atomic(self.state_dict(), self.out_dir / ckpt.CHECKPOINT_NAME)
        log.info("checkpoint written: %s (step %d)", path, self.step)
        return path

    def resume(self, path: str | Path | None = None) -> None:
        try:
            if self.parallel.enabled:
                self.parallel.load_checkpoint(self, path)
            else:
                self.load_state_dict(ckpt.load(path if path is not None else self.out_dir, map_location=self.device))
        except ConfigError:  # an unreadable checkpoint file says so itself (not "another model")
            raise
        except (RuntimeError, KeyError, ValueError) as exc:  # a checkpoint of another model or config
            raise ConfigError(f"cannot resume from {str(path or self.out_dir)!r} with this config (model.preset "
                              f"{self.cfg.model.preset!r}): the checkpoint was written by a different model or "
                              f"configuration, or a shard is damaged. Resume with the run's own config (drop "
                              f"--preset/--config). Details: {str(exc).splitlines()[0][:300]}") from None
        log.info("resumed from step %d", self.step)

    # ----------------------------------------------------------------------------------- the loop
    def _on_sigint(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print("\nCtrl-C: finishing this iteration and writing a checkpoint (Ctrl-C again to stop now)",
              flush=True)

    def train(self, steps: int | None = None) -> dict[str, Any]:
        """Run until `steps` (default train.steps) iterations are done in total. Returns a summary."""
        cfg = self.cfg.train
        total = cfg.steps if steps is None else steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = self.parallel.is_main  # rank 0 writes logs, tensorboard and the progress bar
        if main:  # what `cdm-train train --out DIR --resume` rebuilds the run from
            ckpt.write_text_atomic(self.out_dir / ckpt.RUN_CONFIG_NAME, to_yaml(self.cfg))
        log_file = (self.out_dir / "log.jsonl").open("a") if main else None
        writer = self._tensorboard() if main else None
        self._wandb_run = self._wandb() if main else None
        previous_handler = None
        if _is_main_thread():
            previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        # The bar only where someone watches it: on a terminal it redraws in place; in a file its carriage
        # returns make one unreadable line, so a log file gets a plain line per log interval instead.
        show_bar = main and (cfg.progress if cfg.progress is not None else _is_a_terminal(sys.stderr))
        self._log_lines_total = total if main and not show_bar else None
        bar = _progress(total, self.step, enabled=show_bar)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        nfe_window = 0
        self._nfe_total_at_window = self.counters["nfe_total"]
        t_window = time.perf_counter()
        steps_in_window = 0
        start = time.perf_counter()
        last_record: dict[str, Any] = {}
        try:
            while self.step < total and not self._stop_requested_anywhere():
                stats = self.train_step()
                self.step += 1
                steps_in_window += 1
                nfe_window += stats["nfe_rollout"]
                for k in LOSS_KEYS:
                    if k in stats:
                        # Device-side: a skipped (non-finite) step is left out of the window's mean, no sync.
                        finite = torch.isfinite(stats[k])
                        value = stats[k].float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
                        sums[k] = sums[k] + value if k in sums else value
                        counts[k] = counts[k] + finite.float() if k in counts else finite.float()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == total:
                    last_record = self._log(sums, counts, steps_in_window, nfe_window, t_window, log_file,
                                            writer, bar)
                    sums, counts, nfe_window, steps_in_window = {}, {}, 0, 0
                    t_window = time.perf_counter()
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if sums:
                last_record = self._log(sums, counts, steps_in_window, nfe_window, t_window, log_file, writer, bar)
            if self.step % cfg.checkpoint_every != 0 or self.step == 0:
                self.save_checkpoint()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
            if writer is not None:
                writer.close()
            if self._wandb_run is not None:
                self._wandb_run.finish()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        return {"steps": self.step, "interrupted": self._stop_requested, "wall_clock_s": time.perf_counter() - start,
                "last": last_record, **self.counters}

    def _log(self, sums, counts, steps, nfe, t0, log_file, writer, bar) -> dict[str, Any]:
        keys = [k for k in LOSS_KEYS if k in sums]
        # One sync; under train.parallel the mean over ranks (every rank calls _log at the same steps).
        # A window of only skipped steps gives 0/0 = NaN, logged as null.
        values = self.parallel.mean(torch.stack([sums[k] / counts[k] for k in keys])).tolist() if keys else []
        record: dict[str, Any] = {"step": self.step}
        record.update({k: v for k, v in zip(keys, values)})
        elapsed = time.perf_counter() - t0
        nfe_all = self.counters["nfe_total"] - self._nfe_total_at_window
        self._nfe_total_at_window = self.counters["nfe_total"]
        record.update(step_time_s=elapsed / max(steps, 1), nfe_rollout_per_step=nfe / max(steps, 1),
                      nfe_per_step=nfe_all / max(steps, 1),
                      nfe_saved_early_exit=self.counters["nfe_saved_early_exit"],
                      nonfinite_total=self.counters["nonfinite_total"],
                      lr_student=self.student_opt.param_groups[0]["lr"], lr_fake=self.fake_opt.param_groups[0]["lr"])
        record.update(self.monitor.read())
        if self.device.type == "cuda" and "torch_peak_gib" not in record:  # no NVML: the allocator's own figure
            record["torch_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if log_file is not None:
            log_file.write(json_dumps(record) + "\n")
            log_file.flush()
        self.history.append(record)
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, self.step)
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                                 and math.isfinite(v)}, step=self.step)
        if self._log_lines_total is not None:
            print(log_line(record, self._log_lines_total), flush=True)
        short = {"fake": record.get("loss_fake"), "stu": record.get("loss_student"),
                 "s/it": record["step_time_s"], "nfe": record["nfe_rollout_per_step"]}
        bar.set_postfix({k: f"{v:.3g}" for k, v in short.items() if v is not None})
        return record

    def _stop_requested_anywhere(self) -> bool:
        """Ctrl-C reaches the ranks at different iterations: all stop at the same one."""
        return self.parallel.any_flag(self._stop_requested, self.device)

    def _wandb(self):
        """A W&B run (train.wandb and the package importable), resumed under the same id when the run is."""
        if not self.cfg.train.wandb:
            return None
        try:
            import wandb
        except ImportError:
            log.warning("train.wandb: the wandb package is not installed (pip install wandb); logging to log.jsonl "
                        "and TensorBoard only")
            return None
        id_file = self.out_dir / "wandb_run_id"  # --resume continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if not run_id:
            import uuid

            run_id = uuid.uuid4().hex[:12]
            ckpt.write_text_atomic(id_file, run_id + "\n")
        t = self.cfg.train
        return wandb.init(project=t.wandb_project, entity=t.wandb_entity, name=self.out_dir.name, id=run_id,
                          resume="allow", dir=str(self.out_dir), config=self.cfg.to_dict())

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: silently off
            return None
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))


def adamw_options(cfg: Config, device: torch.device) -> dict[str, Any]:
    """The official AdamW hyper-parameters; the fused kernel on CUDA (one launch per step instead of foreach's
    several; the same update to rounding), foreach elsewhere. FSDP2's DTensor parameters keep foreach: the fused
    kernel's DTensor support is not tested here."""
    o = cfg.optim
    fused = device.type == "cuda" and cfg.train.parallel != "fsdp"
    impl = {"fused": True} if fused else {"foreach": True}
    return dict(betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, **impl)


def log_line(record: dict[str, Any], total: int) -> str:
    """One plain, greppable line of a log record (no carriage returns): step, losses, lr, NFE, speed, memory."""
    def num(v) -> str:
        return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"

    parts = [f"step {record['step']}/{total}"]
    losses = [f"{k.removeprefix('loss_')} {num(record[k])}" for k in LOSS_KEYS if k in record]
    parts.append("loss " + " ".join(losses))
    parts.append(f"lr student {record['lr_student']:.3g} fake {record['lr_fake']:.3g}")
    parts.append(f"nfe/it {record['nfe_per_step']:.1f} (rollout {record['nfe_rollout_per_step']:.1f})")
    step_time = record["step_time_s"]
    parts.append(f"{1.0 / step_time:.3g} it/s" if step_time > 0 else "- it/s")
    memory = [f"{label} {record[k]:.1f} GiB" for k, label in (("torch_peak_gib", "peak"), ("gpu_mem_used_gib", "used"))
              if k in record]
    parts.append("gpu " + (", ".join(memory) if memory else "-"))
    if record.get("nonfinite_total"):
        parts.append(f"skipped non-finite {record['nonfinite_total']}")
    return " | ".join(parts)


def _is_a_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams (pytest capture, daemons)
        return False


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="cdm", unit="it", dynamic_ncols=True)
