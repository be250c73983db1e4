"""LoRA students and fake teachers on the frozen teacher's weights (cdm_train/lora.py)."""

import pytest
import torch

import cdm_train.accelerations as accelerations_mod
from cdm_train.config import ConfigError, make_config
from cdm_train.lora import AdapterView, adapter_state_dict
from cdm_train.trainer import Trainer

from .helpers import tiny_config

LORA = ["lora.student=true", "lora.fake=true", "lora.rank=4", "lora.alpha=8"]
FAKE_ONLY = ["lora.fake=true", "lora.rank=4", "lora.alpha=8", "optim.fake_merge_decay=1.0"]


def _velocity(tr, net, seed=0):
    m = tr.models
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *m.latent_shape, generator=g)
    sigma = torch.rand(3, generator=g)
    cond = m.sample_cond(3, g)
    with torch.no_grad():
        return m.adapter(net, x, sigma, cond)


def test_zero_initialised_adapters_give_the_base_forward(tmp_path):
    tr = Trainer(tiny_config(tmp_path, *LORA))
    m = tr.models
    assert isinstance(m.student, AdapterView) and isinstance(m.fake, AdapterView)
    base = _velocity(tr, m.teacher)
    assert torch.equal(_velocity(tr, m.student), base) and torch.equal(_velocity(tr, m.fake), base)
    # ... and the adapters are live: a non-zero B changes the student, not the teacher or the fake teacher.
    with torch.no_grad():
        for name, p in m.student.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    assert not torch.allclose(_velocity(tr, m.student), base)
    assert torch.equal(_velocity(tr, m.teacher), base) and torch.equal(_velocity(tr, m.fake), base)


def test_only_adapters_are_trained_and_one_base_serves_all_three(tmp_path):
    full = Trainer(tiny_config(tmp_path / "full"))
    tr = Trainer(tiny_config(tmp_path / "lora", *LORA))
    m = tr.models
    n_full = sum(p.numel() for p in full.models.student.parameters())
    n_adapter = sum(p.numel() for p in m.student.parameters())
    assert 0 < n_adapter < n_full / 2
    assert {id(p) for p in m.student.parameters()}.isdisjoint({id(p) for p in m.fake.parameters()})
    assert list(m.teacher.parameters()) == []  # frozen: nothing of it is trained or checkpointed
    assert m.student.peft_model is m.fake.peft_model is m.teacher.peft_model  # one base in memory
    opt_params = [p for group in tr.student_opt.param_groups for p in group["params"]]
    assert sum(p.numel() for p in opt_params) == n_adapter
    base_before = [p.detach().clone() for n, p in m.teacher.peft_model.named_parameters() if "lora_" not in n]
    teacher_before = _velocity(tr, m.teacher)
    tr.train(steps=4)
    # The real teacher (base with adapters disabled) is untouched by the adapters' training.
    base_after = [p for n, p in m.teacher.peft_model.named_parameters() if "lora_" not in n]
    assert all(torch.equal(a, b) for a, b in zip(base_before, base_after))
    assert torch.equal(_velocity(tr, m.teacher), teacher_before)
    assert not torch.equal(_velocity(tr, m.fake), teacher_before)  # the fake adapter did learn something
    # ... and so did the student's (its backward comes after teacher calls that switch adapters off).
    assert any(float(p.abs().max()) > 0 for n, p in m.student.named_parameters() if "lora_B" in n)
    assert not torch.equal(_velocity(tr, m.student), teacher_before)


