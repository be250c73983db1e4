"""train.parallel=ddp|fsdp on CPU with gloo and 2 processes (torch.multiprocessing.spawn).

Equivalence is checked where it is exact: per-rank losses are batch means, so the mean over
ranks of the per-rank gradients of per-rank half batches equals the single-process gradient of
the whole batch. The inputs are constructed explicitly (not drawn from the per-rank RNG), the
losses are the trainer's own loss ops, and the comparison continues through one optimizer step
(clipping, AdamW), the fake <- student merge and the EMA update, on full (gathered) parameters.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
GLOBAL_BATCH = 4


def _spawn(fn, world: int, *args) -> None:
    # Rendezvous through a file in a fresh directory, not a TCP port: a "free port" picked up front and
    # released can be taken by another process (another suite, another job) before rank 0 binds it.
    # gloo's own connections bind port 0 themselves.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cdm-gloo-") as tmp:  # removed afterwards: nothing left in /tmp
        store = Path(tmp) / "store"
        mp.spawn(fn, args=(world, str(store), *args), nprocs=world, join=True)


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # never inherited from a torchrun around pytest
        os.environ.pop(k, None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _config(out: Path, *overrides: str):
    from cdm_train.config import make_config

    base = [f"train.out_dir={out}", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
            "speed.backend=reference", "schedule.max_steps=3", "train.batch_size=2"]
    return make_config("tiny", overrides=base + list(overrides))


def _perturbed_models(cfg):
    """Fresh tiny models with fake and student moved off the teacher (else every DM shift is 0)."""
    from cdm_train.models.build import build_models

    models = build_models(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        for net, scale in ((models.fake, 0.05), (models.student, 0.02)):
            for p in net.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return models


def _explicit_batch(models):
    g = torch.Generator().manual_seed(5)
    b, shape = GLOBAL_BATCH, models.latent_shape
    return {
        "cond": models.sample_cond(b, g),
        "x0": torch.randn(b, *shape, generator=g),
        "x_i": torch.randn(b, *shape, generator=g),
        "s_i": torch.rand(b, generator=g) * 0.8 + 0.1,
        "s_fake": torch.rand(b, generator=g) * 0.9 + 0.05,
        "s_dm": torch.rand(b, generator=g) * 0.9 + 0.05,
        "s_ca": torch.rand(b, generator=g) * 0.5 + 0.02,
        "n_fake": torch.randn(b, *shape, generator=g),
        "n_dm": torch.randn(b, *shape, generator=g),
        "n_ca": torch.randn(b, *shape, generator=g),
    }


def _rows(batch, rows: slice):
    from cdm_train.cond import cond_select

    return {k: (cond_select(v, rows) if k == "cond" else v[rows]) for k, v in batch.items()}


def _explicit_step(tr, batch) -> None:
    """Fake step (+ merge) then student step (+ EMA) on an explicit batch, with the trainer's own pieces."""
    import cdm_kernels as ck
    from cdm_train.distributed import lerp_local_

    m, cfg = tr.models, tr.cfg
    c = batch["cond"]
    with ck.use_backend("reference"):
        xt = ck.renoise(batch["x0"], batch["s_fake"], batch["n_fake"])
        loss_fake = ck.flow_matching_loss(m.adapter(m.fake, xt, batch["s_fake"], c), batch["x0"], batch["n_fake"])
        loss_fake.backward()
        assert tr._optimizer_step(m.fake, tr.fake_opt, loss_fake)
        lerp_local_(m.fake, m.student, cfg.optim.fake_merge_decay)

        x_i, s_i = batch["x_i"], batch["s_i"]
        v = m.adapter(m.student, x_i, s_i, c)
        x0 = x_i - s_i.view(-1, 1, 1, 1) * v.detach()
        xt_dm = ck.renoise(x0, batch["s_dm"], batch["n_dm"])
        xt_ca = ck.renoise(x0, batch["s_ca"], batch["n_ca"])
        with torch.no_grad():
            real = m.adapter(m.teacher, xt_dm, batch["s_dm"], c)
            fake = m.adapter(m.fake, xt_dm, batch["s_dm"], c)
            v_cond = m.adapter(m.teacher, xt_ca, batch["s_ca"], c)
            v_uncond = m.adapter(m.teacher, xt_ca, batch["s_ca"], m.adapter.uncond(c))
        loss = ck.dm_loss(v, real, fake, x_i, xt_dm, s_i, batch["s_dm"]) + ck.cfg_loss(
            v, v_cond, v_uncond, x_i, xt_ca, s_i, batch["s_ca"], guidance_scale=cfg.loss.guidance_scale)
        loss.backward()
        tr._last_student_grads = [_full(p.grad).clone() for p in m.student.parameters()]
        assert tr._optimizer_step(m.student, tr.student_opt, loss)
        lerp_local_(tr.ema.module, m.student, tr.ema.decay)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _full_params(module) -> list[torch.Tensor]:
    return [_full(p).clone() for p in module.parameters()]


