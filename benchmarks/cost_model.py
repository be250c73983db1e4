"""Iteration cost model at the real shapes: one CDM iteration on fake tensors (no memory, no GPU).

    python benchmarks/cost_model.py                                   # the tables of RESULTS_cost_model.md
    python benchmarks/cost_model.py --preset sd3-medium-shape --layers 4 --batch 4 --steps 3-10
    python benchmarks/cost_model.py --compare gpu_out/bench_step.json  # measured vs predicted (gpu_acceptance.sh)

The real trainer (`cdm_train.trainer.Trainer.train_step`, every switch as configured) runs under
torch's FakeTensorMode on CPU "devices", with bf16 autocast and a bf16 teacher as on the GPU. Nothing
is computed and nothing of model size is allocated. A dispatch mode sees every aten / custom op
below autograd (forward, backward, optimizer) and records, per phase (rollout / fake step / student
step, the phases of bench_step.py):

- FLOPs: torch.utils.flop_counter's formulas (matmuls, convolutions, attention; forward and backward);
- bytes: each op's tensor inputs read once + outputs written once (the minimal HBM traffic of that
  op alone; for the fused cdm_kernels ops this is their true traffic, for eager chains an estimate);
- launches: ops that are not views / metadata / allocations (a proxy for kernels: a foreach op
  counts once, a fused op's finalize kernel not at all);
- host syncs: aten._local_scalar_dense (bool(), .item(), .tolist() of a device tensor) and
  data-dependent-shape ops (nonzero, masked_select, unique);
- peak live memory: bytes of live storages (every op output, models and optimizer states included).

Attention runs as aten._scaled_dot_product_flash_attention (what SDPA picks on an H100/H200 for bf16
without a mask): flash memory (no S x S matrix) and its FLOP formula (backward 2.5x forward).

Time is predicted per op as max(FLOPs / compute ceiling, bytes / HBM ceiling), summed: the H200
ceilings measured in benchmarks/RESULTS_gpu.md (2026-12-04): bf16 matmul 762.6 TFLOP/s, bf16
SDPA at the model's own attention shape, copy 4,214 GB/s. It is a lower bound for a GPU that is
never idle; launch and host costs come on top (the launches column says how many).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import statistics
import sys
import weakref
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_distributed

# H200 ceilings measured in benchmarks/RESULTS_gpu.md (2026-12-04, the acceptance run).
MATMUL_TFLOPS = 762.6  # bf16 8192^3 matmul
FP8_MATMUL_TFLOPS = 1262.0  # fp8 8192^3 matmul, same run
HBM_GBS = 4214.0  # 1 GiB copy
# bf16 SDPA forward at the model's attention shape (same run): FLOPs 4 B H S^2 D over the measured time.
ATTENTION_MEASURED = {  # name: (B, H, S, D, ms)
    "sd3": (4, 24, 4429, 64, 1.566),
    "flux": (1, 24, 4608, 128, 0.785),
}
MEASURED_BENCH_STEP = {  # RESULTS_gpu.md: sd3-medium-shape 1024 px, 4 layers, batch 4, 8 timed iterations after 3
    "config": {"preset": "sd3-medium-shape", "layers": 4, "batch": 4, "resolution": 1024, "steps": list(range(3, 11)),
               "length_from_host_generator": True},  # the draws of the code that ran (real_host_draws)
    "reference": {"median_ms": 492.5, "nfe": 78, "rollout_ms": 128.8, "fake_step_ms": 69.2, "student_step_ms": 294.8,
                  "peak_gib": 38.98},
    "fast": {"median_ms": 388.9, "nfe": 58, "rollout_ms": 89.3, "fake_step_ms": 66.2, "student_step_ms": 231.7,
             "peak_gib": 38.98},
}
PHASES = ("rollout", "fake_step", "student_step")
GiB = 1024**3


# Published H100 cuDNN bf16 attention forward (DESIGN facts, issue 24's anchors: 408 at D=64, 609-631 at D=128):
# what speed.attention_backend=auto should reach on sm_90; not measured here yet.
CUDNN_PUBLISHED_TFLOPS = {"sd3": 408.0, "flux": 620.0}


def attention_tflops(model: str) -> float:
    b, h, s, d, ms = ATTENTION_MEASURED[model]
    return 4 * b * h * s * s * d / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------- accounting

NO_KERNEL = {  # aten ops that launch nothing: views, metadata, allocations
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze", "slice",
    "select", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "alias", "detach", "_reshape_alias",
    "lift_fresh", "lift_fresh_copy", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "_local_scalar_dense", "view_as_real", "view_as_complex", "unflatten", "flatten", "narrow", "diagonal",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_has_compatible_shallow_copy_type", "prim::device", "_to_copy_noop",
}
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "unique_dim"}
MATMUL = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_scaled_mm", "linear"}
ATTENTION = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}
FUSED_NAMESPACES = ("cdm_kernels", "cdm_kernels_cpp")


def _tensors(obj):
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclasses.dataclass
class Tally:
    flops: float = 0.0
    bytes: float = 0.0
    launches: float = 0.0  # fractional where a compiled block fuses several ops into fewer kernels
    syncs: int = 0
    seconds: float = 0.0  # predicted
    by_kind: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # predicted seconds per kind
    flops_by_pass: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # fwd / fwd no-grad / bwd
    seconds_by_pass: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    seconds_by_pass_kind: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    fused_bytes: float = 0.0
    fused_launches: int = 0

    def add(self, other: Tally) -> None:
        for f in ("flops", "bytes", "launches", "syncs", "seconds", "fused_bytes", "fused_launches"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for name in ("by_kind", "flops_by_pass", "seconds_by_pass", "seconds_by_pass_kind"):
            for k, v in getattr(other, name).items():
                getattr(self, name)[k] += v


class CostMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every op below autograd into the current phase's Tally; tracks live storage bytes."""

    def __init__(self, attention_tflops_: float, compiled: CompiledBlocks | None = None):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry
        self.attention_tflops = attention_tflops_
        self.compiled = compiled  # modelled regional compile (speed.compile_blocks), None: eager
        self.block_depth = 0  # > 0 inside a transformer block's forward (hooks, see ModelledSwitches)
        self.fp8_depth = 0  # > 0 inside a linear layer that runs in FP8 (speed.fp8_linear_teacher)
        self.phase = "build"
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.live = 0
        self.peak = 0
        self.peak_phase = ""
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _track(self, out) -> None:
        for t in _tensors(out):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if st in self._seen:
                continue
            self._seen.add(st)
            n = st.nbytes()
            self.live += n
            weakref.finalize(st, self._free, n)
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
            return func(*args, **kwargs)  # real_host_draws: host-side draws on real tensors, not modelled
        name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
        namespace = getattr(func, "namespace", "aten")
        tally = self.tallies[self.phase]
        if name == "_local_scalar_dense":  # a host read of a tensor's value
            # AdamW (not capturable) keeps its step counters on the host: reading them syncs nothing on a GPU.
            if not _called_from_optimizer():
                tally.syncs += 1  # the trainer's one non-finite check per optimizer step, or a regression
            return True if args[0].dtype == torch.bool else 1
        if name in DATA_DEPENDENT:
            tally.syncs += 1
        out = func(*args, **kwargs)
        self._track(out)
        if name in NO_KERNEL or func is torch.ops.aten.copy_.default and args[0] is args[1]:
            return out
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        nbytes = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        packet = func.overloadpacket if hasattr(func, "overloadpacket") else None
        flops = 0
        if packet in self.flop_registry:
            flops = self.flop_registry[packet](*args, **kwargs, out_val=out)
        backward = torch._C._current_autograd_node() is not None
        pass_ = "backward" if backward else "forward" if torch.is_grad_enabled() else "forward no-grad"
        launches = 1.0
        if name in ATTENTION:
            kind, ceiling = "attention", self.attention_tflops
        elif name in MATMUL or flops:
            kind, ceiling = "matmul", MATMUL_TFLOPS
            if self.fp8_depth and pass_ == "forward no-grad":
                # FP8 GEMM: operands read at 1 byte instead of 2; the activation's row-wise quantisation is
                # extra traffic: fused into the producer when compiled (write the fp8 copy: 1 B/elem), else its
                # own passes (amax read 2 B + read 2 B + write 1 B per element, two launches).
                kind, ceiling = "matmul fp8", FP8_MATMUL_TFLOPS
                act = args[1] if name == "addmm" else args[0]
                per_elem = 1 if self.compiled is not None else 5
                quant = act.numel() * per_elem
                nbytes = nbytes - _nbytes(act) // 2 - _nbytes(args[-1] if name != "addmm" else args[2]) // 2 + quant
                launches += 0 if self.compiled is not None else 2
        elif namespace in FUSED_NAMESPACES:
            kind, ceiling = "fused op", None
        else:
            kind, ceiling = "elementwise / reduction / optimizer", None
            if self.compiled is not None and (self.block_depth or (backward and not _called_from_optimizer())):
                # Inside a compiled block (its forward, or any backward op of the models, recomputation
                # included): inductor's fused kernels move ratio x the bytes in ratio x the launches.
                bytes_ratio, launch_ratio = self.compiled.ratio(pass_)
                kind = "elementwise (compiled blocks)"
                nbytes *= bytes_ratio
                launches = launch_ratio
        seconds = max(flops / (ceiling * 1e12) if ceiling else 0.0, nbytes / (HBM_GBS * 1e9))
        tally.flops += flops
        tally.bytes += nbytes
        tally.launches += launches
        tally.seconds += seconds
        tally.by_kind[kind] += seconds
        tally.flops_by_pass[pass_] += flops
        tally.seconds_by_pass[pass_] += seconds
        tally.seconds_by_pass_kind[f"{pass_} | {kind}"] += seconds
        if kind == "fused op":
            tally.fused_bytes += nbytes
            tally.fused_launches += 1
        return out


