"""A new run never overwrites an old one by mistake: `train` into a directory holding a run, without --resume,
stops before touching anything (exit 2); --overwrite moves the old run's files aside, nothing deleted."""

from __future__ import annotations

import json

import pytest

import cdm_train.trainer as trainer_mod
from cdm_train.checkpoint import load
from cdm_train.cli import main

TRAIN = ["train", "--preset", "tiny", "--no-progress", "--set", "train.tensorboard=false", "--set", "train.log_every=1"]


def _snapshot(root):
    """Every file under `root` with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _single_process_run(out):
    assert main([*TRAIN, "--steps", "3", "--out", str(out)]) == 0
    assert load(out)["step"] == 3


def _dcp_run(out):
    """The files an FSDP run leaves (checkpoint_dcp/ with DCP shards and meta.pt; log and config beside it).
    The guard only looks at names, so stand-in bytes are as good as real shards and need no process group."""
    dcp = out / "checkpoint_dcp"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"dcp metadata of an 80-step run")
    (dcp / "__0_0.distcp").write_bytes(b"rank 0 shard")
    (dcp / "meta.pt").write_bytes(b"meta")
    (out / "log.jsonl").write_text(json.dumps({"step": 80, "loss_fake": 0.5}) + "\n")
    (out / "config.yaml").write_text("model: {preset: tiny}\n")
    (out / "wandb_run_id").write_text("abc123\n")  # a W&B run id moves with the run: the new run gets its own


@pytest.mark.parametrize("make_run", [_single_process_run, _dcp_run], ids=["checkpoint.pt", "checkpoint_dcp"])
def test_a_new_run_into_a_run_directory_is_refused_and_touches_nothing(tmp_path, capsys, monkeypatch, make_run):
    out = tmp_path / "run"
    make_run(out)
    before = _snapshot(out)
    capsys.readouterr()

    def no_build(*args, **kwargs):
        raise AssertionError("models were built before the directory was checked")

    monkeypatch.setattr(trainer_mod, "build_models", no_build)
    assert main([*TRAIN, "--steps", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "checkpoint" in err
    assert _snapshot(out) == before  # same files, same bytes, not even re-written


@pytest.mark.parametrize("make_run", [_single_process_run, _dcp_run], ids=["checkpoint.pt", "checkpoint_dcp"])
def test_overwrite_moves_the_old_run_aside_and_starts_afresh(tmp_path, capsys, make_run):
    out = tmp_path / "run"
    make_run(out)
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*TRAIN, "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    err = capsys.readouterr().err
    (moved,) = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert str(moved) in err
    assert {k: v[0] for k, v in _snapshot(moved).items()} == {k: v[0] for k, v in before.items()}  # all kept
    assert load(out)["step"] == 2
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]  # not appended
    assert not (out / "checkpoint_dcp").exists() and not (out / "wandb_run_id").exists()
    # The moved run is not in the way of the next one, and --resume continues the new run.
    assert main([*TRAIN, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert load(out)["step"] == 3


def test_a_leftover_log_without_checkpoint_is_refused_too_and_resume_with_overwrite_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    assert main([*TRAIN, "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "no checkpoint" in err
    assert main([*TRAIN, "--steps", "1", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "one of them" in capsys.readouterr().err
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'


def test_an_empty_or_unrelated_directory_is_fine(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*TRAIN, "--steps", "1", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and load(out)["step"] == 1
