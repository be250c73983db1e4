"""Every failure the user can fix is one named message and exit 2 (a traceback only with --debug); 1 stays
"training diverged", 130 "interrupted". The table holds the bad inputs of issue 26 and the earlier ones."""

from __future__ import annotations

import shutil

import pytest
import torch

from cdm_train.cli import main
from cdm_train.trainer import TrainingDiverged

TINY = ["--preset", "tiny", "--no-progress", "--set", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished two-step tiny run (checkpoint.pt, config.yaml, log.jsonl)."""
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


def _bad_yaml(tmp, run):
    (tmp / "bad.yaml").write_text("train: {steps: [unclosed\n")
    return ["train", "--config", str(tmp / "bad.yaml")]


def _unknown_key_in_file(tmp, run):
    (tmp / "unknown.yaml").write_text("train:\n  lr: 3\n")
    return ["train", "--config", str(tmp / "unknown.yaml")]


def _all_config_problems_at_once(tmp, run):
    return ["train", *TINY, "--out", str(tmp / "o"), "--set", "optim.fake_lr=0", "--set", "train.lr=3",
            "--set", "train.batch_size=0", "--set", "speed.backend=magic", "--set", "notasection.x=1"]


def _model_dir_without_config_json(tmp, run):
    (tmp / "not_a_model").mkdir()
    (tmp / "embeds.pt").write_bytes(b"")
    return ["train", "--preset", "sd3-medium", "--out", str(tmp / "o"), "--set", f"model.path={tmp / 'not_a_model'}",
            "--set", f"model.prompt_embeds={tmp / 'embeds.pt'}"]


def _missing_path_and_missing_embeddings(tmp, run):
    return ["train", "--preset", "sd3-medium", "--out", str(tmp / "o"), "--set", f"model.path={tmp / 'nowhere'}",
            "--set", f"model.prompt_embeds={tmp / 'nothing.pt'}", "--set", "optim.student_lr=-1"]


def _unset_path_and_embeddings(tmp, run):
    return ["train", "--preset", "flux", "--out", str(tmp / "o")]


def _missing_digits_teacher(tmp, run):
    return ["train", "--out", str(tmp / "o"), "--set", f"model.teacher_path={tmp / 'teacher.pt'}"]


def _triton_on_a_cpu(tmp, run):
    return ["train", *TINY, "--out", str(tmp / "o"), "--device", "cpu", "--backend", "triton"]


def _threads_zero(tmp, run):
    return ["train", *TINY, "--out", str(tmp / "o"), "--threads", "0"]


def _corrupt_checkpoint_to_sample(tmp, run):
    (tmp / "checkpoint.pt").write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())
    return ["sample", "--checkpoint", str(tmp / "checkpoint.pt"), "--out", str(tmp / "s.png")]


def _truncated_checkpoint_to_sample(tmp, run):
    data = (run / "checkpoint.pt").read_bytes()
    (tmp / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return ["sample", "--checkpoint", str(tmp), "--out", str(tmp / "s.png")]


def _not_a_training_checkpoint(tmp, run):
    torch.save({"weights": torch.zeros(2)}, tmp / "other.pt")
    return ["sample", "--checkpoint", str(tmp / "other.pt"), "--out", str(tmp / "s.png")]


def _corrupt_checkpoint_to_resume(tmp, run):
    shutil.copy(run / "config.yaml", tmp / "config.yaml")
    (tmp / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return ["train", "--out", str(tmp), "--resume", "--steps", "3", "--no-progress"]


def _resume_with_another_model(tmp, run):
    shutil.copytree(run, tmp / "copy")
    return ["train", "--preset", "digits", "--out", str(tmp / "copy"), "--resume", "--steps", "4", "--no-progress"]


def _resume_without_a_run(tmp, run):
    return ["train", "--out", str(tmp / "nothing"), "--resume", "--no-progress"]


def _new_run_over_an_old_one(tmp, run):
    shutil.copytree(run, tmp / "copy")
    return ["train", *TINY, "--steps", "3", "--out", str(tmp / "copy")]


def _export_from_nothing(tmp, run):
    return ["export", "--checkpoint", str(tmp / "nothing"), "--out", str(tmp / "x")]


def _sample_zero_steps(tmp, run):
    return ["sample", "--checkpoint", str(run), "--steps", "0", "--out", str(tmp / "s.png")]


def _teacher_zero_steps(tmp, run):
    return ["train-teacher", "--out", str(tmp / "t.pt"), "--steps", "0"]


# (name, argv builder, fragments the message must hold, fragments it must not)
CASES = [
    ("bad YAML", _bad_yaml, ["not valid YAML"], []),
    ("unknown key in a config file", _unknown_key_in_file, ["train.lr"], []),
    ("every config problem in one report", _all_config_problems_at_once,
     ["5 problems", "optim.fake_lr", "train.lr", "train.batch_size", "speed.backend", "notasection"], []),
    ("model.path without config.json", _model_dir_without_config_json, ["model.path", "config.json"],
     ["model.prompt_embeds"]),
    ("missing path and missing embeddings", _missing_path_and_missing_embeddings,
     ["3 problems", "model.path", "model.prompt_embeds", "optim.student_lr"], []),
    ("path and embeddings unset", _unset_path_and_embeddings, ["model.path", "model.prompt_embeds"], []),
    ("missing digits teacher", _missing_digits_teacher, ["model.teacher_path"], []),
    ("--backend triton on a CPU", _triton_on_a_cpu, ["speed.backend", "triton"], []),
    ("--threads 0", _threads_zero, ["--threads"], []),
    ("corrupt checkpoint.pt to sample", _corrupt_checkpoint_to_sample, ["cannot be read"], []),
    ("truncated checkpoint.pt to sample", _truncated_checkpoint_to_sample, ["cannot be read"], []),
    ("a torch file that is no checkpoint", _not_a_training_checkpoint, ["not a cdm-train training checkpoint"], []),
    ("corrupt checkpoint to --resume", _corrupt_checkpoint_to_resume, ["cannot be read"], ["different model"]),
    ("--resume with another model", _resume_with_another_model, ["cannot resume", "different model"], []),
    ("--resume without a run", _resume_without_a_run, ["config.yaml"], []),
    ("a new run over an old one", _new_run_over_an_old_one, ["--resume", "--overwrite"], []),
    ("export from nothing", _export_from_nothing, ["nothing"], []),
    ("sample --steps 0", _sample_zero_steps, ["--steps"], []),
    ("train-teacher --steps 0", _teacher_zero_steps, ["--steps"], []),
]


@pytest.mark.parametrize("name,build,wanted,unwanted", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_message_and_exit_2(name, build, wanted, unwanted, run, tmp_path, capsys,
                                                   monkeypatch):
    if name == "--backend triton on a CPU":  # the tests run Triton interpreted; a user's CPU has no interpreter
        from cdm_kernels import backend

        backend._load_accelerated()
        impl = backend._IMPLS["triton"]["euler_step"]
        monkeypatch.setitem(backend._IMPLS["triton"], "euler_step",
                            backend._Impl(impl.fn, lambda device, dtype: device.type == "cuda"))
    argv = build(tmp_path, run)
    capsys.readouterr()
    assert main(argv) == 2, name
    err = capsys.readouterr().err
    assert err.startswith("cdm-train: ") and "Traceback" not in err, err
    for fragment in wanted:
        assert fragment in err, (fragment, err)
    for fragment in unwanted:
        assert fragment not in err, (fragment, err)


def test_debug_adds_the_traceback_before_or_after_the_command(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    for argv in (["--debug", "sample", "--checkpoint", str(tmp_path)],
                 ["sample", "--checkpoint", str(tmp_path), "--debug"]):
        assert main([*argv, "--out", str(tmp_path / "s.png")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "cannot be read" in err.splitlines()[-1]


def test_diverged_is_1_interrupted_is_130_and_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    import cdm_train.trainer as trainer_mod

    def diverge(self, steps=None):
        raise TrainingDiverged("5 non-finite steps in a row")

    monkeypatch.setattr(trainer_mod.Trainer, "train", diverge)
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "a")]) == 1
    assert "non-finite" in capsys.readouterr().err

    def interrupt(self, steps=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "train", interrupt)
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "b")]) == 130

    def bug(self, steps=None):
        raise ZeroDivisionError("a bug, not the user's doing")

    monkeypatch.setattr(trainer_mod.Trainer, "train", bug)
    with pytest.raises(ZeroDivisionError):  # propagates: Python prints the traceback and exits 1
        main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "c")])


def test_out_of_gpu_memory_is_a_named_error(tmp_path, capsys, monkeypatch):
    import cdm_train.trainer as trainer_mod

    def oom(self, steps=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_mod.Trainer, "train", oom)
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "out of GPU memory" in err and "train.batch_size" in err and "Traceback" not in err
