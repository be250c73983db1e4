"""The model-level accelerations (cdm_train/accelerations.py): order, activation checkpointing, regional compile of
every network (bounded recompiles, no graph breaks, equal losses, LoRA), the fused AdamW, the FP8-linear emulation."""

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import cdm_train.accelerations as acc
from cdm_kernels.graphs import checkpoint_blocks, checkpoint_policy, find_blocks, is_compiled
from cdm_train.config import make_config
from cdm_train.errors import ConfigError
from cdm_train.trainer import Trainer, adamw_options

from .helpers import tiny_config

LOSS_KEYS = ("loss_fake", "loss_ca", "loss_dm", "loss_cdm", "loss_student")


def _losses(tr: Trainer, steps: int) -> list[dict[str, float]]:
    return [loss for k in range(steps) for loss in _losses_at(tr, k)]


def _assert_losses_close(a, b, rtol=1e-4):
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    for x, y in zip(a, b):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=1e-7), (key, x[key], y[key])


# ------------------------------------------------------------------------------------------------ the order
def test_accelerations_run_once_in_the_documented_order(tmp_path, monkeypatch):
    calls = []
    for name, step in (("apply_attention", "attention"), ("apply_fp8_linears", "fp8 linears"),
                       ("apply_checkpointing", "checkpointing"), ("apply_compile", "compile"),
                       ("apply_graph_switches", "graphs")):
        original = getattr(acc, name)
        monkeypatch.setattr(acc, name, lambda *a, _o=original, _s=step, **k: (calls.append(_s), _o(*a, **k))[1])
    Trainer(tiny_config(tmp_path, "train.grad_checkpointing=full"))
    assert calls == ["attention", "fp8 linears", "checkpointing", "compile", "graphs"]
    assert [c for c in acc.ORDER if c in calls] == calls  # the order the docstring and ORDER state