COMPILED_BLOCK_TRAFFIC = Path(__file__).resolve().parent / "compiled_block_traffic.json"
FAMILY_BLOCKS = {"sd3": ("sd3:JointTransformerBlock",),
                 "flux": ("flux:FluxTransformerBlock", "flux:FluxSingleTransformerBlock"),
                 "longcat": ("longcat:LongCatImageTransformerBlock", "longcat:LongCatImageSingleTransformerBlock")}


@dataclasses.dataclass
class CompiledBlocks:
    """Regional compile as the cost model sees it: per pass, how inductor's kernels scale a block's eager
    non-matmul bytes and launches (benchmarks/compiled_block_traffic.py, measured on one block of the family
    with inductor's CPU scheduler; the mean over the family's block kinds)."""

    no_grad: tuple[float, float]
    grad: tuple[float, float]

    def ratio(self, pass_: str) -> tuple[float, float]:
        return self.no_grad if pass_ == "forward no-grad" else self.grad

    @classmethod
    def load(cls, family: str, policy: str, path: Path = COMPILED_BLOCK_TRAFFIC, blocks: int = 0) -> CompiledBlocks:
        data = json.loads(path.read_text())["blocks"]
        keys = [k for k in FAMILY_BLOCKS.get(family, FAMILY_BLOCKS["sd3"]) if k in data] or list(data)[:1]

        def mean(entry: str) -> tuple[float, float]:
            rows = [data[k][entry] for k in keys]
            return (statistics.fmean(r["bytes_ratio"] for r in rows), statistics.fmean(r["launch_ratio"] for r in rows))

        from cdm_train.memory_plan import parse_plan

        mixed = parse_plan(policy)
        if mixed is None:
            return cls(no_grad=mean("none/no_grad"), grad=mean(f"{policy}/grad"))
        # A mixed plan (k of `blocks` blocks on the cheaper policy): the block-count-weighted mean of its two
        # policies' grad ratios. The CostMode reprices by pass, not by block, so this is an approximation; the
        # per-policy ratios differ by < 0.05 (SD3: none 0.63, selective 0.59, full 0.62).
        cheap, expensive, k = mixed
        (cb, cl), (eb, el) = mean(f"{cheap}/grad"), mean(f"{expensive}/grad")
        w = k / blocks if blocks else 0.0
        return cls(no_grad=mean("none/no_grad"), grad=(w * cb + (1 - w) * eb, w * cl + (1 - w) * el))


