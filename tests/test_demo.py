"""The demo end to end on a shortened run (cdm_train.demo.QUICK_TRAIN_STEPS iterations), with the issue's bar.

The bar is the issue's, unchanged: teacher@50 (CFG) class accuracy >= 0.90; the student at 4 steps within
5 points of it in class accuracy and below teacher@4 (plain Euler, same CFG) in FD.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdm_train.demo import STUDENT_STEPS, run_demo


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny, latency-bound models: extra threads only contend
    try:
        out = tmp_path_factory.mktemp("demo")
        report = run_demo(out, quick=True, progress=False)
    finally:
        torch.set_num_threads(previous)
    return out, report


@pytest.mark.slow
def test_demo_outputs(quick_report):
    out, report = quick_report
    for name in ("report.json", "samples.png", "report.md"):
        assert (out / name).is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["teacher"]["steps"] == 50
    assert set(on_disk["student"]) == {str(k) for k in STUDENT_STEPS}
    for entry in [on_disk["teacher"], on_disk["teacher_4_steps"], on_disk["real_data"], *on_disk["student"].values()]:
        assert 0.0 <= entry["class_accuracy"] <= 1.0 and entry["fd"] >= 0.0
    assert on_disk["wall_clock_s"] > 0
    from PIL import Image

    with Image.open(out / "samples.png") as img:  # 6 rows x 10 columns of 64 px tiles, 2 px gaps
        grid = np.asarray(img.convert("L"), dtype=np.float32)
    assert grid.shape == (6 * 66 + 2, 10 * 66 + 2)
    # Tile (row r, column c), back to 8x8 in [-1, 1]: every 8th pixel of the nearest-neighbour upscale.
    tiles = torch.tensor(np.stack([grid[2 + r * 66:2 + r * 66 + 64:8, 2 + c * 66:2 + c * 66 + 64:8]
                                   for r in range(6) for c in range(10)]) / 127.5 - 1).reshape(6, 10, 1, 8, 8)
    from cdm_train.digits.eval import DigitsEvaluator

    predicted = DigitsEvaluator.load_or_train().predict(tiles.reshape(60, 1, 8, 8)).reshape(6, 10)
    # Columns are classes 0..9: teacher@50 (row 0) and the 4-step student (row 4) draw them in order.
    for row in (0, 4):
        assert (predicted[row] == torch.arange(10)).sum() >= 9, predicted[row]
    assert not torch.equal(tiles[0], tiles[4])  # rows are different samplers


@pytest.mark.slow
def test_demo_quality_bar(quick_report):
    _, r = quick_report
    teacher, teacher4, student4 = r["teacher"], r["teacher_4_steps"], r["student"]["4"]
    assert teacher["class_accuracy"] >= 0.90
    assert student4["class_accuracy"] >= teacher["class_accuracy"] - 0.05
    assert student4["fd"] < teacher4["fd"]
    assert r["real_data"]["fd"] < student4["fd"]  # sanity: nothing beats real data


def test_interrupted_demo_writes_no_report(tmp_path, monkeypatch):
    """Ctrl-C during distillation stops the demo: no report on a half-trained student."""
    import cdm_train.demo as demo_mod
    from cdm_train.trainer import Trainer

    def interrupted_train(self, steps=None):
        self.step = 3
        return {"steps": 3, "interrupted": True}

    monkeypatch.setattr(Trainer, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        demo_mod.run_demo(tmp_path, quick=True, progress=False)
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "samples.png").exists()


def test_train_teacher_cli_writes_where_asked(tmp_path, capsys):
    from cdm_train.cli import main
    from cdm_train.digits import DEFAULT_TEACHER_PATH, load_teacher

    shipped = DEFAULT_TEACHER_PATH.read_bytes()
    out = tmp_path / "t.pt"
    assert main(["train-teacher", "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert load_teacher(out) is not None and str(out) in capsys.readouterr().out
    assert DEFAULT_TEACHER_PATH.read_bytes() == shipped
    assert main(["train-teacher", "--out", str(out), "--steps", "0"]) == 2
