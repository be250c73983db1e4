"""benchmarks/cost_model.py: its FLOP accounting against an independent count, and no real memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("diffusers")
import cost_model as cm  # noqa: E402


def _analytic_forward_flops(model, inputs) -> int:
    """2 M N K of every nn.Linear / Conv2d call and 4 B H Sq Sk D of every attention call, from hooks on a real
    (tiny) CPU forward: shapes only, no flop formula shared with the cost model."""
    total = [0]

    def linear_hook(mod, args, out):
        rows = args[0].numel() // mod.in_features
        total[0] += 2 * rows * mod.in_features * mod.out_features

    def conv_hook(mod, args, out):
        kh, kw = mod.kernel_size
        total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw

    handles = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
        elif isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *a, **kw):
        b, h, sq, d = q.shape
        total[0] += 4 * b * h * sq * k.shape[-2] * d
        return sdpa(q, k, v, *a, **kw)

    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    return total[0]


def test_flops_of_a_forward_match_the_analytic_count():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cdm_train.models.sd3 import TINY_ARCH, TINY_TEXT_TOKENS
    from cdm_train.models.sd3 import sd3_from_arch as _sd3_from_arch

    model = _sd3_from_arch(TINY_ARCH, 0)
    b, side = 3, TINY_ARCH["sample_size"]
    inputs = {"hidden_states": torch.randn(b, TINY_ARCH["in_channels"], side, side),
              "encoder_hidden_states": torch.randn(b, TINY_TEXT_TOKENS, TINY_ARCH["joint_attention_dim"]),
              "pooled_projections": torch.randn(b, TINY_ARCH["pooled_projection_dim"]),
              "timestep": torch.full((b,), 500.0)}
    expected = _analytic_forward_flops(model, inputs)
    assert expected > 1e6

    meta = _sd3_from_arch(TINY_ARCH, 0).to("meta")
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    cm.to_fake(meta, fake, torch.device("cpu"))
    cost = cm.CostMode(300.0)
    with cm._patched(torch.nn.functional, "scaled_dot_product_attention", cm._flash_sdpa), fake, cost:
        fake_inputs = {k: fake.from_tensor(v) for k, v in inputs.items()}
        cost.phase = "forward"
        with torch.no_grad():
            out = meta(**fake_inputs).sample
    tally = cost.tallies["forward"]
    assert tally.flops == expected
    assert tally.flops_by_pass["forward no-grad"] == expected
    assert out.shape == inputs["hidden_states"].shape
    # the prediction is a roofline: never faster than the FLOPs at the matmul ceiling
    assert tally.seconds >= expected / (cm.MATMUL_TFLOPS * 1e12) * 0.999


def test_backward_flops_of_a_linear_are_twice_its_forward_and_syncs_are_counted():
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    lin = cm.to_fake(torch.nn.Linear(64, 48, device="meta"), fake, torch.device("cpu"))
    cost = cm.CostMode(300.0)
    with fake, cost:
        x = torch.randn(10, 64, requires_grad=True)
        cost.phase = "fwd"
        y = lin(x)
        cost.phase = "bwd"
        y.sum().backward()
        cost.phase = "sync"
        assert bool(torch.isfinite(y).all())  # a host read of a device value: one sync
    forward = 2 * 10 * 64 * 48
    assert cost.tallies["fwd"].flops == forward
    assert cost.tallies["bwd"].flops == 2 * forward  # grad input + grad weight
    assert cost.tallies["sync"].syncs == 1 and cost.tallies["fwd"].syncs == 0


def test_an_sd3_iteration_on_fake_tensors_allocates_no_real_memory(tmp_path):
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import cost_model as cm
r = cm.run_mode("sd3-medium-shape", "fast", [3], 2, 1, 1024)
s = cm.summarise(r)
print(json.dumps({{"peak_gib": s["peak_gib"], "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "tflop": s["tflop_per_it"], "nfe": s["nfe"], "syncs": s["syncs_per_it"]}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # one SD3-Medium block at 1024 px, batch 2: several GiB live on a GPU; this process never held them
    assert out["peak_gib"] > 4.0
    assert out["maxrss_gib"] < min(2.0, out["peak_gib"] / 2)
    # rollout >= B, fake step B, student 2B, teacher 4B, fake teacher 2B
    assert out["tflop"] > 1.0 and out["nfe"] >= 2 + 2 + 4 + 8 + 4
    assert out["syncs"] == 2  # the two non-finite checks (fake and student optimizer steps)


def test_modelled_iterations_are_the_real_ones():
    """The fake run draws exactly what training draws (schedule length N, indices): its NFE and N equal a real
    tiny Trainer's; with length_from_host_generator, N is the host generator's draw (the measured run's code)."""
    from cdm_train.config import make_config
    from cdm_train.rng import step_random
    from cdm_train.rollout import draw_schedule
    from cdm_train.trainer import Trainer

    steps = [3, 4]
    over = cm.config_overrides("tiny", 4, None, 1024)
    modelled = cm.run_mode("tiny", "fast", steps, 4, None, 1024)["iterations"]
    tr = Trainer(make_config("tiny", overrides=[o for o in over if not o.startswith("train.out_dir")]
                             + ["train.out_dir=/nonexistent/cost-model-test", "speed.backend=reference"]))
    for k, it in zip(steps, modelled):
        tr.step = k
        before = tr.counters["nfe_total"]
        stats = tr.train_step()
        assert (it["nfe"], it["rollout_steps"]) == (tr.counters["nfe_total"] - before, stats["rollout_steps"])
    legacy = cm.run_mode("tiny", "reference", steps, 4, None, 1024, None, True)["iterations"]
    cfg = make_config("tiny", overrides=over)
    for k, it in zip(steps, legacy):
        n = len(draw_schedule(cfg.schedule, step_random(cfg.train.seed, 0, k, torch.device("cpu")).host, None)) - 1
        assert it["rollout_steps"] == n
        assert it["nfe"] == 4 * n + 4 + 3 * 4 + 4 * 4 + 2 * 4  # reference: every row every step, no shared forward