class ModelledSwitches:
    """Hooks that tell CostMode where it is: inside a transformer block (modelled compile), inside a linear
    layer that FP8 would replace (modelled FP8 linears: the GPU's selection, plan_fp8_linears on the bf16
    teacher). Nothing is compiled or quantised: the fake tensors run the eager ops, the mode reprices them."""

    def __init__(self, mode: CostMode, models, fp8_linear_teacher: bool):
        from cdm_train.blocks import network_blocks

        self.handles = []
        seen = set()
        for net in (models.student, models.fake, models.teacher):
            for block in network_blocks(net):
                if id(block) in seen:
                    continue
                seen.add(id(block))
                self._scope(block, mode, "block_depth")
        self.fp8_layers = []
        if fp8_linear_teacher:
            from cdm_kernels.fp8 import plan_fp8_linears

            teacher = getattr(models.teacher, "peft_model", models.teacher)
            eligible, _ = plan_fp8_linears(teacher)
            modules = dict(teacher.named_modules())
            for name in eligible:
                self._scope(modules[name], mode, "fp8_depth")
            self.fp8_layers = eligible

    def _scope(self, module, mode, attr):
        def enter(*_):
            setattr(mode, attr, getattr(mode, attr) + 1)

        def leave(*_):
            setattr(mode, attr, getattr(mode, attr) - 1)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self):
        for h in self.handles:
            h.remove()


def _called_from_optimizer() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if f"{Path('torch', 'optim')}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the H100/H200 runs it for bf16 without a mask: the flash kernel (fake tensors: its meta kernel)."""
    if attn_mask is not None or enable_gqa:
        raise ValueError("cost model: attention with a mask / GQA is not modelled (flash path only)")
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                              scale=scale)[0]


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def to_fake(obj, fake_mode, device: torch.device, depth: int = 0):
    """The models built on the meta device, as fake tensors on `device` (no memory either way).

    Modules get their parameters and buffers replaced in place (no Module.to: torch would swap_tensors, which the
    fake mode's weakrefs forbid); dicts of tensors (prompt banks, null conditions) and wrapper objects up to two
    levels deep are converted too."""
    convert = fake_mode.fake_tensor_converter.from_meta_and_device
    if isinstance(obj, torch.nn.Module):
        for mod in obj.modules():
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[k] = torch.nn.Parameter(convert(fake_mode, p.data, device),
                                                            requires_grad=p.requires_grad)
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = convert(fake_mode, b, device)
        return obj
    if isinstance(obj, torch.Tensor):
        return convert(fake_mode, obj, device) if obj.device.type == "meta" else obj
    if isinstance(obj, dict):
        return {k: to_fake(v, fake_mode, device, depth) for k, v in obj.items()}
    if depth < 2 and hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in vars(obj).items():
            if isinstance(v, (torch.Tensor, dict, torch.nn.Module)) or (hasattr(v, "__dict__") and depth < 1):
                setattr(obj, k, to_fake(v, fake_mode, device, depth + 1))
    return obj


@contextlib.contextmanager
def fused_ops_on_fake_tensors():
    """The triton backend "supports" the fake CPU tensors: its custom ops then run their fake (meta) kernels."""
    from cdm_kernels.backend import accepting_any_device

    with accepting_any_device("triton"):
        yield


