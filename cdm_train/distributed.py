"""Multi-process training on torch.distributed: DDP or FSDP2, launched by torchrun.

``train.parallel``:

- ``none``: one process (the default). Under torchrun with WORLD_SIZE > 1 this is an error.
- ``ddp``: every rank holds full student, fake teacher, real teacher and EMA; gradients of
  student and fake teacher are averaged by ``DistributedDataParallel``. Checkpoints: rank 0
  writes the ordinary ``checkpoint.pt`` (the same file a single process writes), so a DDP
  checkpoint resumes on any world size and ``cdm-train sample`` reads it.
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every transformer block and the
  root of student, fake teacher, frozen real teacher and EMA, so no rank holds a full copy of
  any of them. Mixed precision bf16 params / fp32 gradient reduction on CUDA (fp32 on CPU).
  Checkpoints: ``torch.distributed.checkpoint`` (DCP) in ``checkpoint_dcp/``; DCP reshards on
  load, so a run may resume on a different world size.

Each rank draws its own batch (global batch = world_size x train.batch_size), schedule,
trajectory indices and noise from (seed, rank, step) (see rng.py). Two things must still
agree across ranks:

- whether an optimizer step is taken: the finite flag is all-reduced (MIN), so a NaN on one
  rank skips the step everywhere (`all_finite`).
- the collectives issued by FSDP forwards: the rollout runs a rank-dependent number of student
  forwards (N is drawn per rank), so under FSDP the student is all-gathered once before the
  rollout and no forward inside it communicates (`rollout_context`).

EMA and the fake <- student merge run with torch._foreach_lerp_ on the local shards:
student, fake teacher and EMA are sharded identically (same module structure, same mesh).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .config import Config, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .ema import EMA
    from .models.build import Models

log = logging.getLogger("cdm_train")

PARALLEL_MODES = ("none", "ddp", "fsdp")
DCP_DIR = "checkpoint_dcp"
DCP_META = "meta.pt"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 modules are their own wrapper)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def lerp_local_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source on the local shards (fused foreach).

    Both modules must be sharded identically (or not at all); checked shape by shape.
    """
    if decay >= 1.0:
        return
    tgt = [_local(p) for p in target.parameters() if p.is_floating_point()]
    src = [_local(p) for p in source.parameters() if p.is_floating_point()]
    if len(tgt) != len(src) or any(a.shape != b.shape for a, b in zip(tgt, src)):
        raise ValueError("lerp_local_: target and source are not sharded identically")
    if tgt and tgt[0].dtype != src[0].dtype:
        src = [s.to(t.dtype) for s, t in zip(src, tgt)]
    torch._foreach_lerp_(tgt, src, 1.0 - decay)