def test_lora_run_learns_and_resumes_exactly(tmp_path):
    import cdm_kernels as ck

    straight = Trainer(tiny_config(tmp_path / "a", *LORA, "train.steps=12", "train.checkpoint_every=6"))
    m = straight.models
    g = torch.Generator().manual_seed(5)
    cond = m.sample_cond(32, g)
    x0 = torch.randn(32, *m.latent_shape, generator=g) * 0.5
    sigma = torch.rand(32, generator=g).clamp(0.02, 0.98)

    def heldout():
        with torch.no_grad():
            xt = ck.renoise(x0, sigma, seed=3)
            return float(ck.flow_matching_loss(m.adapter(m.fake, xt, sigma, cond), x0, seed=3))

    before = heldout()
    straight.train()
    assert heldout() < 0.99 * before  # the fake adapter fits flow matching
    first = Trainer(tiny_config(tmp_path / "b", *LORA, "train.steps=12", "train.checkpoint_every=6"))
    first.train(steps=6)
    resumed = Trainer(tiny_config(tmp_path / "b", *LORA, "train.steps=12", "train.checkpoint_every=6"))
    resumed.resume()
    resumed.train()
    losses = [(r["step"], r["loss_fake"], r.get("loss_student")) for r in first.history + resumed.history]
    assert losses == [(r["step"], r["loss_fake"], r.get("loss_student")) for r in straight.history]
    for a, b in ((straight.models.student, resumed.models.student), (straight.models.fake, resumed.models.fake),
                 (straight.ema.module, resumed.ema.module)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_merge_blends_the_adapters(tmp_path):
    d = 0.5
    tr = Trainer(tiny_config(tmp_path, *LORA, f"optim.fake_merge_decay={d}", "train.batch_size=2",
                             "schedule.max_steps=2"))
    m = tr.models

    def zero_lr(opt, base_lr, warmup, steps_taken):
        for group in opt.param_groups:
            group["lr"] = 0.0

    tr._set_lr = zero_lr
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1)
    fake0 = [p.detach().clone() for p in m.fake.parameters()]
    student0 = [p.detach().clone() for p in m.student.parameters()]
    tr.train_step()
    for f, f0, s0 in zip(m.fake.parameters(), fake0, student0):
        torch.testing.assert_close(f.detach(), d * f0 + (1 - d) * s0)


def test_full_student_with_a_lora_fake_teacher(tmp_path):
    tr = Trainer(tiny_config(tmp_path, *FAKE_ONLY, "train.steps=3"))
    m = tr.models
    assert not isinstance(m.student, AdapterView) and isinstance(m.fake, AdapterView)
    assert m.fake.peft_model is m.teacher.peft_model  # the fake teacher rides on the frozen teacher
    teacher_before = _velocity(tr, m.teacher)
    tr.train()
    assert torch.equal(_velocity(tr, m.teacher), teacher_before)
    with pytest.raises(ConfigError, match="optim.fake_merge_decay"):
        make_config("tiny", overrides=["lora.fake=true"])  # the default merge is undefined here


@pytest.mark.parametrize("overrides, key", [
    (["lora.student=true"], "lora.student"),
    ([*LORA, "train.parallel=fsdp"], "train.parallel"),
    ([*LORA, "speed.cuda_graphs_teacher=true"], "speed.cuda_graphs_teacher"),
    ([*LORA, "speed.fp8_attention_teacher=true"], "speed.fp8_attention_teacher"),
    ([*LORA, "speed.rollout_graphs=true"], "speed.rollout_graphs"),
    ([*LORA, "lora.rank=0"], "lora.rank"),
])
def test_unsupported_combinations_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config("tiny", overrides=overrides)


def test_adapter_state_dict_uses_diffusers_names(tmp_path):
    tr = Trainer(tiny_config(tmp_path, *LORA))
    sd = adapter_state_dict(tr.models.student)
    assert sd and all(k.startswith("transformer_blocks.") and (".lora_A." in k or ".lora_B." in k) for k in sd)
    assert any(".attn.to_q.lora_A.weight" in k for k in sd) and any(".ff.net.2.lora_B.weight" in k for k in sd)


def test_gradient_checkpointing_works_on_the_shared_base(tmp_path):
    """train.grad_checkpointing with LoRA: the shared base's blocks recompute; the losses are unchanged."""
    plain = Trainer(tiny_config(tmp_path / "a", *LORA, "train.steps=2", "optim.update_ratio=1"))
    ckpt = Trainer(tiny_config(tmp_path / "b", *LORA, "train.steps=2", "optim.update_ratio=1",
                               "train.grad_checkpointing=true"))
    from cdm_kernels.graphs import checkpoint_policy
    from cdm_train.blocks import network_blocks

    blocks = network_blocks(ckpt.models.student)  # the shared base's blocks
    assert blocks and {checkpoint_policy(b) for b in blocks} == {"full"}
    grads = {}
    for name, tr in (("plain", plain), ("ckpt", ckpt)):
        original = tr._optimizer_step

        def spy(module, opt, loss, _tr=tr, _name=name, _orig=original):
            if opt is _tr.student_opt and _name not in grads:
                grads[_name] = [p.grad.detach().clone() for p in module.parameters() if p.grad is not None]
            return _orig(module, opt, loss)

        tr._optimizer_step = spy
        tr.train()
    for a, b in zip(plain.history, ckpt.history):
        assert a["loss_student"] == pytest.approx(b["loss_student"], rel=1e-5)
    # The first student step's adapter gradients agree (Adam's first update, lr * sign(g), would amplify
    # rounding-level differences in the weights, so the gradients are what is compared).
    assert len(grads["plain"]) == len(grads["ckpt"]) > 0
    for g1, g2 in zip(grads["plain"], grads["ckpt"]):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