@contextlib.contextmanager
def real_host_draws(length_from_host_generator: bool = False):
    """The iteration's host-side draws (schedule length, sigmas, trajectory indices, prompt rows) are real:
    they decide the shapes. They run outside the fake mode, on the same CPU generators as in training.

    length_from_host_generator: N drawn from the iteration's host generator, as the code of the 2026-12-04 GPU
    run did (before commit 9730274 made N the official Random((epoch, batch)) draw): the same iterations as
    the measured ones (their mean rollout NFE, 38 reference / 22 fast, comes out exactly)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    import cdm_train.draws as draws_mod

    def real(fn):
        def wrapper(*a, **k):
            with unset_fake_temporarily():
                return fn(*a, **k)
        return wrapper

    names = ("draw_schedule", "sample_trajectory_indices", "draw_num_steps", "official_prompt_rows")
    saved = {n: getattr(draws_mod, n) for n in names}
    for n, fn in saved.items():
        setattr(draws_mod, n, real(fn))
    if length_from_host_generator:
        draws_mod.draw_num_steps = lambda *a, **k: None  # draw_schedule then draws N from the host generator
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(draws_mod, n, fn)


@contextlib.contextmanager
def phase_marks(mode: CostMode):
    """The phases of bench_step.PhaseMarks: rollout | fake step (until student_losses) | student step."""
    import cdm_train.trainer as trainer_mod

    rollout_fn, student_fn = trainer_mod.rollout, trainer_mod.student_losses

    def rollout(*a, **k):
        mode.phase = "rollout"
        out = rollout_fn(*a, **k)
        mode.phase = "fake_step"
        return out

    def student_losses(*a, **k):
        mode.phase = "student_step"
        return student_fn(*a, **k)

    with _patched(trainer_mod, "rollout", rollout), _patched(trainer_mod, "student_losses", student_losses):
        yield


# ----------------------------------------------------------------------------------------------- one model

def config_overrides(preset: str, batch: int, layers: int | None, resolution: int) -> list[str]:
    """bench_step.build's overrides (student step every iteration), with bf16 autocast and a bf16 teacher
    as on the GPU, on the CPU device that the fake tensors pretend to be."""
    over = ["train.device=cpu", f"train.batch_size={batch}", "train.progress=false", "train.tensorboard=false",
            "optim.update_ratio=1", "train.out_dir=/nonexistent/cost-model", "train.precision=bf16",
            "model.teacher_dtype=bfloat16"]
    if preset in ("sd3-medium-shape", "flux-shape", "longcat-shape"):
        over.append(f"model.resolution={resolution}")
        if layers is not None:
            over.append(f"model.layers={layers}")
    return over


def run_mode(preset: str, mode_name: str, steps: list[int], batch: int, layers: int | None, resolution: int,
             extra: list[str] | None = None, length_from_host_generator: bool = False,
             official_plan: bool = False) -> dict:
    """Model `steps` iterations of one mode ("reference": every switch off, reference ops; "fast": the default
    switches with the fused (triton) ops). Returns per-iteration tallies, NFE and the peak."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cdm_train.config import make_config, reference_mode
    from cdm_train.models.build import build_models
    from cdm_train.trainer import Trainer

    cfg = make_config(preset, overrides=config_overrides(preset, batch, layers, resolution) + list(extra or []))
    if mode_name == "reference":
        reference_mode(cfg, official_memory_plan=official_plan)
    elif cfg.speed.backend == "auto":  # what auto picks on a GPU (an explicit --set speed.backend=... stays)
        cfg.speed.backend = "triton"
    model = "flux" if preset.startswith(("flux", "longcat")) else "sd3"
    family = preset.split("-")[0] if preset.startswith(("flux", "longcat")) else "sd3"
    # Compile and FP8 linears are modelled (ModelledSwitches), not run: dynamo cannot trace fake tensors under
    # a dispatch mode, and torchao does nothing on a CPU "device".
    if cfg.train.grad_checkpointing == "auto":  # what auto picks on the fake tensors' CPU "device"
        cfg.train.grad_checkpointing = "none"
    models = build_models(cfg, torch.device("meta"))  # real modules, meta tensors: shapes only
    from cdm_train.blocks import network_blocks

    compiled = (CompiledBlocks.load(family, cfg.train.grad_checkpointing, blocks=len(network_blocks(models.student)))
                if cfg.speed.compile_blocks else None)
    fp8_linears = cfg.speed.fp8_linear_teacher
    cfg.speed.compile_blocks = cfg.speed.fp8_linear_teacher = False
    cost = CostMode(attention_tflops(model), compiled)
    iterations = []
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fused_ops_on_fake_tensors())
        stack.enter_context(real_host_draws(length_from_host_generator))
        stack.enter_context(_patched(torch.nn.functional, "scaled_dot_product_attention", _flash_sdpa))
        stack.enter_context(fake)
        stack.enter_context(cost)
        stack.enter_context(phase_marks(cost))
        for name in ("student", "fake", "teacher", "adapter", "sample_cond"):
            setattr(models, name, to_fake(getattr(models, name), fake, torch.device("cpu")))
        cost._track([p for net in (models.student, models.fake, models.teacher) for p in net.parameters()])
        tr = Trainer(cfg, models=models)  # EMA copy and optimizers on the fake parameters, as in training
        switches = ModelledSwitches(cost, tr.models, fp8_linears)
        del models
        build_peak = cost.peak
        for k in steps:
            tr.step = k
            cost.tallies.clear()
            before = tr.counters["nfe_total"]
            cost.phase = "start"
            stats = tr.train_step()
            cost.phase = "idle"
            tallies = {p: cost.tallies.get(p, Tally()) for p in PHASES}
            # the draws (before the rollout) are counted with the rollout
            tallies["rollout"].add(cost.tallies.get("start", Tally()))
            iterations.append({"step": k, "nfe": tr.counters["nfe_total"] - before, "nfe_rollout": stats["nfe_rollout"],
                               "rollout_steps": stats["rollout_steps"], "tallies": tallies})
        params = sum(p.numel() for p in tr.models.student.parameters())
        switches.remove()
        del tr
    return {"mode": mode_name, "compiled": compiled is not None, "fp8_linears": len(switches.fp8_layers),
            "grad_checkpointing": cfg.train.grad_checkpointing, "iterations": iterations, "peak_gib": cost.peak / GiB,
            "peak_phase": cost.peak_phase, "build_gib": build_peak / GiB, "student_params": params}


def summarise(result: dict) -> dict:
    its = result["iterations"]
    per_it = [sum(it["tallies"][p].seconds for p in PHASES) * 1e3 for it in its]
    phase_ms = {p: statistics.median([it["tallies"][p].seconds * 1e3 for it in its]) for p in PHASES}
    total = Tally()
    for it in its:
        for p in PHASES:
            total.add(it["tallies"][p])
    n = len(its)
    return {
        "mode": result["mode"], "iterations": n, "predicted_median_ms": statistics.median(per_it),
        "predicted_mean_ms": statistics.fmean(per_it), "phase_ms": phase_ms,
        "nfe": statistics.fmean(it["nfe"] for it in its),
        "nfe_rollout": statistics.fmean(it["nfe_rollout"] for it in its),
        "tflop_per_it": total.flops / n / 1e12, "hbm_gb_per_it": total.bytes / n / 1e9,
        "fused_hbm_gb_per_it": total.fused_bytes / n / 1e9, "fused_launches_per_it": total.fused_launches / n,
        "launches_per_it": total.launches / n, "syncs_per_it": total.syncs / n,
        "ms_by_kind": {k: v / n * 1e3 for k, v in sorted(total.by_kind.items())},
        "tflop_by_pass": {k: v / n / 1e12 for k, v in sorted(total.flops_by_pass.items())},
        "ms_by_pass": {k: v / n * 1e3 for k, v in sorted(total.seconds_by_pass.items())},
        "ms_by_pass_kind": {k: v / n * 1e3 for k, v in sorted(total.seconds_by_pass_kind.items())},
        "phase_tflop": {p: statistics.fmean(it["tallies"][p].flops for it in its) / 1e12 for p in PHASES},
        "phase_launches": {p: statistics.fmean(it["tallies"][p].launches for it in its) for p in PHASES},
        "peak_gib": result["peak_gib"], "peak_phase": result["peak_phase"], "build_gib": result["build_gib"],
        "student_params": result["student_params"],
        "compiled": result.get("compiled", False), "fp8_linears": result.get("fp8_linears", 0),
        "grad_checkpointing": result.get("grad_checkpointing", "none"),
    }


# ----------------------------------------------------------------------------------------------- report

