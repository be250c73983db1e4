"""benchmarks/cost_model.py's modelled switches: compiled blocks, FP8 teacher linears, checkpointing plans."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("diffusers")
import cost_model as cm  # noqa: E402

# One SD3-Medium-width block pair at a small image (fake tensors: no memory, seconds of CPU).
SHAPE = dict(preset="sd3-medium-shape", steps=[3], batch=2, layers=2, resolution=256)
EW = "elementwise / reduction / optimizer"


def _run(*over, mode="fast", official_plan=False, **shape):
    s = {**SHAPE, **shape}
    return cm.summarise(cm.run_mode(s["preset"], mode, s["steps"], s["batch"], s["layers"], s["resolution"],
                                    list(over), official_plan=official_plan))


@pytest.fixture(scope="module")
def eager():
    return _run()


def test_compiled_blocks_reprice_only_the_elementwise_work_inside_blocks(eager):
    compiled = _run("speed.compile_blocks=true")
    ratios = cm.CompiledBlocks.load("sd3", "none")
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["nfe"] == eager["nfe"]  # the same iteration
    assert compiled["tflop_per_it"] == pytest.approx(eager["tflop_per_it"])
    for kind in ("matmul", "attention"):
        assert compiled["ms_by_kind"][kind] == pytest.approx(eager["ms_by_kind"][kind])
    moved = compiled["ms_by_kind"]["elementwise (compiled blocks)"]
    left = compiled["ms_by_kind"][EW]  # outside the blocks (embedders, optimizer, EMA) stays eager
    # what left the eager kind came back scaled by the measured ratios (grad and no-grad ratios bracket it)
    lo, hi = sorted((ratios.no_grad[0], ratios.grad[0]))
    assert lo * (eager["ms_by_kind"][EW] - left) * 0.999 <= moved <= hi * (eager["ms_by_kind"][EW] - left) * 1.001
    assert 0 < left < eager["ms_by_kind"][EW]
    assert compiled["launches_per_it"] < eager["launches_per_it"]
    assert compiled["predicted_median_ms"] < eager["predicted_median_ms"]


def test_fp8_teacher_linears_run_at_the_fp8_ceiling_in_no_grad_passes_only(eager):
    fp8 = _run("speed.fp8_linear_teacher=true", "speed.compile_blocks=true")
    compiled = _run("speed.compile_blocks=true")
    assert fp8["fp8_linears"] > 0
    assert fp8["ms_by_kind"]["matmul fp8"] > 0
    assert fp8["ms_by_kind"]["matmul"] < compiled["ms_by_kind"]["matmul"]
    # the FP8 GEMMs are at most bf16 time x (bf16 / fp8 ceiling) plus their quantisation traffic: cheaper overall
    moved = compiled["ms_by_kind"]["matmul"] - fp8["ms_by_kind"]["matmul"]
    assert fp8["ms_by_kind"]["matmul fp8"] < moved
    # nothing with gradient changes: the teacher has none, the student and fake are not quantised
    for p in ("forward", "backward"):
        assert fp8["ms_by_pass"][p] == pytest.approx(compiled["ms_by_pass"][p])


def test_official_plan_recomputes_and_uses_less_memory():
    big = dict(batch=8, resolution=512)  # activations must outweigh the model state for the peak to move
    eager = _run(**big)
    plain = _run(mode="reference", **big)
    official = _run(mode="reference", official_plan=True, **big)
    assert official["grad_checkpointing"] == "full" and plain["grad_checkpointing"] == "none"
    # full checkpointing: one more block forward per grad forward, so more FLOPs in backward; same NFE
    assert official["nfe"] == plain["nfe"]
    assert official["tflop_by_pass"]["backward"] > plain["tflop_by_pass"]["backward"]
    assert official["peak_gib"] < plain["peak_gib"]
    selective = _run("train.grad_checkpointing=selective", **big)
    assert official["peak_gib"] < selective["peak_gib"] < eager["peak_gib"]
    # selective keeps matmul outputs: no matmul is recomputed
    assert selective["tflop_by_pass"]["backward"] == pytest.approx(eager["tflop_by_pass"]["backward"])


def test_plan_lines_pick_the_fastest_plan_that_fits():
    gib = cm.GiB

    def row(name, ms, peak):  # model state: 10 GiB built + 20 B x 1 GiB-worth of parameters = 30 GiB
        return {"plan": name, "predicted_median_ms": ms, "peak_gib": peak, "build_gib": 10.0,
                "student_params": gib, "ms_by_kind": {"attention": 1.0, "matmul": 2.0, "elementwise / x": 3.0}}

    assert cm.model_state_gib(row("x", 1, 1)) == pytest.approx(30.0)
    rows = [row("reference", 1000, 70), row("fast big", 400, 400), row("fast small", 500, 100),
            row("fast tiny", 600, 40)]
    text = "\n".join(cm.plan_lines("sd3-medium-shape", 16, rows, [3]))
    # FSDP2 x 8: 30 / 8 + activations -> big 373.75 (fits neither), small 73.75 (H100 tight, H200 yes), tiny 13.75
    assert "H100 80GB, FSDP2 x 8: fastest plan that fits: **fast small**, 2.00x" in text
    assert "| fast big | 400 | 2.50x | 1 / 3 / 2 | 400 (30 + 370) | no | no | 374 | no | no |" in text
    assert "| fast small | 500 | 2.00x | 1 / 3 / 2 | 100 (30 + 70) | no | yes | 74 | tight | yes |" in text


def test_compiled_block_traffic_table_is_complete():
    data = json.loads(cm.COMPILED_BLOCK_TRAFFIC.read_text())["blocks"]
    for keys in cm.FAMILY_BLOCKS.values():
        for key in keys:
            assert key in data, key
            for entry in ("none/no_grad", "none/grad", "selective/grad", "full/grad"):
                r = data[key][entry]
                assert 0 < r["compiled_bytes"] < r["eager_bytes"]  # inductor never adds traffic over eager
                assert r["bytes_ratio"] == pytest.approx(r["compiled_bytes"] / r["eager_bytes"])


def test_mixed_plan_runs_between_its_two_pure_plans():
    """selective+full:1 of 2 blocks: the full block re-runs its matmuls in backward (fewer than all-full), the
    peak sits between the two pure plans; the compiled ratios are the block-weighted mean of the two."""
    big = dict(batch=8, resolution=512)
    selective = _run("train.grad_checkpointing=selective", **big)
    full = _run("train.grad_checkpointing=full", **big)
    mixed = _run("train.grad_checkpointing=selective+full:1", **big)
    assert mixed["grad_checkpointing"] == "selective+full:1"
    b = {name: s["tflop_by_pass"]["backward"] for name, s in (("s", selective), ("f", full), ("m", mixed))}
    assert b["s"] < b["m"] < b["f"]
    assert selective["peak_gib"] >= mixed["peak_gib"] >= full["peak_gib"]
    assert selective["peak_gib"] > full["peak_gib"]
    sel, ful = cm.CompiledBlocks.load("sd3", "selective"), cm.CompiledBlocks.load("sd3", "full")
    half = cm.CompiledBlocks.load("sd3", "selective+full:1", blocks=2)
    assert half.grad[0] == pytest.approx((sel.grad[0] + ful.grad[0]) / 2) and half.no_grad == sel.no_grad


def test_mixed_plan_for_takes_the_largest_k_that_fits_and_the_least_recompute():
    def row(name, peak):  # model state 30 GiB as above: FSDP2 x 8 per GPU = 3.75 + (peak - 30)
        return {"plan": name, "predicted_median_ms": 1.0, "peak_gib": peak, "build_gib": 10.0,
                "student_params": cm.GiB, "ms_by_kind": {}}

    # per GPU: none 243.75, selective 123.75, full 13.75 GiB over 24 blocks (selective - full: 4.58 per block)
    rows = [row(cm.MIXED_BASE["none"], 270), row(cm.MIXED_BASE["selective"], 150), row(cm.MIXED_BASE["full"], 40)]
    plan, gib = cm.mixed_plan_for(rows, 24, "H100 80GB")
    assert plan == "selective+full:13" and gib <= cm.GPU_GIB["H100 80GB"] < gib + 110 / 24
    plan, gib = cm.mixed_plan_for(rows, 24, "H200 141GB")  # selective fits; 2 blocks without checkpointing too
    assert plan == "none+selective:2" and gib <= cm.GPU_GIB["H200 141GB"]
    assert cm.mixed_plan_for([row(cm.MIXED_BASE["none"], 40)] + rows[1:], 24, "H100 80GB") is None  # none fits
