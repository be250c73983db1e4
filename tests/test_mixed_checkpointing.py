"""Mixed activation-checkpointing plans (`train.grad_checkpointing=<cheap>+<expensive>:<k>`): parsing, one policy
per block in checkpoint_blocks, auto's choice among pure and mixed plans, and the record of what was applied."""

import types

import pytest
import torch

import cdm_train.accelerations as acc
from cdm_kernels.graphs import checkpoint_blocks, checkpoint_policy, find_blocks
from cdm_train.config import make_config
from cdm_train.errors import ConfigError
from cdm_train.memory_plan import (
    ACTIVATION_BYTES,
    HEADROOM,
    RECOMPUTE,
    activation_shape,
    choose_plan,
    choose_plan_from,
    model_state_bytes,
    parse_plan,
    plan_policies,
    recompute_cost,
)
from cdm_train.trainer import Trainer

from .helpers import tiny_config
from .test_accelerations import _assert_losses_close, _losses, _OpCounter

GIB = 2**30


# ------------------------------------------------------------------------------------------------ config values
def test_mixed_plan_values_parse_and_bad_ones_name_the_key():
    assert make_config("tiny", overrides=["train.grad_checkpointing=selective+full:1"]).train.grad_checkpointing \
        == "selective+full:1"
    for good in ("none+selective:3", "none+full:0", "selective+full:12"):
        assert make_config("tiny", overrides=[f"train.grad_checkpointing={good}"]).train.grad_checkpointing == good
    # the existing values are unchanged
    assert make_config("tiny").train.grad_checkpointing == "auto"
    assert make_config("tiny", overrides=["train.grad_checkpointing=true"]).train.grad_checkpointing == "full"
    for bad in ("full+selective:2", "selective+selective:2", "selective+full", "selective+full:-1",
                "selective+full:x", "mixed:3", "selective+full:2.5"):
        with pytest.raises(ConfigError, match="train.grad_checkpointing.*selective\\+full:12"):
            make_config("tiny", overrides=[f"train.grad_checkpointing={bad}"])


def test_plan_policies_per_block():
    assert parse_plan("full") is None
    assert parse_plan("none+full:2") == ("none", "full", 2)
    assert plan_policies("selective+full:2", 4) == ["selective", "selective", "full", "full"]
    assert plan_policies("none+selective:0", 2) == ["selective", "selective"]
    assert plan_policies("none+full:3", 3) == ["none"] * 3
    assert plan_policies("selective", 2) == ["selective", "selective"]
    with pytest.raises(ValueError, match="3 blocks on none, but the network has 2"):
        plan_policies("none+full:3", 2)
    # full = one block forward per block; selective a fraction of it
    assert recompute_cost("selective+full:2", 4) == pytest.approx(2 * RECOMPUTE["selective"] + 2)


def test_k_beyond_the_networks_blocks_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.grad_checkpointing.*the network has 2"):
        Trainer(tiny_config(tmp_path, "train.grad_checkpointing=selective+full:3"))


# --------------------------------------------------------------------------------------- one policy per block
def _two_blocks_and_inputs():
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    blocks = [JointTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16, context_pre_only=False)
              for _ in range(2)]
    x = torch.randn(2, 9, 32, requires_grad=True)
    ctx = torch.randn(2, 5, 32, requires_grad=True)
    temb = torch.randn(2, 32)
    return blocks, (x, ctx, temb)


def _run_two(policy):
    blocks, (x, ctx, temb) = _two_blocks_and_inputs()
    checkpoint_blocks(blocks, policy)
    counter = _OpCounter()
    with counter:
        hid, enc = x, ctx
        for block in blocks:
            enc, hid = block(hidden_states=hid, encoder_hidden_states=enc, temb=temb)
        loss = hid.square().sum() + enc.square().sum()
        loss.backward()
    grads = [x.grad.clone(), ctx.grad.clone()] + [p.grad.clone() for b in blocks for p in b.parameters()]
    return blocks, counter, loss.detach(), grads


def test_mixed_policies_give_the_loss_and_gradients_of_no_checkpointing():
    _, none, loss_none, g_none = _run_two("none")
    _, full, _, _ = _run_two("full")
    for mixed in (["selective", "full"], ["none", "full"], ["none", "selective"]):
        blocks, counter, loss, grads = _run_two(mixed)
        assert [checkpoint_policy(b) for b in blocks] == mixed
        assert loss == loss_none
        for a, b in zip(grads, g_none):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # the blocks really recompute what their own policy says: one full block re-runs its matmuls, so a
        # mixed plan with one full block sits between none and all-full
        if "full" in mixed:
            assert none.backward_mm < counter.backward_mm < full.backward_mm
        else:
            assert counter.backward_mm == none.backward_mm and counter.backward_other > none.backward_other


