"""The official recipe's details: LR warm-up, EMA warm-up, the model's sigma shift, the null condition."""

import json

import pytest
import torch

from cdm_train.cli import main
from cdm_train.config import ConfigError, make_config
from cdm_train.models.build import resolve_shift
from cdm_train.schedule import Shift
from cdm_train.trainer import Trainer

from .helpers import tiny_config


def test_lr_warm_up_is_the_official_linear_ramp_from_zero(tmp_path):
    # Official create_lr_lambda + LambdaLR stepped after each optimizer step: step k (from 0) uses lr * k / W.
    tr = Trainer(tiny_config(tmp_path, "optim.update_ratio=1", "optim.student_warmup_steps=3",
                             "optim.fake_warmup_steps=5", "train.batch_size=2", "schedule.max_steps=2"))
    used = {"student": [], "fake": []}
    for name, opt in (("student", tr.student_opt), ("fake", tr.fake_opt)):
        original = opt.step

        def spy(*a, _name=name, _opt=opt, _orig=original, **k):
            used[_name].append(_opt.param_groups[0]["lr"])
            return _orig(*a, **k)

        opt.step = spy
    for _ in range(7):
        tr.train_step()
        tr.step += 1
    o = tr.cfg.optim
    assert used["fake"] == pytest.approx([o.fake_lr * k / 5 for k in range(5)] + [o.fake_lr] * 2)
    assert used["student"] == pytest.approx([o.student_lr * k / 3 for k in range(3)] + [o.student_lr] * 4)
    assert used["fake"][0] == 0.0  # the official first step moves nothing but the Adam moments


def test_no_lr_warm_up_when_zero(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "optim.update_ratio=1", "optim.student_warmup_steps=0",
                             "optim.fake_warmup_steps=0", "train.batch_size=2", "schedule.max_steps=2"))
    tr.train_step()
    assert tr.fake_opt.param_groups[0]["lr"] == tr.cfg.optim.fake_lr
    assert tr.student_opt.param_groups[0]["lr"] == tr.cfg.optim.student_lr


def test_ema_warm_up_is_the_official_schedule(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "optim.ema_decay=0.999"))
    # cdm/models/ema.py: min((1 + s) / (10 + s), decay), s = the student step (1 at the first update).
    assert [tr.ema_decay(s) for s in (1, 2, 10, 100)] == pytest.approx([2 / 11, 3 / 12, 11 / 20, 101 / 110])
    assert tr.ema_decay(100_000) == 0.999
    off = Trainer(tiny_config(tmp_path, "optim.ema_decay=0.99", "optim.ema_warmup=false"))
    assert off.ema_decay(1) == 0.99


def test_defaults_follow_the_official_recipe():
    c = make_config("sd3-medium-shape")
    assert c.optim.student_warmup_steps == 100 and c.optim.fake_warmup_steps == 100 and c.optim.ema_warmup
    assert c.schedule.shift is None and resolve_shift(c) == Shift(3.0)  # SD3-Medium's scheduler shift
    for preset in ("tiny", "digits"):  # these teachers were trained on unshifted sigmas
        assert resolve_shift(make_config(preset)) == Shift(1.0)
    assert resolve_shift(make_config("sd3-medium-shape", overrides=["schedule.shift=2.5"])) == Shift(2.5)
    with pytest.raises(ConfigError, match="schedule.shift"):
        make_config("tiny", overrides=["schedule.shift=0"])


@pytest.mark.parametrize("declared", [3.0, 1.5])
def test_sd3_shift_is_read_from_the_model_directory(tmp_path, declared):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": declared, "num_train_timesteps": 1000}))
    cfg = make_config("sd3-medium", overrides=[f"model.path={tmp_path}", "model.prompt_embeds=x.pt"])
    assert resolve_shift(cfg) == Shift(declared)
    cfg.schedule.shift = 4.0  # an explicit key wins
    assert resolve_shift(cfg) == Shift(4.0)


def test_rollout_runs_at_shifted_sigmas(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "schedule.shift=3.0", "schedule.fixed=[1.0, 0.75, 0.5, 0.25]"))
    d = tr.draws(0)
    assert d.raw_sigmas == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert d.sigmas == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])  # 3s / (1 + 2s)


def _embeds_file(path, with_null: bool):
    data = {"encoder_hidden_states": torch.randn(3, 5, 16), "pooled_projections": torch.randn(3, 8)}
    if with_null:
        data.update(null_encoder_hidden_states=torch.randn(1, 5, 16), null_pooled_projections=torch.randn(1, 8))
    torch.save(data, path)
    return path


def test_missing_null_embeddings_exit_2_naming_the_key(tmp_path, capsys):
    from cdm_train.models.base import load_prompt_embeds as _load_prompt_embeds

    bad = _embeds_file(tmp_path / "no_null.pt", with_null=False)
    with pytest.raises(ConfigError, match="null_encoder_hidden_states"):
        _load_prompt_embeds(str(bad), torch.device("cpu"))
    # A real (tiny) diffusers directory: model.path is checked up front, so it must pass for the embeddings'
    # own error to be the one reported.
    from diffusers import SD3Transformer2DModel

    from cdm_train.models.sd3 import TINY_ARCH

    model = tmp_path / "model"
    SD3Transformer2DModel(**TINY_ARCH).save_pretrained(model / "transformer")
    code = main(["train", "--preset", "sd3-medium", "--set", f"model.path={model}", "--set",
                 f"model.prompt_embeds={bad}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "null_encoder_hidden_states" in err and "empty prompt" in err
    good = _embeds_file(tmp_path / "with_null.pt", with_null=True)
    bank, null = _load_prompt_embeds(str(good), torch.device("cpu"))
    assert torch.equal(null["pooled_projections"], torch.load(good)["null_pooled_projections"])