def _equivalence_and_resume_worker(rank: int, world: int, store: str, tmp: str, mode: str) -> None:
    try:
        from cdm_train.trainer import Trainer

        tmp_path = Path(tmp)
        _init(rank, world, store)
        # (1) single process, the whole batch (each rank computes it: no collective involved)
        # optim.eps=1e-3: Adam's first step is g / (|g| + eps); with the default 1e-8, elements whose
        # gradient is at the rounding level would move by up to lr in either run, hiding real errors.
        ref_cfg = _config(tmp_path / f"ref{rank}", "optim.eps=1e-3")
        ref = Trainer(ref_cfg, models=_perturbed_models(ref_cfg))
        batch = _explicit_batch(ref.models)
        _explicit_step(ref, batch)
        # (2) world ranks, rows [rank * B/world, (rank + 1) * B/world) each
        cfg = _config(tmp_path / "eq", f"train.parallel={mode}", "optim.eps=1e-3")
        tr = Trainer(cfg, models=_perturbed_models(cfg))
        assert tr.rank == rank and tr.parallel.world_size == world
        per = GLOBAL_BATCH // world
        _explicit_step(tr, _rows(batch, slice(rank * per, (rank + 1) * per)))
        report = {"grad_max_err": 0.0, "param_max_err": 0.0, "grad_scale": 0.0}
        for a, b in zip(tr._last_student_grads, ref._last_student_grads):
            report["grad_max_err"] = max(report["grad_max_err"], float((a - b).abs().max()))
            report["grad_scale"] = max(report["grad_scale"], float(b.abs().max()))
        for mine, theirs in ((tr.models.student, ref.models.student), (tr.models.fake, ref.models.fake),
                             (tr.ema.module, ref.ema.module)):
            for a, b in zip(_full_params(mine), theirs.parameters()):
                report["param_max_err"] = max(report["param_max_err"], float((a - b).detach().abs().max()))
        report["teacher_local_numel"] = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                            for p in tr.models.teacher.parameters())
        report["teacher_numel"] = sum(p.numel() for p in ref.models.teacher.parameters())
        del tr
        # (3) checkpoint written by `world` ranks, resumed on `world` ranks: identical losses
        run = [f"train.parallel={mode}", "train.steps=4", "train.checkpoint_every=2"]
        straight = Trainer(_config(tmp_path / "straight", *run))
        straight.train()
        first = Trainer(_config(tmp_path / "resumed", *run))
        first.train(steps=2)
        resumed = Trainer(_config(tmp_path / "resumed", *run))
        resumed.resume()
        report["resumed_step"] = resumed.step
        resumed.train()
        report["straight"] = [[r["step"], r["loss_fake"], r.get("loss_student")] for r in straight.history]
        report["resumed"] = [[r["step"], r["loss_fake"], r.get("loss_student")]
                             for r in first.history + resumed.history]
        report["ema_equal"] = all(torch.equal(a, b) for a, b in zip(_full_params(straight.ema.module),
                                                                     _full_params(resumed.ema.module)))
        final = _full_params(resumed.models.student)  # a collective under FSDP: every rank gathers
        if rank == 0:
            torch.save(final, tmp_path / "final_student.pt")
        (tmp_path / f"report{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    except Exception:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reshard_worker(rank: int, world: int, store: str, tmp: str) -> None:
    """An FSDP checkpoint written by 2 ranks, loaded on `world` ranks (DCP reshards)."""
    from cdm_train.trainer import Trainer

    _init(rank, world, store)
    try:
        tr = Trainer(_config(Path(tmp) / "resumed", "train.parallel=fsdp", "train.steps=4"))
        tr.resume()
        saved = torch.load(Path(tmp) / "final_student.pt")
        err = max(float((a - b).abs().max()) for a, b in zip(_full_params(tr.models.student), saved))
        (Path(tmp) / f"reshard{rank}.json").write_text(json.dumps({"step": tr.step, "err": err}))
    finally:
        dist.destroy_process_group()


def _run_mode(tmp_path, mode: str) -> list[dict]:
    try:
        _spawn(_equivalence_and_resume_worker, WORLD, str(tmp_path), mode)
    except Exception:
        errors = "\n".join(p.read_text() for p in tmp_path.glob("error*.txt"))
        pytest.fail(f"{mode} workers failed:\n{errors}")
    return [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(WORLD)]


def _check_report(reports: list[dict]) -> None:
    for rep in reports:
        # fp32, summation order differs (batch split + all-reduce): errors are rounding-sized
        assert rep["grad_scale"] > 1e-4
        assert rep["grad_max_err"] <= 1e-5 * rep["grad_scale"] + 1e-7, rep
        assert rep["param_max_err"] <= 1e-6, rep
        assert rep["resumed_step"] == 2
        assert rep["resumed"] == rep["straight"], rep
        assert rep["ema_equal"]
    assert reports[0]["straight"] == reports[1]["straight"]  # logged losses are means over ranks
    assert [r[0] for r in reports[0]["straight"]] == [1, 2, 3, 4]


def test_ddp_matches_single_process_and_resumes(tmp_path):
    reports = _run_mode(tmp_path, "ddp")
    _check_report(reports)
    assert reports[0]["teacher_local_numel"] == reports[0]["teacher_numel"]  # DDP: full copies
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    log = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # rank 0 alone writes the log
    # A DDP checkpoint is an ordinary checkpoint: a single process resumes it.
    from cdm_train.trainer import Trainer

    single = Trainer(_config(tmp_path / "resumed"))
    single.resume()
    assert single.step == 4


def test_fsdp_matches_single_process_resumes_and_reshards(tmp_path):
    reports = _run_mode(tmp_path, "fsdp")
    _check_report(reports)
    # The frozen teacher is sharded too: no rank holds a full copy. (Local shards are padded to
    # ceil(dim0 / world) rows, which matters for the tiny model's many small tensors: 64% here.)
    for rep in reports:
        assert rep["teacher_local_numel"] < 0.7 * rep["teacher_numel"]
    ckpt_dir = tmp_path / "resumed" / "checkpoint_dcp"
    assert (ckpt_dir / ".metadata").is_file() and (ckpt_dir / "meta.pt").is_file()
    # A different world size: DCP reshards the 2-rank checkpoint onto 1 rank.
    _spawn(_reshard_worker, 1, str(tmp_path))
    rep = json.loads((tmp_path / "reshard0.json").read_text())
    assert rep["step"] == 4 and rep["err"] == 0.0


def test_parallel_without_a_launch_is_a_config_error(tmp_path, monkeypatch):
    from cdm_train.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path), "--no-progress",
                 "--set", "train.parallel=ddp"]) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path), "--no-progress"]) == 2
    assert main(["config", "--preset", "tiny", "--set", "train.parallel=zero"]) == 2


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from cdm_kernels.graphs import checkpoint_policy, find_blocks
    from cdm_train.trainer import Trainer

    grads = []
    for policy in ("none", "full", "selective", "selective+full:1"):
        cfg = _config(tmp_path / policy.replace(":", "_"), f"train.grad_checkpointing={policy}")
        tr = Trainer(cfg, models=_perturbed_models(cfg))
        for net in (tr.models.student, tr.models.fake):
            policies = [checkpoint_policy(b) for b in find_blocks(net)]
            if "+" in policy:  # the mixed plan: the first block selective, the others full
                assert len(policies) >= 2 and policies[0] == "selective" and set(policies[1:]) == {"full"}
            else:
                assert set(policies) == {policy}
        _explicit_step(tr, _explicit_batch(tr.models))
        grads.append(tr._last_student_grads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def _compiled_worker(rank: int, world: int, store: str, tmp: str, mode: str) -> None:
    """Compiled blocks (+ a mixed checkpointing plan: one block selective, the rest full) under DDP / FSDP2: the
    same losses as the eager run, no graph break, and compile before wrapping (the blocks FSDP shards are the
    compiled ones)."""
    from torch._dynamo.utils import counters

    from cdm_kernels.graphs import find_blocks, is_compiled
    from cdm_train.trainer import Trainer

    _init(rank, world, store)
    try:
        runs = {}
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            extra = ["speed.compile_blocks=true", "speed.compile_backend=aot_eager"] if compiled else []
            tr = Trainer(_config(Path(tmp) / f"{mode}{compiled}", f"train.parallel={mode}", "optim.update_ratio=1",
                                 "train.grad_checkpointing=selective+full:1", *extra))
            losses = []
            for k in range(2):
                tr.step = k
                stats = tr.train_step()
                losses.append([float(tr.parallel.mean(stats[key])) for key in ("loss_fake", "loss_student")])
            runs[compiled] = losses
            if compiled:
                blocks = find_blocks(tr.models.student)
                runs["all_compiled"] = bool(blocks) and all(is_compiled(b) for b in blocks)
                runs["graph_breaks"] = sum(counters["graph_break"].values())
            del tr
        (Path(tmp) / f"compiled{rank}.json").write_text(json.dumps(runs))
    except Exception:
        (Path(tmp) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compiled_blocks_under_ddp_and_fsdp_match_eager(tmp_path, mode):
    try:
        _spawn(_compiled_worker, WORLD, str(tmp_path), mode)
    except Exception:
        pytest.fail("workers failed:\n" + "\n".join(p.read_text() for p in tmp_path.glob("error*.txt")))
    for rank in range(WORLD):
        rep = json.loads((tmp_path / f"compiled{rank}.json").read_text())
        assert rep["all_compiled"] and rep["graph_breaks"] == 0
        for a, b in zip(rep["true"], rep["false"]):
            assert a == pytest.approx(b, rel=1e-4)


def test_single_process_cuda_device_gets_an_index(monkeypatch):
    """train.device=cuda (or auto on a GPU): torch 2.11's set_device rejects an index-less device.

    Seen on the H200 (2026-12-04): every single-GPU Trainer crashed in resolve_device. The fake set_device
    below rejects what torch 2.11's does, so this fails without the fix on any machine.
    """
    from cdm_train.distributed import Parallel

    calls = []

    def strict_set_device(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        calls.append(device)

    monkeypatch.setattr(torch.cuda, "set_device", strict_set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert Parallel().resolve_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert Parallel().resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 3), torch.device("cuda", 1)]
    assert Parallel().resolve_device(torch.device("cpu")) == torch.device("cpu")
