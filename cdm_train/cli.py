"""`cdm-train`: the command-line interface of the CDM trainer.

    cdm-train train [--preset NAME] [--config FILE] [--set key=value ...] [--resume [PATH] | --overwrite]
    cdm-train sample --checkpoint RUN_DIR_OR_FILE [--steps 4] [--num 16] [--out FILE.png]
    cdm-train eval (--checkpoint RUN | --pipeline DIR) --prompts FILE [--num 1000] [--inception FILE
                   (--reference DIR | --reference-stats FILE.npz)] [--clip DIR] [--teacher DIR] [--out DIR]
    cdm-train demo [--out DIR] [--quick]
    cdm-train train-teacher [--out FILE] [--steps N] [--seed S]
    cdm-train config [--preset NAME] [--config FILE] [--set key=value ...]

Exit codes: 0 success; 1 training diverged (or an internal error: a bug, with its traceback); 2 anything the user
can fix (bad config, arguments, missing or damaged files, a backend this machine lacks, a run directory in the way,
out of GPU memory), one message, a traceback only with --debug; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from .checkpoint import RUN_CONFIG_NAME
from .config import ConfigError, make_config, reference_mode, to_yaml
from .errors import CheckpointError
from .models import PRESETS


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named configuration: digits (embedded default), tiny (tests), sd3-medium "
                        "(local diffusers dir, see --set model.path=...), sd3-medium-shape (random init, benchmarks)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML file with sections model/schedule/loss/optim/speed/train (see docs/configuration.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=20 (repeatable; applied last)")


def _eval_args(sub) -> None:
    v = sub.add_parser("eval", help="FID and CLIP score of N student samples against your own images",
                       description="Sample N prompts (cycled; seeds from MD5 of the prompt, as the official "
                       "evaluation) with a run's student or an exported pipeline, then FID against a folder of your "
                       "images (or precomputed statistics) with a LOCAL Inception file, and CLIP score with a LOCAL "
                       "CLIP directory. Writes report.md, report.json and samples.png to --out. Reference "
                       "statistics are cached. Under torchrun the samples are split across ranks.")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory or checkpoint file (its model.path needs text encoders)")
    src.add_argument("--pipeline", help="a pipeline directory written by `cdm-train export`")
    v.add_argument("--prompts", required=True, help="text file, one prompt per line, or JSONL {\"prompt\": ...}")
    v.add_argument("--num", type=int, default=1000, help="number of samples N (default 1000)")
    v.add_argument("--steps", type=int, default=None,
                   help="student steps (default: the trained schedule; another count: uniform sigmas, shifted)")
    v.add_argument("--weights", choices=["ema", "student"], default="ema", help="--checkpoint weights (default ema)")
    v.add_argument("--inception", default=None, metavar="FILE",
                   help="Inception-v3 weights for FID: TorchScript inception-2015-12-05.pt (clean-fid / StyleGAN), "
                        "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth (needs torch-fidelity)")
    ref = v.add_mutually_exclusive_group()
    ref.add_argument("--reference", default=None, metavar="DIR", help="folder of your reference images (>= N)")
    ref.add_argument("--reference-stats", default=None, metavar="FILE.npz", help="precomputed mu/sigma statistics")
    v.add_argument("--max-reference", type=int, default=None, help="use the first K reference images (sorted)")
    v.add_argument("--stats-cache", default=None, metavar="DIR",
                   help="reference statistics cache (default ~/.cache/cdm-kernels/fid-stats; '' to disable)")
    v.add_argument("--clip", default=None, metavar="DIR", help="local CLIP model directory (transformers format)")
    v.add_argument("--teacher", default=None, metavar="DIR",
                   help="baseline row: a teacher diffusers pipeline directory, sampled at its own scheduler")
    v.add_argument("--teacher-steps", type=int, default=50, help="teacher steps (default 50, as the official)")
    v.add_argument("--teacher-guidance", type=float, default=4.5, help="teacher CFG (default 4.5, as the official)")
    v.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    v.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)")
    v.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
    _progress_args(v)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm-train", description="Continuous-Time Distribution Matching "
                                     "(CDM) distillation of flow-matching transformers into few-step students.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default INFO)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not only its message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="run CDM distillation", description="Run CDM distillation. Config = defaults "
                       "(official SD3 recipe, batch size and length aside) <- preset <- --config FILE <- --set "
                       "overrides <- the flags below.")
    _config_args(t)
    t.add_argument("--steps", type=int, default=None, help="total iterations (train.steps)")
    t.add_argument("--out", default=None, help="run directory for checkpoint.pt, log.jsonl, tensorboard/ "
                   "(train.out_dir)")
    t.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (train.device)")
    t.add_argument("--batch-size", type=int, default=None, help="samples per iteration (train.batch_size)")
    t.add_argument("--backend", choices=["auto", "reference", "triton", "cpp"], default=None,
                   help="cdm_kernels backend for the fused ops (speed.backend)")
    t.add_argument("--reference-mode", action="store_true",
                   help="switch every acceleration off (reference backend, no shared forward, no early exit, "
                        "no batched teacher calls): the baseline for benchmarks")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from a checkpoint (a file or run dir; bare --resume: the run dir's checkpoint)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out directory that holds one: its files (checkpoint, log, config) "
                        "are moved into --out/replaced-<time>/ first (without it, such a directory is refused)")
    _progress_args(t, "no progress bar: one plain line per train.log_every steps on stdout")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often fastest for small models on busy CPUs)")

    s = sub.add_parser("sample", help="generate images from a checkpoint at any step count",
                       description="Sample a trained student. Digits/tiny runs: a PNG grid (--out FILE.png). Runs on a "
                       "diffusers model (sd3-medium): VAE-decoded PNGs in the --out directory, from --prompt/--prompts "
                       "when the model has text encoders, else from the run's precomputed embeddings; the trained "
                       "few-step schedule and the model's shift. --pipeline: an exported pipeline.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file or run directory")
    src.add_argument("--pipeline", help="a pipeline directory written by `cdm-train export`")
    s.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; diffusers runs)")
    s.add_argument("--prompts", default=None, help="a text file, one prompt per line (diffusers runs)")
    s.add_argument("--steps", type=int, default=None,
                   help="Euler steps (default: 4; diffusers runs: the trained schedule's length)")
    s.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    s.add_argument("--guidance", type=float, default=None,
                   help="CFG scale at sampling time (default: none; the student has guidance distilled in)")
    s.add_argument("--weights", choices=["ema", "student"], default="ema", help="which student weights (default ema)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")

    x = sub.add_parser("export", help="write a trained student as a diffusers pipeline, transformer or LoRA file",
                       description="Export a run's student (EMA weights by default) for diffusers: --format pipeline "
                       "(the teacher's other components + the student transformer + the trained schedule), "
                       "transformer, or lora (load with pipe.load_lora_weights(DIR); a LoRA student's adapter, or "
                       "a full student's SVD approximation at --lora-rank).")
    x.add_argument("--checkpoint", required=True, help="run directory (checkpoint.pt or checkpoint_dcp/) or file")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--format", default="pipeline", choices=["pipeline", "transformer", "lora"])
    x.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="export the student EMA (default) or, with --no-ema, the raw student")
    x.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights dtype (default bf16)")
    x.add_argument("--link", action="store_true",
                   help="symlink the teacher's other components (text encoders, VAE) instead of copying them")
    x.add_argument("--lora-rank", type=int, default=None,
                   help="--format lora of a full student: rank of the SVD-extracted LoRA (default lora.rank)")

    _eval_args(sub)

    d = sub.add_parser("demo", help="the embedded default: digits teacher -> 4-step student, with a quality report")
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    d.add_argument("--quick", action="store_true", help="a shortened run (for smoke tests)")
    _progress_args(d)

    tt = sub.add_parser("train-teacher", help="train the digits teacher (flow matching on sklearn digits)")
    tt.add_argument("--out", default="runs/digits_teacher.pt",
                    help="checkpoint path (default runs/digits_teacher.pt; the shipped teacher is not overwritten)")
    tt.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped teacher's)")
    tt.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    tt.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as the shipped teacher was trained)")
    _progress_args(tt)

    e = sub.add_parser("encode-prompts", help="precompute text embeddings (SD3 / Flux text encoders) for training",
                       description="Encode a prompt file with the pipeline's own text encoders into sharded "
                       "safetensors + index.json (use the directory as model.prompt_embeds).")
    e.add_argument("--model", required=True, help="local diffusers pipeline directory (SD3 or Flux)")
    e.add_argument("--prompts", required=True, help="UTF-8 text file, one prompt per line, or JSONL {\"prompt\": ...}")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call (default 16)")
    e.add_argument("--shard-rows", type=int, default=4096, help="rows per safetensors shard (default 4096)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="encoder and storage dtype (default bfloat16)")
    e.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default 256, as SD3 training)")

    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    _config_args(c)
    for command in sub.choices.values():  # --debug also after the command (SUPPRESS: never resets the global one)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an error, not only its message")
    return parser


def _progress_args(parser, without: str = "no progress bars") -> None:
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true",
                     help=f"{without} (the default when stderr is not a terminal, e.g. a cluster job's log file)")
    bar.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")


def _bars(args) -> bool:
    """Progress bars: --progress / --no-progress, else only on a terminal (no carriage returns in log files)."""
    if getattr(args, "progress", False):
        return True
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _train_config(args, default_preset: str = "digits"):
    """Defaults <- preset <- --config <- --set <- the flags, built once (see config.make_config)."""
    flag_map = {"steps": "train.steps", "out": "train.out_dir", "device": "train.device",
                "batch_size": "train.batch_size", "backend": "speed.backend"}
    extra = [f"{key}={getattr(args, attr)}" for attr, key in flag_map.items() if getattr(args, attr, None) is not None]
    if getattr(args, "no_progress", False):
        extra.append("train.progress=false")
    if getattr(args, "progress", False):
        extra.append("train.progress=true")
    if getattr(args, "reference_mode", False):
        extra.append("speed.backend=reference")  # so the input check judges the backend the run will use
    # check_inputs: model files, device and backend checked here too, so one report names every problem.
    cfg = make_config(args.preset, args.config, list(args.overrides) + extra, default_preset=default_preset,
                      check_inputs=True)
    if getattr(args, "reference_mode", False):
        reference_mode(cfg)
    return cfg


def _run_dir_of(resume: str, out: str | None) -> Path:
    """The run directory `--resume [PATH]` refers to (PATH may be a checkpoint file or a run dir)."""
    if resume:
        path = Path(resume)
        return path.parent if path.is_file() or path.suffix == ".pt" else path
    if out:
        return Path(out)
    return Path(make_config(default_preset="digits").train.out_dir)


def _resume_config(args):
    """`--resume` without --preset/--config: the run's own config (its config.yaml) <- --set <- the flags."""
    run_dir = _run_dir_of(args.resume, args.out)
    saved = run_dir / RUN_CONFIG_NAME
    if not saved.is_file():
        raise ConfigError(f"--resume: {str(saved)!r} not found, so the run's config is unknown; pass the config the "
                          f"run was started with (--preset/--config/--set) or --out of a run directory")
    flags = argparse.Namespace(**{**vars(args), "preset": None, "config": str(saved)})
    if not args.out:
        flags.out = str(run_dir)
    return _train_config(flags)


