import pytest
import yaml

from cdm_train.cli import main
from cdm_train.config import Config, ConfigError, make_config


def test_defaults_are_the_official_sd3_recipe():
    c = Config()
    assert c.schedule.max_steps == 28
    assert (c.schedule.inner_sigma_min, c.schedule.inner_sigma_max) == (0.25, 0.95)
    assert (c.schedule.sigma_clamp_min, c.schedule.sigma_clamp_max) == (0.02, 0.98)
    assert c.loss.guidance_scale == 7.0 and c.loss.norm_clip_min == 0.1
    assert (c.loss.ca_weight, c.loss.dm_weight, c.loss.cdm_weight) == (1.0, 1.0, 1.0)
    assert c.optim.update_ratio == 2
    assert (c.optim.student_lr, c.optim.fake_lr) == (1e-5, 5e-6)
    assert c.optim.betas == [0.9, 0.999] and c.optim.weight_decay == 1e-4 and c.optim.eps == 1e-8
    assert c.optim.grad_clip == 1.0 and c.optim.ema_decay == 0.999 and c.optim.fake_merge_decay == 0.999


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "train": {"steps": 7, "batch_size": 3},
                                 "optim": {"fake_lr": 2e-3}}))
    cfg = make_config(config_file=f, overrides=["train.steps=9", "optim.student_lr=1e-3", "schedule.fixed=[1.0, 0.5]"])
    assert cfg.model.preset == "tiny"
    assert cfg.train.steps == 9 and cfg.train.batch_size == 3
    assert cfg.optim.fake_lr == 2e-3 and cfg.optim.student_lr == 1e-3
    assert cfg.schedule.fixed == [1.0, 0.5]


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("trainer.steps=3", "trainer.steps"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=-1", "train.steps"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("schedule.fixed=[0.9, 0.5]", "schedule.fixed"),
    ("schedule.inner_sigma_min=0.99", "schedule.inner_sigma_min"),
    ("speed.backend=magic", "speed.backend"),
    ("speed.early_exit_rollout=maybe", "speed.early_exit_rollout"),
    ("model.preset=sd5", "model.preset"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        make_config("tiny", overrides=[override])


def test_cli_bad_config_exits_2(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {steps: [unclosed\n")
    assert main(["train", "--config", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 3\n")
    assert main(["train", "--config", str(unknown)]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", "--preset", "tiny", "--set", "optim.fake_lr=0"]) == 2
    assert "optim.fake_lr" in capsys.readouterr().err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--preset", "--config", "--set", "--steps", "--out", "--device", "--batch-size", "--backend",
                   "--reference-mode", "--resume", "--no-progress"):
        assert option in out


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "--preset", "tiny", "--set", "train.steps=5"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["train"]["steps"] == 5 and data["model"]["preset"] == "tiny"


def _cli_config(argv):
    from cdm_train.cli import _train_config, build_parser

    return _train_config(build_parser().parse_args(["train", *argv]))


def test_flags_change_only_their_own_keys(tmp_path):
    f = tmp_path / "plain.yaml"
    f.write_text("train: {batch_size: 3}\n")  # no model.preset: the CLI's default preset (digits)
    base, flagged = _cli_config(["--config", str(f)]), _cli_config(["--config", str(f), "--steps", "1000"])
    assert flagged.train.steps == 1000 and base.model.preset == flagged.model.preset == "digits"
    base.train.steps = 1000
    assert base.to_dict() == flagged.to_dict()
    tiny = _cli_config(["--preset", "tiny"])
    assert _cli_config(["--preset", "tiny", "--out", str(tmp_path), "--no-progress"]).schedule == tiny.schedule


def test_the_named_preset_is_the_applied_preset():
    """--set model.preset=X applies X's values: never one preset's values under another's name."""
    digits = make_config("digits")
    switched = _cli_config(["--preset", "tiny", "--set", "model.preset=digits"])
    assert switched.to_dict() == digits.to_dict()
    assert _cli_config(["--preset", "tiny", "--set", "model.preset=digits", "--steps", "5"]).schedule == digits.schedule


@pytest.mark.parametrize("text, key", [
    (b"train: {steps: 3}\n\xff\xfe", "UTF-8"),
    (b"model: {preset: [1]}\n", "model.preset"),
    (b"- just\n- a list\n", "mapping"),
])
def test_cli_more_bad_config_files_exit_2(tmp_path, capsys, text, key):
    f = tmp_path / "bad.yaml"
    f.write_bytes(text)
    assert main(["train", "--config", str(f)]) == 2
    assert key in capsys.readouterr().err


def test_bad_device_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.device"):
        make_config("tiny", overrides=["train.device=cuda:x"])
    assert make_config("tiny", overrides=["train.device=cuda:1"]).train.device == "cuda:1"


@pytest.mark.parametrize("switch", ["cuda_graphs_teacher", "rollout_graphs", "overlap_teacher_calls"])
def test_graphs_refused_under_fsdp(switch):
    with pytest.raises(ConfigError, match=rf"speed\.{switch}"):
        make_config("tiny", overrides=["train.parallel=fsdp", f"speed.{switch}=true"])
    assert getattr(make_config("tiny", overrides=["train.parallel=ddp", f"speed.{switch}=true"]).speed, switch)


def test_reference_mode_switches_every_acceleration_off():
    from cdm_train.config import reference_mode

    cfg = make_config("tiny", overrides=["speed.fp8_attention_teacher=true", "speed.compile_student=true"])
    reference_mode(cfg)
    sp = cfg.speed
    assert sp.backend == "reference" and sp.rollout_graph_mode == "capture"
    switches = {k: v for k, v in vars(sp).items() if isinstance(v, bool)}
    assert len(switches) >= 12 and not any(switches.values()), switches