def parse_steps(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def table(rows: list[dict], title: str) -> list[str]:
    lines = [f"#### {title}", "",
             "| mode | NFE / it | predicted ms (median) | rollout / fake / student ms | TFLOP / it | "
             "TFLOP fwd / no-grad fwd / bwd | HBM GB / it (fused ops) | launches / it (fused) | host syncs / it | "
             "peak GiB (phase) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        ph = s["phase_ms"]
        tp = s["tflop_by_pass"]
        lines.append(
            f"| {s['mode']} | {s['nfe']:.1f} | **{s['predicted_median_ms']:.1f}** | "
            f"{ph['rollout']:.1f} / {ph['fake_step']:.1f} / {ph['student_step']:.1f} | {s['tflop_per_it']:.1f} | "
            f"{tp.get('forward', 0):.1f} / {tp.get('forward no-grad', 0):.1f} / {tp.get('backward', 0):.1f} | "
            f"{s['hbm_gb_per_it']:.0f} ({s['fused_hbm_gb_per_it']:.2f}) | {s['launches_per_it']:.0f} "
            f"({s['fused_launches_per_it']:.0f}) | {s['syncs_per_it']:.0f} | {s['peak_gib']:.1f} ({s['peak_phase']}) |")
    lines.append("")
    lines.append("Predicted ms by kind (per iteration): " + "; ".join(
        f"{s['mode']}: " + ", ".join(f"{k} {v:.1f}" for k, v in s["ms_by_kind"].items()) for s in rows))
    return lines


def scenario_lines(summary: dict[str, dict]) -> list[str]:
    """What-ifs on the fast mode's modelled time (per iteration, sum over the modelled iterations' mean)."""
    if "fast" not in summary:
        return []
    f = summary["fast"]
    pk = f["ms_by_pass_kind"]
    total = sum(pk.values())

    def part(pass_=None, kind=None):
        return sum(v for k, v in pk.items() if (pass_ is None or k.startswith(pass_ + " |"))
                   and (kind is None or k.endswith("| " + kind)))

    no_grad_mm = part("forward no-grad", "matmul")
    fp8_mm = no_grad_mm * (1 - MATMUL_TFLOPS / FP8_MATMUL_TFLOPS)
    ew = part(kind="elementwise / reduction / optimizer")
    rollout = f["phase_ms"]["rollout"] / max(1e-9, sum(f["phase_ms"].values())) * total
    lines = ["| what-if on the fast mode (modelled, mean per iteration) | ms saved | modelled ms "
             "| vs reference (mean) |",
             "|---|---|---|---|"]
    ref = summary.get("reference", {}).get("ms_by_pass_kind")
    ref_total = sum(ref.values()) if ref else None

    def row(name, saved):
        left = total - saved
        vs = f"{ref_total / left:.2f}x" if ref_total else "-"
        lines.append(f"| {name} | {saved:.1f} | {left:.1f} | {vs} |")

    row("fast mode as modelled", 0.0)
    row("FP8 matmuls in every no-grad forward (1,262 vs 762.6 TFLOP/s)", fp8_mm)
    row("elementwise / norm / optimizer traffic halved (fusion, e.g. compiled blocks)", ew / 2)
    row("both", fp8_mm + ew / 2)
    row("no rollout at all (the NFE floor: fake + student steps only)", rollout)
    row("both + no rollout", fp8_mm + ew / 2 + rollout * (1 - (fp8_mm + ew / 2) / total))
    return lines


def compare_lines(summary: dict[str, dict], measured: dict) -> list[str]:
    lines = ["| mode | measured median ms | predicted ms | predicted / measured | measured NFE | modelled NFE | "
             "measured rollout / fake / student ms | predicted rollout / fake / student ms |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("reference", "fast"):
        if mode not in summary or mode not in measured:
            continue
        s, m = summary[mode], measured[mode]
        ph = s["phase_ms"]
        mph = "/".join(f"{m[k]:.1f}" if m.get(k) is not None else "-" for k in
                       ("rollout_ms", "fake_step_ms", "student_step_ms"))
        lines.append(f"| {mode} | {m['median_ms']:.1f} | {s['predicted_median_ms']:.1f} | "
                     f"{s['predicted_median_ms'] / m['median_ms']:.2f} | {m.get('nfe', '-')} | {s['nfe']:.1f} | "
                     f"{mph} | "
                     f"{ph['rollout']:.1f}/{ph['fake_step']:.1f}/{ph['student_step']:.1f} |")
    if "reference" in summary and "fast" in summary:
        pr = summary["reference"]["predicted_median_ms"] / summary["fast"]["predicted_median_ms"]
        lines.append("")
        lines.append(f"predicted speed-up fast vs reference: {pr:.2f}x"
                     + (f"; measured {measured['reference']['median_ms'] / measured['fast']['median_ms']:.2f}x"
                        if "reference" in measured and "fast" in measured else ""))
    return lines


def measured_from_bench_json(path: str) -> tuple[dict, dict]:
    """(config, measured) from bench_step.py --json."""
    data = json.loads(Path(path).read_text())
    cfg = {"preset": data["preset"], "layers": data.get("layers"), "batch": data["batch"],
           "resolution": data.get("resolution", 1024), "steps": data.get("steps")}
    measured = {}
    for mode in ("reference", "fast"):
        if f"{mode}_ms" in data:
            ph = data.get("phases_ms", {}).get(mode, {})
            measured[mode] = {"median_ms": data[f"{mode}_ms"], "nfe": data.get(f"nfe_{mode}"),
                              "rollout_ms": ph.get("rollout"), "fake_step_ms": ph.get("fake_step"),
                              "student_step_ms": ph.get("student_step")}
    return cfg, measured


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=["tiny", "sd3-medium-shape", "flux-tiny", "flux-shape",
                                                      "longcat-tiny", "longcat-shape"],
                   help="one config (default: the RESULTS_cost_model.md set)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", default="3-10", help="iterations to model (bench_step's timed ones: 3-10)")
    p.add_argument("--full-depth-steps", default="3-6", help="iterations for the full-depth models of the default set")
    p.add_argument("--modes", default="reference,fast")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for both modes")
    p.add_argument("--compare", metavar="BENCH_JSON", help="bench_step.py --json output: model its config, print "
                   "measured vs predicted")
    p.add_argument("--json", default=None, help="write the summaries (predicted ms per mode / plan) to this file")
    p.add_argument("--plans", action="store_true", help="the memory-plan tables at full depth (SD3-Medium, Flux-dev, "
                   "LongCat-Image, 1024 px, official batch): reference vs fast per plan, predicted ms and peak GiB, "
                   "which plan fits an 80 GB H100 and a 141 GB H200")
    p.add_argument("--plan-models", default=",".join(PLAN_MODELS), help="with --plans: which presets")
    p.add_argument("--plans-from", metavar="JSON", help="print the plan tables of an earlier --plans --json file")
    p.add_argument("--mixed-from", metavar="JSON", help="the mixed checkpointing plans (first k blocks on a cheaper "
                   "policy) chosen for each GPU from the pure rows of an earlier --plans --json file, run for the "
                   "--plan-models found there and added to their tables (--json writes the merged file)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("reference", "fast") for m in modes):
        print("cost_model: --modes takes reference and/or fast", file=sys.stderr)
        return 2
    try:
        steps = parse_steps(args.steps)
    except ValueError:
        print(f"cost_model: --steps {args.steps!r}: use A-B or a comma list", file=sys.stderr)
        return 2
    if args.plans_from:
        for item in json.loads(Path(args.plans_from).read_text()):
            print("\n".join(["", *plan_lines(item["preset"], item["batch"], item["rows"], item["steps"])]))
        return 0
    if args.mixed_from:
        items = json.loads(Path(args.mixed_from).read_text())
        wanted = {m.strip() for m in args.plan_models.split(",") if m.strip()}
        for item in items:
            if item["preset"] not in wanted:
                continue
            pure = [r for r in item["rows"] if " mixed " not in r["plan"]]  # a rerun replaces earlier mixed rows
            earlier = [r for r in item["rows"] if " mixed " in r["plan"]] if not args.set else []
            item["rows"] = pure + mixed_rows(item["preset"], item["batch"], item["steps"], pure, args.resolution,
                                             args.set, earlier)
            item["predicted_ms"] = {r["plan"]: r["predicted_median_ms"] for r in item["rows"]}
            item["peak_gib"] = {r["plan"]: r["peak_gib"] for r in item["rows"]}
            print("\n".join(["", *plan_lines(item["preset"], item["batch"], item["rows"], item["steps"])]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(items, indent=1, default=float))
        return 0
    if args.plans:
        out = []
        its = parse_steps(args.full_depth_steps)
        for preset in [m.strip() for m in args.plan_models.split(",") if m.strip()]:
            if preset not in PLAN_MODELS:
                print(f"cost_model: --plan-models: {preset!r} is not one of {', '.join(PLAN_MODELS)}", file=sys.stderr)
                return 2
            rows = plan_rows(preset, PLAN_MODELS[preset], its, args.resolution, args.set)
            print("\n".join(["", *plan_lines(preset, PLAN_MODELS[preset], rows, its)]), flush=True)
            out.append({"figure": "cost_model_plans", "preset": preset, "batch": PLAN_MODELS[preset], "steps": its,
                        "predicted_ms": {r["plan"]: r["predicted_median_ms"] for r in rows},
                        "peak_gib": {r["plan"]: r["peak_gib"] for r in rows}, "rows": rows})
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=float))
        return 0
    if args.compare:
        try:
            cfg, measured = measured_from_bench_json(args.compare)
        except (OSError, KeyError, ValueError) as exc:
            print(f"cost_model: --compare {args.compare!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        configs = [(cfg["preset"], cfg["batch"], cfg["layers"], cfg["resolution"], cfg["steps"] or steps, measured)]
    elif args.preset:
        configs = [(args.preset, args.batch, args.layers, args.resolution, steps,
                    MEASURED_BENCH_STEP if _is_measured_config(args, steps) else None)]
    else:
        mc = MEASURED_BENCH_STEP["config"]
        configs = [(mc["preset"], mc["batch"], mc["layers"], mc["resolution"], mc["steps"], MEASURED_BENCH_STEP),
                   ("sd3-medium-shape", 4, None, 1024, parse_steps(args.full_depth_steps), None),
                   ("flux-shape", 4, None, 1024, parse_steps(args.full_depth_steps), None)]
    out = []
    print(f"cost model, {datetime.date.today()}, torch {torch.__version__}; ceilings (H200, RESULTS_gpu.md): "
          f"matmul {MATMUL_TFLOPS} TFLOP/s, SDPA sd3 {attention_tflops('sd3'):.1f} / flux "
          f"{attention_tflops('flux'):.1f} TFLOP/s, HBM {HBM_GBS:.0f} GB/s")
    for preset, batch, layers, resolution, its, measured in configs:
        summary = {}
        for mode in modes:
            legacy = bool(measured and measured.get("config", {}).get("length_from_host_generator"))
            summary[mode] = summarise(run_mode(preset, mode, its, batch, layers, resolution, args.set, legacy))
        title = (f"{preset} {resolution} px, {layers if layers is not None else 'all'} layers, batch {batch}, "
                 f"iterations {its[0]}-{its[-1]}")
        print("\n".join(["", *table(list(summary.values()), title)]))
        computed = computed_memory(preset, batch, layers, resolution)
        if computed:
            pairs = [f"{m}: {summary[m]['peak_gib']:.1f} vs {computed[m]:.1f} GiB" for m in summary if m in computed]
            print("\npeak live memory, this model vs memory_distributed.bench_peak_gib (one trainer): "
                  + "; ".join(pairs))
        print("\n".join(["", *scenario_lines(summary)]))
        if measured:
            print("\n".join(["", "measured (RESULTS_gpu.md / bench_step JSON) vs predicted:",
                             *compare_lines(summary, measured)]))
        out.append({"figure": "cost_model", "preset": preset, "batch": batch, "layers": layers,
                    "resolution": resolution, "steps": its,
                    "summary": summary, "measured": measured, "computed_peak_gib": computed})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


# ------------------------------------------------------------------------------------- memory plans at full depth
# Usable memory of one GPU for a training process: the device's total as torch reports it (H100 80 GB: 79.1 GiB,
# H200: 139.8 GiB) less ~2 GiB for the CUDA context, cuBLAS / cuDNN workspaces and allocator fragmentation.
GPU_GIB = {"H100 80GB": 77.0, "H200 141GB": 137.0}
PLAN_MODELS = {  # preset: official per-GPU batch (byliutao/cdm config/config.py: SD3 16, LongCat 8; Flux: as SD3)
    "sd3-medium-shape": 16, "flux-shape": 16, "longcat-shape": 8}
PLANS = [  # (row name, mode, extra overrides)
    ("reference (official: full checkpointing, eager)", "reference", []),
    ("fast, eager, no checkpointing", "fast", ["train.grad_checkpointing=none"]),
    ("fast, eager, full checkpointing", "fast", ["train.grad_checkpointing=full"]),
    ("fast + compiled blocks, no checkpointing", "fast", ["speed.compile_blocks=true"]),
    ("fast + compiled blocks, selective checkpointing", "fast",
     ["speed.compile_blocks=true", "train.grad_checkpointing=selective"]),
    ("fast + compiled blocks, full checkpointing", "fast",
     ["speed.compile_blocks=true", "train.grad_checkpointing=full"]),
    ("fast + compiled blocks + FP8 teacher linears, selective", "fast",
     ["speed.compile_blocks=true", "train.grad_checkpointing=selective", "speed.fp8_linear_teacher=true"]),
    ("fast + compiled blocks + FP8 teacher linears, full", "fast",
     ["speed.compile_blocks=true", "train.grad_checkpointing=full", "speed.fp8_linear_teacher=true"]),
]


def plan_rows(preset: str, batch: int, steps: list[int], resolution: int = 1024, extra: list[str] | None = None):
    """Every plan of PLANS for one model at full depth: a summary per plan (+ its memory split)."""
    rows = []
    for name, mode, over in PLANS:
        result = run_mode(preset, mode, steps, batch, None, resolution, over + list(extra or []),
                          official_plan=True)
        summary = summarise(result)
        summary["plan"] = name
        rows.append(summary)
        print(f"  modelled: {preset} | {name}: {summary['predicted_median_ms']:.0f} ms, peak "
              f"{summary['peak_gib']:.1f} GiB", file=sys.stderr, flush=True)
    return rows


# The pure rows whose per-GPU peaks (FSDP2 x 8) a mixed plan interpolates between: compiled blocks + FP8 teacher
# linears (the fastest configuration; FP8 teacher linears do not change the activations), and compiled blocks
# without checkpointing (there is no FP8 row without checkpointing; same activations).
MIXED_BASE = {"none": "fast + compiled blocks, no checkpointing",
              "selective": "fast + compiled blocks + FP8 teacher linears, selective",
              "full": "fast + compiled blocks + FP8 teacher linears, full"}


# Device memory as torch reports it (total_memory), what train.grad_checkpointing=auto plans against.
GPU_TOTAL_GIB = {"H100 80GB": 79.1, "H200 141GB": 139.8}


def plan_shape(preset: str, batch: int) -> tuple[int, int, int]:
    """(blocks, tokens, width) of the student at full depth, as memory_plan.activation_shape sees it (a meta-device
    build: shapes only)."""
    from cdm_train.config import make_config
    from cdm_train.memory_plan import activation_shape
    from cdm_train.models.build import build_models

    cfg = make_config(preset, overrides=config_overrides(preset, batch, None, 1024))
    return activation_shape(build_models(cfg, torch.device("meta")), batch)


def plan_blocks(preset: str) -> int:
    """Repeated blocks of the student at full depth."""
    return plan_shape(preset, 1)[0]


def auto_plan_for(preset: str, batch: int, rows: list[dict], gpu: str) -> str:
    """What train.grad_checkpointing=auto itself picks on `gpu` under FSDP2 x 8 (memory_plan.choose_plan_from:
    its own activation constants, the largest of three models, and 10% headroom of the device's total), with this
    table's model state (model_state_gib of the full-checkpointing row) sharded over 8."""
    from cdm_train.memory_plan import choose_plan_from

    blocks, tokens, width = plan_shape(preset, batch)
    state = model_state_gib({r["plan"]: r for r in rows}[MIXED_BASE["full"]]) / 8 * GiB
    return choose_plan_from(state, blocks, batch * tokens * width, GPU_TOTAL_GIB[gpu] * GiB).plan


def mixed_plan_for(rows: list[dict], blocks: int, gpu: str) -> tuple[str, float] | None:
    """The mixed plan (FSDP2 x 8) that memory_plan's rule picks on `gpu` from this table's measured pure rows:
    for each pair of policies the largest k whose per-GPU peak, interpolated linearly per block between the two
    pure rows (peak(k) = peak[expensive] + k / blocks x (peak[cheap] - peak[expensive])), stays under the usable
    memory (GPU_GIB, the criterion of the table's "fits"), then the least modelled recompute
    (memory_plan.recompute_cost). Returns (plan, interpolated per-GPU GiB), or None when a pure plan is as good
    (no mixed plan fits, or a pure plan that fits has the least recompute)."""
    from cdm_train.memory_plan import PAIRS, recompute_cost

    by_name = {r["plan"]: r for r in rows}
    if any(name not in by_name for name in MIXED_BASE.values()):
        return None
    peak = {policy: fsdp_gib(by_name[name]) for policy, name in MIXED_BASE.items()}
    usable = GPU_GIB[gpu]
    candidates = {p: peak[p] for p in peak if peak[p] <= usable}
    for cheap, expensive in PAIRS:
        per_block = (peak[cheap] - peak[expensive]) / blocks
        if peak[expensive] > usable or per_block <= 0:
            continue
        k = min(blocks, int((usable - peak[expensive]) / per_block))
        if 0 < k < blocks:
            candidates[f"{cheap}+{expensive}:{k}"] = peak[expensive] + k * per_block
    if not candidates:
        return None
    best = min(candidates, key=lambda plan: recompute_cost(plan, blocks))
    return None if "+" not in best else (best, candidates[best])


def mixed_rows(preset: str, batch: int, steps: list[int], rows: list[dict], resolution: int = 1024,
               extra: list[str] | None = None, earlier: list[dict] | None = None) -> list[dict]:
    """The mixed plans chosen for each GPU of GPU_GIB (mixed_plan_for), run for real on the fake tensors like
    every other row (the checkpointing per block is installed by the trainer: train.grad_checkpointing=<plan>)."""
    blocks = plan_blocks(preset)
    chosen: dict[str, list[str]] = {}
    for gpu in GPU_GIB:
        pick = mixed_plan_for(rows, blocks, gpu)
        if pick is not None:
            chosen.setdefault(pick[0], []).append(f"{gpu} ({pick[1]:.0f} GiB interpolated)")
            print(f"  mixed plan for {preset}, FSDP2 x 8, {gpu}: {pick[0]} (per-GPU peak interpolated from the pure "
                  f"rows: {pick[1]:.1f} GiB)", file=sys.stderr, flush=True)
    for gpu in GPU_GIB:  # and what auto picks with its own, more cautious estimate (when it differs)
        plan = auto_plan_for(preset, batch, rows, gpu)
        if "+" in plan:
            chosen.setdefault(plan, []).append(f"train.grad_checkpointing=auto on {gpu}")
            print(f"  auto's plan for {preset}, FSDP2 x 8, {gpu}: {plan}", file=sys.stderr, flush=True)
    out = []
    done = {r["grad_checkpointing"]: r for r in (earlier or [])}
    for plan, gpus in chosen.items():
        name = f"fast + compiled blocks + FP8 teacher linears, mixed {plan} (chosen for {', '.join(gpus)})"
        if plan in done:  # run by an earlier --mixed-from on the same pure rows: relabelled, not rerun
            out.append({**done[plan], "plan": name})
            continue
        over = ["speed.compile_blocks=true", f"train.grad_checkpointing={plan}", "speed.fp8_linear_teacher=true"]
        summary = summarise(run_mode(preset, "fast", steps, batch, None, resolution, over + list(extra or []),
                                     official_plan=True))
        summary["plan"] = name
        out.append(summary)
        print(f"  modelled: {preset} | {name}: {summary['predicted_median_ms']:.0f} ms, peak "
              f"{summary['peak_gib']:.1f} GiB", file=sys.stderr, flush=True)
    return out


def model_state_gib(s: dict) -> float:
    """Networks, EMA, AdamW states and one network's gradients: the build's live tensors (student, fake, teacher,
    EMA) plus what the first optimizer steps allocate, 8 B (AdamW's two fp32 states) for every trainable parameter
    of student and fake and 4 B (fp32 gradients) for the student's (the fake's are freed before the student step,
    where the peak is). Full networks: the fake has the student's parameter count."""
    return s["build_gib"] + (8 * 2 + 4) * s["student_params"] / GiB


def fsdp_gib(s: dict, world: int = 8) -> float:
    """Per-GPU peak with FSDP2 over `world` GPUs at the same per-GPU batch: the model state sharded, the
    activations (the rest of the one-GPU peak) not. One unsharded block's parameters in flight per network are
    left out (under 2% of the model state for 24+ blocks)."""
    state = model_state_gib(s)
    return state / world + max(0.0, s["peak_gib"] - state)


def _fits(gib: float, gpu: str) -> str:
    usable = GPU_GIB[gpu]
    return "no" if gib > usable else "tight" if gib > 0.9 * usable else "yes"


def plan_lines(preset: str, batch: int, rows: list[dict], steps: list[int]) -> list[str]:
    ref = rows[0]["predicted_median_ms"]
    gpus = list(GPU_GIB)
    lines = [f"#### {preset} at full depth, 1024 px, batch {batch} per GPU (official), iteration"
             f"{'s' if len(steps) > 1 else ''} {steps[0]}{'-' + str(steps[-1]) if len(steps) > 1 else ''}", "",
             "| plan | predicted ms / it | vs reference | attention / elementwise / matmul ms | peak GiB, one GPU "
             "(model state + activations) | " + " | ".join(f"one {g}" for g in gpus)
             + " | per GPU, FSDP2 x 8 | " + " | ".join(f"FSDP2 x 8, {g}" for g in gpus) + " |",
             "|---|---|---|---|---|" + "---|" * len(gpus) + "---|" + "---|" * len(gpus)]
    for s in rows:
        peak, fs, state = s["peak_gib"], fsdp_gib(s), model_state_gib(s)
        k = s["ms_by_kind"]
        ew = sum(v for name, v in k.items() if name.startswith("elementwise"))
        mm = sum(v for name, v in k.items() if name.startswith("matmul"))
        lines.append(f"| {s['plan']} | {s['predicted_median_ms']:.0f} | {ref / s['predicted_median_ms']:.2f}x | "
                     f"{k.get('attention', 0):.0f} / {ew:.0f} / {mm:.0f} | "
                     f"{peak:.0f} ({state:.0f} + {max(0.0, peak - state):.0f}) | "
                     + " | ".join(_fits(peak, g) for g in gpus)
                     + f" | {fs:.0f} | " + " | ".join(_fits(fs, g) for g in gpus) + " |")
    lines.append("")
    model = "flux" if preset.startswith(("flux", "longcat")) else "sd3"
    scale = attention_tflops(model) / CUDNN_PUBLISHED_TFLOPS[model]
    for g in gpus:
        fits = [s for s in rows[1:] if fsdp_gib(s) <= GPU_GIB[g]]
        best = min(fits, key=lambda s: s["predicted_median_ms"], default=None)
        if best is None:
            lines.append(f"- {g}, FSDP2 x 8: no plan fits.")
            continue
        # what-if: the attention of that plan at cuDNN's published speed (the reference keeps its SDPA)
        att = best["ms_by_kind"].get("attention", 0.0)
        with_cudnn = best["predicted_median_ms"] - att * (1 - scale)
        lines.append(f"- {g}, FSDP2 x 8: fastest plan that fits: **{best['plan']}**, "
                     f"{ref / best['predicted_median_ms']:.2f}x the reference; with its attention at cuDNN's published "
                     f"speed ({CUDNN_PUBLISHED_TFLOPS[model]:.0f} vs {attention_tflops(model):.0f} TFLOP/s, "
                     f"speed.attention_backend=auto on sm_90, unmeasured): {ref / with_cudnn:.2f}x.")
    return lines


def computed_memory(preset: str, batch: int, layers: int | None, resolution: int) -> dict | None:
    """benchmarks/memory_distributed.py's single-GPU estimate for the same config (SD3 only)."""
    if preset != "sd3-medium-shape":
        return None
    from memory_distributed import BENCH_GRAD_FORWARDS, bench_peak_gib, sd3_medium_counts

    c = sd3_medium_counts(resolution, layers)
    return {m: bench_peak_gib(c, batch, BENCH_GRAD_FORWARDS[m])["total"] for m in ("reference", "fast")}


def _is_measured_config(args, steps) -> bool:
    c = MEASURED_BENCH_STEP["config"]
    return (args.preset, args.layers, args.batch, args.resolution, steps) == (c["preset"], c["layers"], c["batch"],
                                                                             c["resolution"], c["steps"])


if __name__ == "__main__":
    sys.exit(main())