def cmd_train(args) -> int:
    from .trainer import Trainer, TrainingDiverged

    own_config = args.preset is None and args.config is None
    cfg = _resume_config(args) if args.resume is not None and own_config else _train_config(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.resume is not None and args.overwrite:
        raise ConfigError("--overwrite starts a new run and --resume continues one: pass one of them")
    if args.resume is None:  # a new run: never over an old one by mistake (before anything is built or written)
        from .runs import guard_run_dir

        moved = guard_run_dir(cfg.train.out_dir, overwrite=args.overwrite, is_main=_launch_rank() == 0)
        if moved is not None:
            print(f"cdm-train: --overwrite: moved the previous run's files to {moved}", file=sys.stderr)
    trainer = Trainer(cfg)  # under torchrun with train.parallel=ddp|fsdp: joins the process group
    try:
        if args.resume is not None:
            trainer.resume(args.resume or None)
        summary = trainer.train()
    except TrainingDiverged as exc:
        print(f"cdm-train: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.parallel.close()
    if not trainer.parallel.is_main:
        return 130 if summary["interrupted"] else 0
    print(json.dumps({k: v for k, v in summary.items() if k != "last"}))
    if summary["interrupted"]:
        print(f"stopped at step {summary['steps']}; resume with: cdm-train train --out {cfg.train.out_dir} "
              f"--resume", file=sys.stderr)
        return 130
    return 0


def _launch_rank() -> int:
    """This process's rank as torchrun announces it (0 without torchrun), before the process group exists."""
    import os

    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def cmd_sample(args) -> int:
    import torch

    from .config import config_from_dict
    from .images import save_grid
    from .models.build import build_teacher, resolve_device, resolve_shift
    from .sampling import sample_euler, uniform_sigmas

    if (args.steps is not None and args.steps < 1) or args.num < 1:
        raise ConfigError("--steps and --num must be >= 1")
    device = resolve_device(args.device)
    prompts = list(args.prompt or [])
    if args.prompts:
        from .prompts import read_prompts

        prompts += read_prompts(args.prompts)
    if args.pipeline:
        from .sample_images import sample_pipeline

        paths = sample_pipeline(args.pipeline, args.out, prompts=prompts, seed=args.seed, device=device)
        print(f"wrote {len(paths)} images to {Path(args.out)}")
        return 0
    from .runs import load_run

    state = load_run(args.checkpoint)
    cfg = config_from_dict(state["config"])
    if cfg.model.path and cfg.model.preset != "digits":  # a diffusers model: decode with its VAE
        from .sample_images import sample_checkpoint

        out = Path(args.out).with_suffix("") if Path(args.out).suffix == ".png" else Path(args.out)
        paths = sample_checkpoint(args.checkpoint, out, num=args.num, steps=args.steps, seed=args.seed,
                                  ema=args.weights == "ema", prompts=prompts or None, device=device)
        print(f"wrote {len(paths)} images to {out} (prompts in {out / 'prompts.txt'})")
        return 0
    args.steps = 4 if args.steps is None else args.steps
    model, adapter, sample_cond, latent = build_teacher(cfg, device)
    model.load_state_dict(state["ema" if args.weights == "ema" else "student"])
    model = model.float().eval()
    gen = torch.Generator().manual_seed(args.seed)
    if cfg.model.preset == "digits":
        from .digits import NUM_CLASSES

        cond = (torch.arange(args.num) % NUM_CLASSES).to(device)
    else:
        cond = sample_cond(args.num, gen)
    noise = torch.randn((args.num, *latent), generator=gen).to(device)
    # The schedule the student was trained for: a fixed training schedule of this length, else uniform; both
    # shifted as the model's scheduler shifts them (as the official inference does through the pipeline).
    fixed = cfg.schedule.fixed
    base = [float(s) for s in fixed] + [0.0] if fixed is not None and len(fixed) == args.steps else None
    shift = resolve_shift(cfg)
    sigmas = base if base is not None else uniform_sigmas(args.steps)
    images = sample_euler(model, adapter, cond, noise, args.steps, guidance_scale=args.guidance, sigmas=sigmas,
                          shift=shift)
    path = save_grid(images, args.out, nrow=min(args.num, 10))
    print(f"wrote {path} ({args.num} samples, {args.steps} steps, shift {shift}, step {state['step']} "
          f"{args.weights} weights)")
    return 0


def cmd_eval(args) -> int:
    from .evaluation.runner import EvalOptions, evaluate

    opts = EvalOptions(**{k: getattr(args, k) for k in EvalOptions.__dataclass_fields__ if k != "progress"},
                       progress=_bars(args))
    report = evaluate(opts)
    for row in report.get("rows", []):
        metrics = ", ".join(f"{k} {row[k]:.4g}" for k in ("fid", "clip_score") if row.get(k) is not None)
        print(f"{row['name']}: {metrics} (N {row['num']}, {row['steps']} steps)")
    if report:
        print(f"wrote {Path(args.out) / 'report.md'} and report.json")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=_bars(args), print_report=True)
    return 0


def cmd_train_teacher(args) -> int:
    from .digits import train_teacher

    if args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    kwargs = {"seed": args.seed, "num_threads": args.threads, "progress": _bars(args)}
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError("--steps must be >= 1")
        kwargs["steps"] = args.steps
    train_teacher(args.out, **kwargs)
    print(f"wrote {args.out}; use it with: cdm-train train --set model.teacher_path={args.out}")
    return 0


def cmd_export(args) -> int:
    from .export import META_NAME, export

    out = export(args.checkpoint, args.out, fmt=args.format, ema=args.ema, dtype=args.dtype, link=args.link,
                 lora_rank=args.lora_rank)
    meta = json.loads((out / META_NAME).read_text())
    if "lora_extraction" in meta:
        ex = meta["lora_extraction"]
        print(f"LoRA extracted from a full student by SVD (rank {ex['rank']}, {ex['modules']} linears): relative "
              f"error on the targeted weight deltas {ex['target_delta_relative_error']:.3g}; share of the student's "
              f"change outside the targets (kept at the teacher's values) {ex['untargeted_delta_fraction']:.3g}")
    shift = (f"shift {meta['shift']}" if meta["shift"] is not None
             else f"its dynamic shift, mu {meta['dynamic_shift_mu']:.4g}")
    print(f"wrote {out} ({args.format}, {'EMA' if args.ema else 'raw'} weights, {args.dtype}); sample with "
          f"sigmas={meta['sigmas']} (the scheduler applies {shift})")
    return 0


def cmd_config(args) -> int:
    cfg = make_config(args.preset, args.config, args.overrides, default_preset="digits")
    print(to_yaml(cfg), end="")
    return 0


def cmd_encode_prompts(args) -> int:
    from .encode import encode_prompts

    out = encode_prompts(args.model, args.prompts, args.out, batch_size=args.batch_size, shard_rows=args.shard_rows,
                         device=args.device, dtype=args.dtype, max_sequence_length=args.max_sequence_length)
    print(f"wrote {out / 'index.json'}")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "demo": cmd_demo, "train-teacher": cmd_train_teacher,
            "config": cmd_config, "encode-prompts": cmd_encode_prompts, "export": cmd_export, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("cdm-train: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted below: the user's to fix (2) or a bug (re-raised)
        message = user_error_message(exc)
        if message is None:
            raise  # not the user's doing: the traceback is the bug report (exit 1)
        if args.debug:
            traceback.print_exc()
        print(f"cdm-train: {message}", file=sys.stderr)
        return 2


def user_error_message(exc: BaseException) -> str | None:
    """The one-line report of a failure the user can fix (exit 2), or None for anything else."""
    import torch

    if isinstance(exc, CheckpointError):
        return f"checkpoint error: {exc}"
    if isinstance(exc, ConfigError):
        return f"config error: {exc}"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        first = (str(exc).strip().splitlines() or [""])[0]
        return (f"out of GPU memory ({first[:200]}). Lower train.batch_size, or see the README's 'GPU memory: what "
                f"fits': LoRA (lora.student/lora.fake), train.parallel=fsdp, train.grad_checkpointing")
    return None


if __name__ == "__main__":
    sys.exit(main())
