"""`cdm-train demo`: the embedded default, end to end, on a CPU in minutes.

1. the digits teacher (the checkpoint shipped in the package, or trained if absent);
2. CDM distillation with the ``digits`` preset (student and fake teacher start from the teacher);
3. evaluation (cdm_train.digits.eval): teacher@50 steps with CFG, teacher@4 (plain Euler, same CFG),
   the student at 1/2/4/8 steps (no CFG: guidance is distilled in), and the real-data floor;
4. DIR/report.json, DIR/samples.png, DIR/report.md (+ DIR/distill/: the trainer's checkpoint and log).

See docs/demo.md for the numbers of a full run and the reasons behind the preset.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .jsonutil import dumps as json_dumps

STUDENT_STEPS = (1, 2, 4, 8)
QUICK_TRAIN_STEPS = 200  # the shortened run of tests/test_demo.py (the full run: the preset's 400)
QUICK_PER_CLASS = 50


def _resolve_teacher(out_dir: Path, teacher_path: str | Path | None, progress: bool) -> Path:
    """The teacher checkpoint to distil: an explicit path, the shipped one, or one trained into out_dir."""
    from .digits import DEFAULT_TEACHER_PATH, train_teacher

    if teacher_path is not None:
        return Path(teacher_path)
    if DEFAULT_TEACHER_PATH.is_file():
        return DEFAULT_TEACHER_PATH
    cached = out_dir / "digits_teacher.pt"
    if not cached.is_file():
        print(f"no shipped teacher at {DEFAULT_TEACHER_PATH}: training one into {cached} (a few minutes)")
        train_teacher(cached, progress=progress)
    return cached


def distill(out_dir: str | Path, teacher_path: str | Path | None = None, overrides: list[str] | None = None,
            progress: bool = True):
    """CDM distillation with the digits preset (+ `overrides`, "section.key=value"). Returns the Trainer."""
    from .config import make_config
    from .trainer import Trainer

    base = [f"train.out_dir={Path(out_dir)}", f"train.progress={'true' if progress else 'false'}",
            "train.tensorboard=false"]
    if teacher_path is not None:
        base.append(f"model.teacher_path={Path(teacher_path)}")
    cfg = make_config("digits", overrides=base + list(overrides or []))
    trainer = Trainer(cfg)
    trainer.summary = trainer.train()
    return trainer


def _scores(evaluator, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {k: float(v) for k, v in evaluator.evaluate(images, labels).items()}


def evaluate_student(student: torch.nn.Module, evaluator, steps: tuple[int, ...] = STUDENT_STEPS,
                     per_class: int | None = None, seed: int = 0, progress: bool = False
                     ) -> tuple[dict[str, dict[str, float]], dict[int, torch.Tensor]]:
    """{"1": {"fd", "class_accuracy"}, ...} for the student at each step count (no CFG), and the samples."""
    from .digits.eval import EVAL_PER_CLASS, generate

    per_class = per_class or EVAL_PER_CLASS
    student = student.eval()
    results, samples = {}, {}
    for k in steps:
        images, labels = generate(student, k, None, per_class=per_class, seed=seed, progress=progress,
                                  desc=f"student@{k}")
        results[str(k)] = _scores(evaluator, images, labels)
        samples[k] = images
    return results, samples


def _report_md(report: dict[str, Any]) -> str:
    def row(name: str, r: dict[str, float]) -> str:
        return f"| {name} | {r['fd']:.2f} | {r['class_accuracy']:.3f} |"

    lines = ["# CDM digits demo", "",
             f"FD: Frechet distance to the held-out digits in the classifier's feature space (lower is better); "
             f"{report['eval']['samples']} samples per row ({report['eval']['per_class']} per class). "
             f"Teacher rows use CFG {report['eval']['guidance_scale']}; the student uses none.", "",
             "| sampler | FD | class accuracy |", "|---|---|---|",
             row("real data (floor)", report["real_data"]),
             row(f"teacher @ {report['teacher']['steps']} steps", report["teacher"]),
             row("teacher @ 4 steps", report["teacher_4_steps"])]
    lines += [row(f"student @ {k} step{'s' if k != '1' else ''}", v) for k, v in report["student"].items()]
    t4, s4, t50 = report["teacher_4_steps"], report["student"]["4"], report["teacher"]
    verdict = ("passes" if (t50["class_accuracy"] >= 0.90 and s4["fd"] < t4["fd"]
                            and s4["class_accuracy"] >= t50["class_accuracy"] - 0.05) else "does NOT pass")
    lines += ["", f"Quality bar (teacher@50 accuracy >= 0.90; student@4 accuracy within 5 points of teacher@50 and "
                  f"FD below teacher@4): **{verdict}**.", "",
              f"Distillation: {report['distill']['steps']} iterations in {report['distill']['wall_clock_s']:.0f} s; "
              f"whole demo {report['wall_clock_s']:.0f} s. Samples: samples.png (rows teacher@50, teacher@4, "
              f"student@1/2/4/8; one column per class).", ""]
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "demo_out", quick: bool = False, *, teacher_path: str | Path | None = None,
             overrides: list[str] | None = None, per_class: int | None = None, seed: int = 0,
             progress: bool = True, num_threads: int | None = 1, print_report: bool | None = None) -> dict[str, Any]:
    """Teacher -> CDM distillation (digits preset) -> evaluation; writes report.json, samples.png, report.md.

    progress: tqdm bars (off: the distillation logs plain lines instead, for log files); print_report: the
    report table on stdout at the end (default: with the bars).

    quick: a shortened run (QUICK_TRAIN_STEPS iterations, QUICK_PER_CLASS samples per class), as in
    tests/test_demo.py. `overrides` ("section.key=value") go on top of the digits preset. num_threads: torch
    CPU threads during the demo (restored after; None: leave as is). One thread is the default because these
    tiny models are latency-bound: measured here, two threads on a busy 2-core machine ran 5-10x slower.
    Returns the report.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run_demo(out_dir, quick, teacher_path, overrides, per_class, seed, progress,
                         progress if print_report is None else print_report)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out_dir, quick, teacher_path, overrides, per_class, seed, progress, print_report) -> dict[str, Any]:
    from .digits import load_teacher
    from .digits.eval import EVAL_GUIDANCE_SCALE, EVAL_PER_CLASS, TEACHER_EVAL_STEPS, DigitsEvaluator, generate
    from .images import save_grid

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_class = per_class or (QUICK_PER_CLASS if quick else EVAL_PER_CLASS)
    evaluator = DigitsEvaluator.load_or_train(progress=progress)
    tpath = _resolve_teacher(out, teacher_path, progress)
    teacher = load_teacher(tpath)

    extra = [f"train.steps={QUICK_TRAIN_STEPS}"] if quick else []
    t0 = time.perf_counter()
    trainer = distill(out / "distill", tpath, extra + list(overrides or []), progress=progress)
    distill_s = time.perf_counter() - t0
    if trainer.summary["interrupted"]:  # Ctrl-C: no report on a half-trained student
        print(f"demo interrupted at distillation step {trainer.step}; checkpoint in {out / 'distill'}; "
              "no report written")
        raise KeyboardInterrupt
    student = trainer.ema.module.eval()

    gs = EVAL_GUIDANCE_SCALE
    t50_img, labels = generate(teacher, TEACHER_EVAL_STEPS, gs, per_class=per_class, seed=seed,
                               progress=progress, desc=f"teacher@{TEACHER_EVAL_STEPS}")
    t4_img, _ = generate(teacher, 4, gs, per_class=per_class, seed=seed, progress=progress, desc="teacher@4")
    student_scores, student_img = evaluate_student(student, evaluator, per_class=per_class, seed=seed,
                                                   progress=progress)
    report: dict[str, Any] = {
        "teacher": {"steps": TEACHER_EVAL_STEPS, **_scores(evaluator, t50_img, labels)},
        "teacher_4_steps": {"steps": 4, **_scores(evaluator, t4_img, labels)},
        "student": student_scores,
        "real_data": evaluator.real_data_floor(per_class=per_class),
        "wall_clock_s": 0.0,
        "eval": {"per_class": per_class, "samples": per_class * 10, "guidance_scale": gs, "seed": seed,
                 "classifier_heldout_accuracy": evaluator.classifier_heldout_accuracy, "student_weights": "ema"},
        "distill": {"steps": trainer.step, "wall_clock_s": distill_s, "teacher_path": str(tpath),
                    "config": trainer.cfg.to_dict()},
        "quick": quick,
    }
    # One column per class: the first sample of each class (same noise in every row).
    firsts = torch.arange(10) * per_class
    rows = [t50_img[firsts], t4_img[firsts]] + [student_img[k][firsts] for k in STUDENT_STEPS]
    save_grid(torch.cat(rows), out / "samples.png", nrow=10)
    report["wall_clock_s"] = time.perf_counter() - start
    (out / "report.json").write_text(json_dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_report_md(report))
    if print_report:
        print(_report_md(report))
        print(f"wrote {out / 'report.json'}, {out / 'samples.png'}, {out / 'report.md'}")
    return report