def test_checkpoint_blocks_rejects_mismatched_or_bad_policy_lists_before_touching_a_block():
    blocks, _ = _two_blocks_and_inputs()
    with pytest.raises(ValueError, match="1 policies for 2 blocks"):
        checkpoint_blocks(blocks, ["full"])
    with pytest.raises(ValueError, match="policy"):
        checkpoint_blocks(blocks, ["full", "some"])
    assert [checkpoint_policy(b) for b in blocks] == ["none", "none"]
    assert checkpoint_blocks(blocks, ["none", "full"]) == 1


def test_trainer_installs_the_mixed_plan_in_student_and_fake_with_the_same_losses(tmp_path):
    """Under bf16 autocast too: a mixed plan with selective blocks needs autocast's weight-cast cache off, as
    pure selective does (the cost model's first mixed run failed in backward without it)."""
    run = ["train.precision=bf16", "optim.update_ratio=1", "schedule.max_steps=3"]
    plain = _losses(Trainer(tiny_config(tmp_path / "n", *run)), 2)
    tr = Trainer(tiny_config(tmp_path / "m", *run, "train.grad_checkpointing=selective+full:1"))
    for net in (tr.models.student, tr.models.fake):
        assert [checkpoint_policy(b) for b in find_blocks(net)] == ["selective", "full"]
    assert {checkpoint_policy(b) for b in find_blocks(tr.models.teacher)} == {"none"}
    assert tr.accelerations.checkpointing == "selective+full:1"
    assert "student: selective+full:1 (blocks 0-0 selective, 1-1 full, of 2)" in tr.accelerations.steps[
        "checkpointing"]
    _assert_losses_close(_losses(tr, 2), plain, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ auto's choice
def test_auto_picks_a_mixed_plan_when_no_pure_plan_is_the_best_fit():
    # SD3-Medium-like numbers: 24 blocks, 8 GiB of model state per GPU, one block's activations per
    # ACTIVATION_BYTES unit such that selective needs ~100 GiB and full ~19 GiB in all.
    blocks, state = 24, 8 * GIB
    unit = 100 * GIB / (blocks * ACTIVATION_BYTES["selective"])

    def estimate(plan):
        return state + unit * sum(ACTIVATION_BYTES[p] for p in plan_policies(plan, blocks))

    # an 80 GB card: full fits, selective not; the largest k of selective+full that fits beats full
    h100 = choose_plan_from(state, blocks, unit, 80 * GIB)
    cheap, expensive, k = parse_plan(h100.plan)
    assert (cheap, expensive) == ("selective", "full") and 0 < k < blocks
    budget = HEADROOM * 80 * GIB
    assert estimate(h100.plan) <= budget < estimate(f"selective+full:{k + 1}")  # the largest k that fits
    assert recompute_cost(h100.plan, blocks) < recompute_cost("full", blocks)
    assert h100.plan in h100.estimates_gib and "full 24.0" in h100.reason  # full fitted too, and lost
    assert f"estimated peak {estimate(h100.plan) / GIB:.1f} GiB" in h100.reason

    # a 141 GB card: selective fits; some blocks without checkpointing cost less still
    h200 = choose_plan_from(state, blocks, unit, 141 * GIB)
    assert parse_plan(h200.plan)[:2] == ("none", "selective")
    assert recompute_cost(h200.plan, blocks) < recompute_cost("selective", blocks)

    # a pure plan stays the answer where it is the best: none fits -> none; nothing fits -> full
    assert choose_plan_from(state, blocks, unit, 1000 * GIB).plan == "none"
    assert choose_plan_from(state, blocks, unit, 8 * GIB).plan == "full"


def test_auto_records_the_mixed_plan_in_the_applied_record(tmp_path, monkeypatch):
    tr = Trainer(tiny_config(tmp_path))  # auto on a CPU: none, so the blocks start unchecked
    m, batch = tr.models, tr.cfg.train.batch_size
    blocks, tokens, width = activation_shape(m, batch)
    state = model_state_bytes(m, tr.ema)
    unit = batch * tokens * width
    # a device on which none does not fit, selective does, and one block without checkpointing still fits
    total = (state + unit * (ACTIVATION_BYTES["none"] + ACTIVATION_BYTES["selective"])) / HEADROOM + 1
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: types.SimpleNamespace(total_memory=total))
    assert choose_plan(m, tr.ema, torch.device("cuda", 0), batch).plan == "none+selective:1"
    applied = acc.Applied()
    acc.apply_checkpointing(tr.cfg, m, applied, ema=tr.ema, device=torch.device("cuda", 0))
    assert applied.checkpointing == "none+selective:1"
    line = next(x for x in applied.lines() if x.startswith("3. checkpointing"))
    assert "auto -> none+selective:1 (estimated peak" in line and "fitting too: selective" in line
    assert [checkpoint_policy(b) for b in find_blocks(m.student)] == ["none", "selective"]