def test_applied_lines_say_what_was_done(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cdm_train"):
        tr = Trainer(tiny_config(tmp_path, "train.grad_checkpointing=selective", "speed.compile_blocks=true",
                                 "speed.compile_backend=eager"))
    steps = tr.accelerations.steps
    assert steps["checkpointing"] == ["student: selective (2 blocks)", "fake: selective (2 blocks)"]
    assert [line.split(":")[0] for line in steps["compile"]] == ["student", "fake", "teacher", "ema"]
    assert "accelerations 3. checkpointing: student: selective" in caplog.text


# ------------------------------------------------------------------------------------------- checkpointing
class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts matmuls and other ops dispatched while autograd runs a backward node."""

    def __init__(self):
        super().__init__()
        self.backward_mm = 0
        self.backward_other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_autograd_node() is not None:
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.backward_mm += 1
            else:
                self.backward_other += 1
        return func(*args, **(kwargs or {}))


def _block_and_inputs():
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    block = JointTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16, context_pre_only=False)
    x = torch.randn(2, 9, 32, requires_grad=True)
    ctx = torch.randn(2, 5, 32, requires_grad=True)
    temb = torch.randn(2, 32)
    return block, (x, ctx, temb)


def _backward_counts(policy: str):
    block, (x, ctx, temb) = _block_and_inputs()
    checkpoint_blocks([block], policy)
    counter = _OpCounter()
    with counter:
        enc, hid = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
        (hid.square().sum() + enc.square().sum()).backward()
    grads = [x.grad.clone(), ctx.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    return counter, grads


def test_checkpoint_policies_recompute_what_they_say_and_give_the_same_gradients():
    none, g_none = _backward_counts("none")
    full, g_full = _backward_counts("full")
    selective, g_sel = _backward_counts("selective")
    # full: the block's forward runs again inside backward (its matmuls with it)
    assert full.backward_mm > none.backward_mm
    # selective: matmul outputs are kept (no matmul recomputed), the elementwise ops are recomputed
    assert selective.backward_mm == none.backward_mm
    assert selective.backward_other > none.backward_other
    for a, b, c in zip(g_none, g_full, g_sel):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_checkpointing_keeps_names_copies_and_can_be_removed():
    block, (x, ctx, temb) = _block_and_inputs()
    keys = list(block.state_dict())
    cls = type(block)
    checkpoint_blocks([block], "full")
    assert list(block.state_dict()) == keys and isinstance(block, cls) and type(block).__name__ == cls.__name__
    assert checkpoint_policy(copy.deepcopy(block)) == "full"
    checkpoint_blocks([block], "none")
    assert type(block) is cls and checkpoint_policy(block) == "none"
    with pytest.raises(ValueError, match="policy"):
        checkpoint_blocks([block], "some")
    with torch.no_grad():  # no gradient: the block runs unchanged
        checkpoint_blocks([block], "selective")
        block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)


def test_trainer_checkpoints_student_and_fake_not_the_teacher(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "train.grad_checkpointing=full"))
    m = tr.models
    assert {checkpoint_policy(b) for b in find_blocks(m.student)} == {"full"}
    assert {checkpoint_policy(b) for b in find_blocks(m.fake)} == {"full"}
    assert {checkpoint_policy(b) for b in find_blocks(m.teacher)} == {"none"}
    assert {checkpoint_policy(b) for b in find_blocks(tr.ema.module)} == {"none"}  # the EMA is never trained


def test_grad_checkpointing_config_values():
    assert make_config("tiny", overrides=["train.grad_checkpointing=true"]).train.grad_checkpointing == "full"
    assert make_config("tiny", overrides=["train.grad_checkpointing=false"]).train.grad_checkpointing == "none"
    with pytest.raises(ConfigError, match="train.grad_checkpointing"):
        make_config("tiny", overrides=["train.grad_checkpointing=partial"])
    with pytest.raises(ConfigError, match="speed.compile_backend"):
        make_config("tiny", overrides=["speed.compile_backend=tvm"])


def test_compile_student_is_read_as_compile_blocks(caplog):
    with caplog.at_level(logging.WARNING, logger="cdm_train"):
        cfg = make_config("tiny", overrides=["speed.compile_student=true"])
    assert cfg.speed.compile_blocks is True
    assert "speed.compile_student is now speed.compile_blocks" in caplog.text


# ------------------------------------------------------------------------------------------------- compile
def _compiled_run(tmp_path, steps, *overrides, backend="aot_eager"):
    torch._dynamo.reset()
    counters.clear()
    graphs_after = []
    tr = Trainer(tiny_config(tmp_path, "schedule.max_steps=28", "speed.compile_blocks=true",
                             f"speed.compile_backend={backend}", *overrides))
    losses = []
    for k in range(steps):
        losses += _losses_at(tr, k)
        graphs_after.append(counters["stats"]["unique_graphs"])
    return tr, losses, graphs_after, dict(counters["graph_break"])


def _losses_at(tr, k):
    tr.step = k
    stats = tr.train_step()
    return [{key: float(stats[key]) for key in LOSS_KEYS if key in stats}]


# Distinct graphs per block class: 5 (network, grad mode) passes (student rollout / student step, fake scoring /
# fake step, teacher) x 2 (static, then dynamic batch) x 2 (SD3's last block has context_pre_only).
COMPILE_BOUND = 5 * 2 * 2


@pytest.mark.slow
def test_compiled_blocks_bounded_recompiles_over_20_official_draws(tmp_path):
    """20 iterations of the official schedule draw (Nmax 28, early-exit rollout: the batch size changes every
    step): compiles stay under the bound, stop after the first student step, no graph break, same losses."""
    tr, losses, graphs, breaks = _compiled_run(tmp_path / "c", 20)
    assert breaks == {}
    assert 0 < graphs[-1] <= COMPILE_BOUND
    assert graphs[2:] == [graphs[1]] * 18  # nothing new after iteration 1 (the first student step)
    assert all(is_compiled(b) for net in (tr.models.student, tr.models.fake, tr.models.teacher, tr.ema.module)
               for b in find_blocks(net))
    eager = Trainer(tiny_config(tmp_path / "e", "schedule.max_steps=28"))
    _assert_losses_close(losses, _losses(eager, 20))


@pytest.mark.slow
def test_compiled_lora_switches_adapters_without_recompiling(tmp_path):
    lora = ["lora.student=true", "lora.fake=true", "lora.rank=4", "train.grad_checkpointing=full"]
    tr, losses, graphs, breaks = _compiled_run(tmp_path / "c", 4, *lora)
    assert breaks == {}
    assert graphs[2:] == [graphs[1]] * 2  # every call after warm-up switches adapters; no graph is added
    assert graphs[-1] <= COMPILE_BOUND
    blocks = acc.network_blocks(tr.models.student)
    assert blocks and all(is_compiled(b) for b in blocks)
    assert acc.network_blocks(tr.models.teacher)[0] is blocks[0]  # one shared base, compiled once
    eager = Trainer(tiny_config(tmp_path / "e", "schedule.max_steps=28", *lora))
    _assert_losses_close(losses, _losses(eager, 4))


@pytest.mark.slow
def test_cli_trains_with_inductor_compiled_blocks_on_cpu(tmp_path):
    """The issue's acceptance run: cdm-train train --preset tiny --set speed.compile_blocks=true --device cpu
    (inductor C++ backend), here with selective checkpointing, against the same run eager."""
    import json

    from cdm_train.cli import main

    def run(out, *extra):
        # 2 steps, a student step in each (update_ratio 1): every pass and a second batch size get compiled.
        args = ["train", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--out", str(out), "--no-progress",
                "--set", "train.tensorboard=false", "--set", "train.log_every=1", "--set", "optim.update_ratio=1",
                "--set", "train.grad_checkpointing=selective", *extra]
        assert main(args) == 0
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    torch._dynamo.reset()
    counters.clear()
    compiled = run(tmp_path / "c", "--set", "speed.compile_blocks=true")
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    eager = run(tmp_path / "e")
    for a, b in zip(compiled, eager):
        for key in ("loss_fake", "loss_student"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)


# ------------------------------------------------------------------------------------------------ optimizer
def test_fused_adamw_on_cuda_only_and_equal_to_foreach():
    cfg = make_config("tiny")
    assert adamw_options(cfg, torch.device("cuda", 0))["fused"] is True
    assert adamw_options(cfg, torch.device("cpu")) == {**adamw_options(cfg, torch.device("cpu")), "foreach": True}
    cfg.train.parallel = "fsdp"
    assert "fused" not in adamw_options(cfg, torch.device("cuda", 0))
    # The fused kernel (CPU implementation here) and foreach give the same update to rounding.
    torch.manual_seed(0)
    params = [torch.randn(37, 11), torch.randn(5), torch.randn(3, 7, 2)]
    results = []
    for impl in ({"fused": True}, {"foreach": True}):
        ps = [p.clone().requires_grad_(True) for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8, **impl)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append([p.detach() for p in ps])
    assert not torch.allclose(results[0][0], params[0])  # the steps moved the weights
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ FP8 emulation
def test_fp8_rounding_is_e4m3_round_to_nearest_even_per_row():
    from cdm_kernels.fp8 import fake_quantize_rows_e4m3

    # Row scale = amax / 448, so 448 stays exact; 1.0625 lies half-way between 1.0 and 1.125 (e4m3 step 1/8 at
    # 1): ties go to the even mantissa (1.0); 1.1875 between 1.125 (odd) and 1.25 (even) goes to 1.25.
    t = torch.tensor([[1.0625, 1.1875, 448.0], [-3.0, 0.0, 1.5]], dtype=torch.float64)
    out = fake_quantize_rows_e4m3(t)
    assert out[0].tolist() == [1.0, 1.25, 448.0]
    assert out.dtype == torch.float64
    x = torch.randn(64, 256, dtype=torch.float64) * torch.logspace(-2, 2, 64, dtype=torch.float64)[:, None]
    q = fake_quantize_rows_e4m3(x)
    rel = ((q - x).abs() / x.abs().amax(dim=-1, keepdim=True)).max()
    assert 0 < rel <= 2.0**-4  # e4m3: 3 mantissa bits, relative error at most half a step of the row's scale
    sqnr = 10 * torch.log10(x.square().sum() / (q - x).square().sum())
    assert 25 < sqnr < 40  # the rounding really happened, and only at fp8 precision
    assert torch.isnan(fake_quantize_rows_e4m3(torch.tensor([[1.0, float("nan")]]))).any()  # NaN is not hidden


def test_fp8_linear_emulation_converts_the_planned_layers_only(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "speed.fp8_linear_teacher=true", "speed.fp8_linear_emulate=true"))
    teacher = tr.models.teacher
    from cdm_kernels.fp8 import _EmulatedFP8Linear

    converted = {n for n, m in teacher.named_modules() if isinstance(m.__dict__.get("forward"), _EmulatedFP8Linear)}
    assert converted and all(".norm" not in n and "time_text_embed" not in n for n in converted)
    assert any(n.endswith("attn.to_q") for n in converted) and any(n.endswith("ff.net.2") for n in converted)
    for net in (tr.models.student, tr.models.fake):  # trained networks untouched
        assert not any(isinstance(m.__dict__.get("forward"), _EmulatedFP8Linear) for m in net.modules())
    assert "emulated row-wise float8" in tr.accelerations.steps["fp8 linears"][0]
    # The converted layer computes F.linear of the rounded operands
    name = sorted(converted)[0]
    layer = dict(teacher.named_modules())[name]
    x = torch.randn(3, 5, layer.in_features)
    from cdm_kernels.fp8 import fake_quantize_rows_e4m3

    expect = torch.nn.functional.linear(fake_quantize_rows_e4m3(x), fake_quantize_rows_e4m3(layer.weight), layer.bias)
    torch.testing.assert_close(layer(x), expect)
    assert not torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="speed.fp8_linear_emulate"):
        make_config("tiny", overrides=["speed.fp8_linear_emulate=true"])


def test_selective_checkpointing_under_bf16_autocast_matches_no_checkpointing(tmp_path):
    """Several student forwards in one autocast region (CA/DM, then CDM): autocast's weight-cast cache would let
    the forward skip casts that the selective recomputation replays, and backward would fail. Same losses too."""
    run = ["train.precision=bf16", "optim.update_ratio=1", "schedule.max_steps=3"]
    plain = _losses(Trainer(tiny_config(tmp_path / "n", *run)), 2)
    selective = _losses(Trainer(tiny_config(tmp_path / "s", *run, "train.grad_checkpointing=selective")), 2)
    _assert_losses_close(selective, plain, rtol=1e-6)


# ------------------------------------------------------------------------------------------- memory plan
def test_auto_checkpointing_picks_the_fastest_plan_that_fits(tmp_path):
    from cdm_train.memory_plan import ACTIVATION_BYTES, activation_shape, choose_plan, model_state_bytes

    tr = Trainer(tiny_config(tmp_path))  # the default (auto) on a CPU: no checkpointing
    assert tr.cfg.train.grad_checkpointing == "auto" and tr.accelerations.checkpointing == "none"
    m, batch = tr.models, 4
    blocks, tokens, width = activation_shape(m, batch)
    assert (blocks, width) == (2, 16) and tokens == 16 + 6  # 8x8 latent in 2x2 patches + the tiny text tokens
    state = model_state_bytes(m, tr.ema)
    params = sum(p.numel() * 4 for net in (m.student, m.fake, m.teacher, tr.ema.module) for p in net.parameters())
    trainable = sum(p.numel() for p in m.student.parameters())
    assert state == params + 8 * 2 * trainable + 4 * trainable
    act = {plan: batch * blocks * tokens * width * k for plan, k in ACTIVATION_BYTES.items()}
    gpu = torch.device("cuda", 0)

    def pick(total):
        return choose_plan(m, tr.ema, gpu, batch, total_bytes=int(total)).plan

    # a device just big enough (with the 10% headroom) for each plan gets that plan
    assert pick((state + act["none"]) / 0.9 + 1) == "none"
    assert pick((state + act["selective"]) / 0.9 + 1) == "selective"
    assert pick((state + act["full"]) / 0.9 + 1) == "full"
    assert pick(state / 2) == "full"  # nothing fits: the official plan, with a warning
    # FSDP2 shards the model state
    sharded = choose_plan(m, tr.ema, gpu, batch, world=8, sharded=True, total_bytes=int((state + act["none"]) / 0.9))
    assert sharded.plan == "none" and sharded.estimates_gib["none"] < (state + act["none"]) / 2**30


def test_compiled_blocks_trace_the_8bit_attention_processors(tmp_path):
    """Step 1 before step 4: the compiled blocks run the patched (here: emulated FP8) attention of the no-grad
    passes, without a graph break, with the losses of the same run uncompiled."""
    run = ["speed.fp8_attention_teacher=true", "speed.fp8_attention_fake=true", "speed.fp8_attention_rollout=true",
           "speed.fp8_attention_emulate=true", "speed.attention_8bit=fp8", "optim.update_ratio=1",
           "schedule.max_steps=3"]
    eager = _losses(Trainer(tiny_config(tmp_path / "e", *run)), 2)
    torch._dynamo.reset()
    counters.clear()
    tr = Trainer(tiny_config(tmp_path / "c", *run, "speed.compile_blocks=true", "speed.compile_backend=aot_eager"))
    assert any("fp8" in line for line in tr.accelerations.steps["attention"])
    compiled = _losses(tr, 2)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    _assert_losses_close(compiled, eager, rtol=1e-5)


def test_eval_sampler_compiles_the_blocks_on_cuda_when_the_run_did():
    from cdm_train.accelerations import compile_for_sampling, network_blocks

    def fresh():
        from cdm_train.models.build import build_teacher

        return build_teacher(make_config("tiny", overrides=["train.device=cpu"]), torch.device("cpu"))[0]

    on = make_config("tiny", overrides=["speed.compile_blocks=true", "speed.compile_backend=eager"])
    off = make_config("tiny")
    model = fresh()
    assert compile_for_sampling(on, model, torch.device("cpu")) == 0  # CPU: never (compile would not repay)
    assert compile_for_sampling(off, model, torch.device("cuda", 0)) == 0  # the run did not compile
    assert not any(is_compiled(b) for b in network_blocks(model))
    assert compile_for_sampling(on, model, torch.device("cuda", 0)) == 2  # lazily: nothing runs on the device here
    assert all(is_compiled(b) for b in network_blocks(model))