def _lora_ddp_worker(rank: int, world: int, store: str, tmp: str) -> None:
    """LoRA + LoRA under DDP (2 gloo ranks, half batch each) vs one process on the whole batch; then a DDP
    run with gradient checkpointing, checkpointed and resumed."""
    import json
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    from cdm_train.distributed import unwrap

    from .test_distributed import (
        GLOBAL_BATCH,
        _config,
        _explicit_batch,
        _explicit_step,
        _init,
        _perturbed_models,
        _rows,
    )

    try:
        tmp_path = Path(tmp)
        _init(rank, world, store)
        ref_cfg = _config(tmp_path / f"ref{rank}", *LORA, "optim.eps=1e-3")
        ref = Trainer(ref_cfg, models=_perturbed_models(ref_cfg))
        batch = _explicit_batch(ref.models)
        teacher_before = _velocity(ref, ref.models.teacher)
        _explicit_step(ref, batch)
        cfg = _config(tmp_path / "eq", *LORA, "train.parallel=ddp", "optim.eps=1e-3")
        tr = Trainer(cfg, models=_perturbed_models(cfg))
        assert isinstance(unwrap(tr.models.student), AdapterView) and unwrap(tr.models.student) is not tr.models.student
        per = GLOBAL_BATCH // world
        _explicit_step(tr, _rows(batch, slice(rank * per, (rank + 1) * per)))
        rep = {"grad_err": max(float((a - b).abs().max()) for a, b in zip(tr._last_student_grads,
                                                                           ref._last_student_grads)),
               "grad_scale": max(float(b.abs().max()) for b in ref._last_student_grads),
               "n_grads": len(ref._last_student_grads),
               "param_err": max(float((a - b).abs().max()) for x, y in
                                ((tr.models.student, ref.models.student), (tr.models.fake, ref.models.fake),
                                 (tr.ema.module, ref.ema.module))
                                for a, b in zip(x.parameters(), y.parameters())),
               "teacher_unchanged": bool(torch.equal(_velocity(tr, tr.models.teacher), teacher_before))}
        del tr
        run = [*LORA, "train.parallel=ddp", "train.steps=4", "train.checkpoint_every=2", "optim.update_ratio=1",
               "optim.student_warmup_steps=0", "optim.fake_warmup_steps=0", "optim.student_lr=1e-3",
               "optim.fake_lr=1e-3", "optim.eps=1e-3", "train.grad_checkpointing=true"]
        straight = Trainer(_config(tmp_path / "straight", *run))
        straight.train()
        first = Trainer(_config(tmp_path / "resumed", *run))
        first.train(steps=2)
        resumed = Trainer(_config(tmp_path / "resumed", *run))
        resumed.resume()
        resumed.train()
        plain = Trainer(_config(tmp_path / "plain", *[r for r in run if "grad_checkpointing" not in r]))
        plain.train()
        rep["straight"] = [[r["step"], r["loss_fake"], r.get("loss_student")] for r in straight.history]
        rep["resumed"] = [[r["step"], r["loss_fake"], r.get("loss_student")] for r in first.history + resumed.history]
        rep["plain"] = [[r["step"], r["loss_fake"], r.get("loss_student")] for r in plain.history]
        pairs = ((straight.models.student, resumed.models.student), (straight.models.fake, resumed.models.fake),
                 (straight.ema.module, resumed.ema.module))
        rep["adapters_equal"] = all(torch.equal(a, b) for x, y in pairs for a, b in zip(x.parameters(), y.parameters()))
        rep["student"] = [p.detach().sum().item() for p in straight.models.student.parameters()]
        (tmp_path / f"report{rank}.json").write_text(json.dumps(rep))
        dist.barrier()
    except Exception:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_lora_under_ddp_matches_one_process_and_resumes(tmp_path):
    """train.parallel=ddp with LoRA student + LoRA fake on one base: the adapters' gradients are the
    whole-batch gradients, every rank holds the same adapters, and a DDP LoRA run with gradient
    checkpointing resumes exactly (and matches the run without checkpointing)."""
    import json

    from .test_distributed import WORLD, _spawn

    try:
        _spawn(_lora_ddp_worker, WORLD, str(tmp_path))
    except Exception:
        pytest.fail("workers failed:\n" + "\n".join(p.read_text() for p in tmp_path.glob("error*.txt")))
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(WORLD)]
    for rep in reports:
        assert rep["n_grads"] > 0 and rep["grad_scale"] > 1e-4
        assert rep["grad_err"] <= 1e-5 * rep["grad_scale"] + 1e-7, rep
        assert rep["param_err"] <= 1e-6, rep
        assert rep["teacher_unchanged"]
        assert rep["resumed"] == rep["straight"] and rep["adapters_equal"], rep
        for a, b in zip(rep["plain"], rep["straight"]):
            assert a[0] == b[0] and a[1:] == pytest.approx(b[1:], rel=1e-4)
    assert reports[0]["student"] == reports[1]["student"]  # DDP keeps the ranks' adapters identical
    assert [r[0] for r in reports[0]["straight"]] == [1, 2, 3, 4]


