"""benchmarks/gpu_acceptance.sh --cpu-dry-run: every step of the GPU acceptance run works end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None, reason="needs bash + timeout")
def test_acceptance_script_dry_run_writes_every_figure(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), "--cpu-dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    names = [s["step"] for s in steps if s["step"] != "install_wheels"]  # present when wheels were carried
    # The end-to-end step right after the quick checks: a tight budget cuts the tail, not the figure that matters.
    assert names == ["env", "bench_blocks", "ops", "fp8", "graphs", "bench_step", "bench_attention", "bench_ops",
                     "bench_ops_compile", "pytest_gpu"]
    failed = [s for s in steps if s["rc"] != 0]
    assert not failed, [(s, (out / f"{s['step']}.log").read_text()[-2000:]) for s in failed]
    summary = json.loads((out / "summary.json").read_text())
    figures = {r.get("figure") for r in summary}
    assert {"op_check", "fp8_attention_sqnr", "cuda_graph_loss", "copy_bandwidth", "op_time", "bench_step",
            "attention", "step", "block"} <= figures
    blocks = [r for r in summary if r.get("figure") == "block"]
    assert {r["variant"] for r in blocks} == {"eager", "compiled"} and all(r["rel_err"] < 1e-4 for r in blocks)
    checks = [r for r in summary if r.get("figure") == "op_check"]
    assert len(checks) >= 14 and all(r["passed"] for r in checks)
    assert {r["op"] for r in checks} >= {"euler_extrapolate", "dm_loss", "cfg_loss", "flow_matching_loss seeded"}
    sqnr = [r for r in summary if r.get("figure") == "fp8_attention_sqnr"]
    assert sqnr and all(r["passed"] and r["sqnr_vs_float64_db"] > 20 for r in sqnr)
    compiled = [r for r in summary if r.get("source") == "bench_ops_compile.json" and r.get("figure") == "op_time"
                and r.get("provider") == "compile(reference)"]
    assert compiled and all(r["median_ms"] > 0 for r in compiled)
    from cdm_kernels.ops.utils import cpp_available

    if cpp_available():  # the fused provider on the CPU: its speed-up over the compiled reference is reported
        assert any(r.get("figure") == "speedup_vs_compile" and r["provider"] == "cpp" for r in summary)
    env_record = next(r for r in summary if r.get("source") == "env.json")
    assert env_record["cuda_available"] is False and "diffusers" in env_record["optional"]


def test_bench_attention_times_every_stored_fp8_launch_config_dry_run():
    """The GPU run's --fp8-configs step (gpu_acceptance.sh) times one row per (shape, stored config of the GPU):
    its dry run lists them without a GPU, the default first, the TMA candidate under its own name."""
    import importlib.util as iu

    from cdm_kernels.attention._kernels import config_label, kernel_configs

    spec = iu.spec_from_file_location("bench_attention_dry", ROOT / "benchmarks" / "bench_attention.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert "--fp8-configs" in (ROOT / "benchmarks" / "gpu_acceptance.sh").read_text()  # the GPU run asks for it
    lines = bench.main(["--device", "cpu", "--fp8-configs", "--dry-run", "--capability", "90"])
    expected = [(name, config_label(c)) for name, _b, _h, _s, d in bench.GPU_SHAPES for c in kernel_configs(d, (9, 0))]
    assert len(lines) == len(expected) and len(lines) > len(bench.GPU_SHAPES)  # several candidates per shape
    for line, (name, label) in zip(lines, expected):
        assert line.startswith(f"fp8-config {name} ") and line.split(": ", 1)[1].startswith(label), line
    assert sum("(stored default)" in ln for ln in lines) == len(bench.GPU_SHAPES)
    assert any(ln.endswith(" tma") for ln in lines)
    # a GPU without stored candidates (sm_89): one config per shape, its default
    assert len(bench.main(["--device", "cpu", "--fp8-configs", "--dry-run", "--capability", "89"])) == len(
        bench.GPU_SHAPES)
    with pytest.raises(SystemExit):  # a dry run of nothing is a usage error
        bench.main(["--device", "cpu", "--dry-run"])
