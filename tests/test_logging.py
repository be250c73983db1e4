"""Logs for clusters: no progress bar in a file, one plain line per log_every steps instead, and optional
Weights & Biases logging (tested with a stub of its API: the package is optional)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cdm_train.trainer import Trainer, log_line

from .helpers import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_a_cli_run_into_a_file_writes_one_readable_line_per_log_interval(tmp_path):
    """stdout and stderr redirected to files, as a cluster job's are: no bar, no carriage returns, one line per
    log_every steps (and at the end), each with step, losses, lr, NFE, it/s and GPU memory."""
    out, stdout, stderr = tmp_path / "run", tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with stdout.open("w") as so, stderr.open("w") as se:
        argv = [sys.executable, "-m", "cdm_train", "train", "--preset", "tiny", "--steps", "7", "--out", str(out),
                "--set", "train.log_every=3", "--set", "train.tensorboard=false"]
        rc = subprocess.run(argv, stdout=so, stderr=se, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env,
                            timeout=600).returncode
    text, err = stdout.read_text(), stderr.read_text()
    assert rc == 0, err
    assert "\r" not in text and "\r" not in err
    lines = [x for x in text.splitlines() if x.startswith("step ")]
    assert [x.split(" | ")[0] for x in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    for line in lines:
        fields = line.split(" | ")
        assert fields[1].startswith("loss fake ") and fields[2].startswith("lr student ")
        assert fields[3].startswith("nfe/it ") and fields[4].endswith(" it/s") and fields[5].startswith("gpu ")
    assert "student " in lines[1].split(" | ")[1]  # steps 4-6 hold student steps (update_ratio 2); 7 none
    assert text.splitlines()[-1].startswith("{")  # the summary JSON stays the last line


def test_log_line_formats_missing_and_non_finite_values():
    record = {"step": 4, "loss_fake": 0.5, "loss_student": float("nan"), "lr_student": 1e-5, "lr_fake": 5e-6,
              "nfe_per_step": 12.0, "nfe_rollout_per_step": 9.5, "step_time_s": 0.25, "torch_peak_gib": 41.23,
              "nonfinite_total": 1}
    line = log_line(record, 10)
    assert line == ("step 4/10 | loss fake 0.5 student nan | lr student 1e-05 fake 5e-06 | nfe/it 12.0 (rollout 9.5)"
                    " | 4 it/s | gpu peak 41.2 GiB | skipped non-finite 1")
    del record["torch_peak_gib"]
    assert "| gpu - |" in log_line(record, 10)


def test_progress_auto_is_lines_off_a_terminal_and_the_bar_when_asked(tmp_path, capsys, monkeypatch):
    import cdm_train.trainer as trainer_mod

    terminal = {"tty": False}  # what stderr is, whatever runs the tests (pytest -s in a terminal included)
    monkeypatch.setattr(trainer_mod, "_is_a_terminal", lambda stream: terminal["tty"])
    Trainer(tiny_config(tmp_path / "auto", "train.progress=null", "train.steps=2")).train()
    out, err = capsys.readouterr()
    assert [x.split(" | ")[0] for x in out.splitlines()] == ["step 1/2", "step 2/2"] and "2/2" not in err
    terminal["tty"] = True
    Trainer(tiny_config(tmp_path / "tty", "train.progress=null", "train.steps=2")).train()
    out, err = capsys.readouterr()
    assert "step 1/2" not in out and "2/2" in err  # a terminal gets the bar (tqdm draws on stderr)
    terminal["tty"] = False
    Trainer(tiny_config(tmp_path / "bar", "train.progress=true", "train.steps=2")).train()
    out, err = capsys.readouterr()
    assert "step 1/2" not in out and "2/2" in err  # asked for: the bar even off a terminal


class _StubWandb(types.ModuleType):
    """The part of the wandb API the trainer uses: init(...) -> run with log(dict, step=) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        stub = self

        class Run:
            def log(self, data, step=None):
                stub.logged.append((step, dict(data)))

            def finish(self):
                stub.finished += 1

        return Run()


def test_wandb_logs_every_record_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    stub = _StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    overrides = ("train.wandb=true", "train.wandb_project=proj", "train.log_every=2", "train.steps=4")
    Trainer(tiny_config(tmp_path, *overrides)).train()
    (first,) = stub.inits
    assert first["project"] == "proj" and first["resume"] == "allow" and first["dir"] == str(tmp_path)
    assert first["config"]["train"]["wandb"] is True and first["config"]["model"]["preset"] == "tiny"
    assert [step for step, _ in stub.logged] == [2, 4] and stub.finished == 1
    for _, data in stub.logged:
        assert {"loss_fake", "lr_student", "nfe_per_step", "step_time_s"} <= set(data)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in data.values())
    resumed = Trainer(tiny_config(tmp_path, *overrides[:-1], "train.steps=6"))
    resumed.resume()
    resumed.train()
    assert stub.inits[1]["id"] == first["id"] and [s for s, _ in stub.logged] == [2, 4, 6]


def test_wandb_asked_for_but_not_installed_warns_and_trains(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    tr = Trainer(tiny_config(tmp_path, "train.wandb=true", "train.steps=1"))
    with caplog.at_level("WARNING", logger="cdm_train"):
        summary = tr.train()
    assert summary["steps"] == 1 and "wandb package is not installed" in caplog.text


@pytest.mark.parametrize("flag,expected", [("--no-progress", False), ("--progress", True), (None, None)])
def test_progress_flags(flag, expected):
    from cdm_train.cli import _train_config, build_parser

    argv = ["train", "--preset", "tiny"] + ([flag] if flag else [])
    assert _train_config(build_parser().parse_args(argv)).train.progress is expected


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, text):
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("command", ["demo", "train-teacher"])
@pytest.mark.parametrize("tty, flags, bars", [(False, [], False), (True, [], True), (False, ["--progress"], True),
                                              (True, ["--no-progress"], False)])
def test_demo_and_teacher_bars_only_on_a_terminal_unless_asked(monkeypatch, tmp_path, command, tty, flags, bars):
    # `make demo` into a log file (CI, a cluster job) must not fill it with carriage-return bars; the demo still
    # prints its report table.
    from cdm_train import cli, demo, digits

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.update(k) or {})
    monkeypatch.setattr(digits, "train_teacher", lambda *a, **k: seen.update(k) or {})
    monkeypatch.setattr(cli.sys, "stderr", _Stream(tty))
    assert cli.main([command, "--out", str(tmp_path / "out"), *flags]) == 0
    assert seen["progress"] is bars
    if command == "demo":
        assert seen["print_report"] is True