def test_full_student_keeps_its_own_speed_switches_with_a_lora_fake(tmp_path, monkeypatch):
    """Full student + LoRA fake teacher: the student is its own copy, so rollout graphs and FP8 rollout
    attention apply to it alone (simulated graphs on the CPU: the same losses); the shared base's switches
    stay refused."""
    from cdm_kernels.attention.processors import is_patched
    from cdm_train import graphs as train_graphs

    run = [*FAKE_ONLY, "train.steps=2", "optim.update_ratio=1", "schedule.fixed=[1.0, 0.75, 0.5, 0.25]"]
    plain = Trainer(tiny_config(tmp_path / "plain", *run))
    plain.train()
    installed = []

    def apply(cfg, models, **_):
        installed.append(models)
        return train_graphs.apply_graph_switches(cfg, models, compile_backend="eager", simulate=True)

    monkeypatch.setattr(accelerations_mod, "apply_graph_switches", apply)
    fast = Trainer(tiny_config(tmp_path / "fast", *run, "speed.rollout_graphs=true"))
    fast.train()
    stats = train_graphs.graph_stats(installed[-1])
    assert list(stats) == ["student rollout"] and stats["student rollout"]["replays"] >= 1
    for a, b in zip(plain.history, fast.history):
        assert a["loss_fake"] == pytest.approx(b["loss_fake"], rel=1e-5)
        assert a["loss_student"] == pytest.approx(b["loss_student"], rel=1e-5)

    fp8 = Trainer(tiny_config(tmp_path / "fp8", *FAKE_ONLY, "speed.fp8_attention_rollout=true",
                              "speed.fp8_attention_emulate=true"))
    assert is_patched(fp8.models.student) and not is_patched(fp8.models.teacher.peft_model)
    fp8.train(steps=1)
    for key in ("fp8_attention_fake", "fp8_linear_teacher"):
        with pytest.raises(ConfigError, match=rf"speed\.{key}"):
            make_config("tiny", overrides=[*FAKE_ONLY, f"speed.{key}=true"])


def test_full_student_with_a_lora_fake_teacher_resumes_exactly(tmp_path):
    run = [*FAKE_ONLY, "train.steps=4", "train.checkpoint_every=2", "optim.update_ratio=1",
           "optim.student_warmup_steps=0", "optim.fake_warmup_steps=0"]
    straight = Trainer(tiny_config(tmp_path / "a", *run))
    straight.train()
    first = Trainer(tiny_config(tmp_path / "b", *run))
    first.train(steps=2)
    resumed = Trainer(tiny_config(tmp_path / "b", *run))
    resumed.resume()
    resumed.train()
    key = [(r["step"], r["loss_fake"], r.get("loss_student")) for r in straight.history]
    assert key == [(r["step"], r["loss_fake"], r.get("loss_student")) for r in first.history + resumed.history]
    for a, b in ((straight.models.student, resumed.models.student), (straight.models.fake, resumed.models.fake),
                 (straight.ema.module, resumed.ema.module)):
        params = list(zip(a.parameters(), b.parameters()))
        assert params and all(torch.equal(p, q) for p, q in params)
    assert not isinstance(resumed.models.student, AdapterView)
    # The checkpoint holds the full student but only the fake teacher's adapter.
    from cdm_train.checkpoint import load

    state = load(tmp_path / "b")
    assert all("lora_" in k for k in state["fake"]) and not any("lora_" in k for k in state["student"])