@dataclass
class Parallel:
    """The process group, the wrapping of the networks and the distributed checkpoint format."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object initialised the process group (and destroys it in close())
    mesh: Any = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------- set-up
    @classmethod
    def from_config(cfg_cls, cfg: Config) -> Parallel:
        mode = cfg.train.parallel
        if mode not in PARALLEL_MODES:
            raise ConfigError(f"train.parallel: must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
        if mode == "none":
            if env_world_size() > 1:
                raise ConfigError(f"train.parallel: launched by torchrun with WORLD_SIZE={env_world_size()}; set "
                                  "train.parallel=ddp or train.parallel=fsdp (or launch a single process)")
            return cfg_cls()
        owns = False
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ConfigError(f"train.parallel={mode}: needs a torchrun launch ({', '.join(missing)} not set); "
                                  "e.g. torchrun --nproc_per_node 2 -m cdm_train train ...")
            backend = "nccl" if _wants_cuda(cfg) else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
            owns = True
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        par = cfg_cls(mode=mode, rank=rank, world_size=world, local_rank=local, owns_group=owns)
        if rank != 0:  # rank 0 speaks for the run
            log.setLevel(logging.WARNING)
        return par

    def resolve_device(self, device: torch.device) -> torch.device:
        """cuda -> cuda:LOCAL_RANK under a launch (one GPU per process)."""
        if self.enabled and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda":
            if device.index is None:  # torch 2.11's set_device rejects an index-less "cuda" (seen on the H200)
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        if self.enabled and self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(device.type, (self.world_size,))
        return device

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    # ------------------------------------------------------------------------------- wrapping
    def wrap(self, cfg: Config, models: Models, ema: EMA, device: torch.device) -> None:
        """DDP / FSDP2 on the networks, in place (before the optimizers exist; accelerations.py calls it after
        checkpointing and compile)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            # broadcast_buffers=False: the rollout runs a rank-dependent number of forwards, and
            # a buffer broadcast per forward would be a collective the ranks do not all issue.
            models.student = DDP(models.student, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
            models.fake = DDP(models.fake, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
        elif self.mode == "fsdp":
            mp = self._mixed_precision(cfg, device)
            for net in (models.student, models.fake, ema.module):
                shard_module(net, self.mesh, mp)
            # The frozen teacher: bf16 (or fp32) as built; sharded like the others, never trained.
            shard_module(models.teacher, self.mesh, None)

    def _mixed_precision(self, cfg: Config, device: torch.device):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        p = cfg.train.precision
        if p == "fp32" or (p == "auto" and device.type != "cuda"):
            return None
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    # ------------------------------------------------------------------------------- in the step
    @contextlib.contextmanager
    def rollout_context(self, student: torch.nn.Module):
        """FSDP: all-gather the student once; the rollout's forwards then issue no collective."""
        if self.mode != "fsdp":
            yield
            return
        fsdp_modules = _fsdp_modules(student)
        # The root keeps its parameters after forward (FSDP2's default for the root); blocks reshard.
        restore = [mod is not student for mod in fsdp_modules]
        for mod in fsdp_modules:
            mod.set_reshard_after_forward(False, recurse=False)
            mod.unshard()
        try:
            yield
        finally:
            for mod, value in zip(fsdp_modules, restore):
                mod.reshard()
                mod.set_reshard_after_forward(value, recurse=False)
            forget_forward_order(student)

    def end_step(self, models: Models) -> None:
        """The frozen teacher never runs a backward, which is what clears FSDP's forward-order record."""
        if self.mode == "fsdp":
            forget_forward_order(models.teacher)

    def all_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """isfinite(loss) and isfinite(grad_norm) on every rank (so all ranks step, or none)."""
        from torch.distributed.tensor import DTensor

        if isinstance(grad_norm, DTensor):  # FSDP2: clip_grad_norm_ returns the norm as a DTensor
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if not self.enabled:
            return finite
        flag = finite.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag[0].bool()

    def any_flag(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0])

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.detach().clone().float()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, trainer) -> Path:
        from . import checkpoint as ckpt

        out = Path(trainer.out_dir)
        if self.mode == "ddp":
            state = trainer.state_dict()  # every rank builds it (cheap); rank 0 writes it
            path = out / ckpt.CHECKPOINT_NAME
            if self.is_main:
                ckpt.save_atomic(state, path)
            self.barrier()
            return path
        final, tmp, old = out / DCP_DIR, out / f"{DCP_DIR}.tmp", out / f"{DCP_DIR}.old"
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(trainer), checkpoint_id=str(tmp))
        if self.is_main:
            ckpt.save_atomic(trainer.meta_state_dict(), tmp / DCP_META)
            # Swap in the new directory; a crash in between leaves `.old`, which resume also accepts.
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def load_checkpoint(self, trainer, path: str | Path | None) -> None:
        from . import checkpoint as ckpt

        path = Path(path) if path else Path(trainer.out_dir)
        if self.mode == "ddp":
            state = ckpt.load(path, map_location=trainer.device)
            trainer.load_state_dict(state)
            return
        import torch.distributed.checkpoint as dcp

        if path.is_dir() and not (path / DCP_META).is_file():
            for candidate in (path / DCP_DIR, path / f"{DCP_DIR}.old"):
                if (candidate / DCP_META).is_file():
                    path = candidate
                    break
        if not (path / DCP_META).is_file():
            raise FileNotFoundError(f"no distributed checkpoint at {str(path)!r} (expected {DCP_DIR}/{DCP_META})")
        state = self._dcp_state(trainer)
        dcp.load(state, checkpoint_id=str(path))
        self._set_dcp_state(trainer, state)
        trainer.load_meta_state_dict(ckpt.load(path / DCP_META, map_location="cpu"))

    def _dcp_state(self, trainer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        m = trainer.models
        student, student_opt = get_state_dict(m.student, trainer.student_opt)
        fake, fake_opt = get_state_dict(m.fake, trainer.fake_opt)
        return {"student": student, "student_opt": student_opt, "fake": fake, "fake_opt": fake_opt,
                "ema": trainer.ema.module.state_dict()}

    def _set_dcp_state(self, trainer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        m = trainer.models
        set_state_dict(m.student, trainer.student_opt, model_state_dict=state["student"],
                       optim_state_dict=state["student_opt"])
        set_state_dict(m.fake, trainer.fake_opt, model_state_dict=state["fake"], optim_state_dict=state["fake_opt"])
        trainer.ema.module.load_state_dict(state["ema"])


# ------------------------------------------------------------------------------------- helpers
def _ddp_no_forward_buffer_sync() -> dict[str, bool]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    # torch >= 2.13 renames broadcast_buffers (deprecated) to forward_sync_buffers; buffers are
    # identical on every rank at init (same seed), so the init-time sync the new name keeps is harmless.
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


_NO_FORWARD_BUFFER_SYNC = _ddp_no_forward_buffer_sync()


def _wants_cuda(cfg: Config) -> bool:
    d = cfg.train.device
    return d.startswith("cuda") or (d == "auto" and torch.cuda.is_available())


def shard_module(net: torch.nn.Module, mesh, mp_policy) -> None:
    """fully_shard every transformer block, then the root (the usual FSDP2 layout)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for name, mod in net.named_modules():
        if name.split(".")[-1] in BLOCK_LISTS and isinstance(mod, torch.nn.ModuleList):
            for block in mod:
                fully_shard(block, **kwargs)
    fully_shard(net, **kwargs)


def _fsdp_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in net.modules() if isinstance(m, FSDPModule)]


def forget_forward_order(net: torch.nn.Module) -> None:
    """Clear FSDP2's record of forward order (used for backward prefetch) after forwards without backward.

    Forwards without a following backward (the rollout, the frozen teacher) would otherwise grow
    it without bound, and the rollout's rank-dependent forward count would make it differ by rank.
    """
    for mod in _fsdp_modules(net):
        state = mod._get_fsdp_state()
        order = getattr(getattr(state, "_comm_ctx", None), "post_forward_order", None)
        if order is not None:  # private FSDP2 state: absent before the first forward (and may move)
            order.clear()
        for group in getattr(state, "_fsdp_param_groups", ()):
            indices = getattr(group, "_post_forward_indices", None)
            if indices is not None:
                indices.clear()
