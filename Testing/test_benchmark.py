"""``uad bench``: the reference cost, the re-threshold timing, mask-size rows and the target check (no detect run)."""

import numpy as np
import pytest

from uad import benchmark
from uad.io import Volume
from uad.models.swin_mae import SwinBlock

from conftest import IXI_T1


@pytest.fixture(scope="module")
def reference():
    """The paper's network (Swin MAE 2-2-2-2, 224 px, window 7, 3 decoder stages) with random weights: it must run."""
    return benchmark.reference_network()


def test_reference_network_is_the_papers_inference_network(reference):
    assert reference.patch_size == 4 and reference.position.shape == (1, 56, 56, 96)
    assert [len(stage) for stage in reference.encoder] == [2, 2, 2, 2]
    assert [stage[0].heads for stage in reference.encoder] == [3, 6, 12, 24]
    assert [len(stage) for stage in reference.decoder] == [2, 2, 2]  # 3 up-stages of 2 blocks
    assert all(block.window == 7 for stage in [*reference.encoder, *reference.decoder] for block in stage)
    assert sum(isinstance(m, SwinBlock) for m in reference.modules()) == 14
    assert sum(p.numel() for p in reference.parameters()) / 1e6 == pytest.approx(26.9, abs=0.05)


def test_reference_cost_is_positive_and_scales_with_passes(reference):
    timings = benchmark.time_reference(3, passes={64: 1, 32: 12}, batch_size=1, batches=1, threads=1,
                                       network=reference)
    one, many = timings[64], timings[32]
    assert one["seconds"] > 0 and one["seconds_per_slice_pass"] > 0
    assert one["seconds"] == pytest.approx(one["seconds_per_slice_pass"] * 1 * 3)
    assert many["seconds"] == pytest.approx(many["seconds_per_slice_pass"] * 12 * 3)
    assert many["seconds"] > 4 * one["seconds"]  # 12x the passes; a pass costs the same whatever it masks


def test_rethreshold_timing_returns_seconds():
    timings = benchmark.time_rethreshold(shape=(96, 96, 96), runs=2, flagged_fractions=(0.05, 0.2))
    assert [t["flagged_fraction"] for t in timings] == [0.05, 0.2]
    assert all(t["seconds"] > 0 and t["runs"] == 2 for t in timings)
    assert 0 < timings[0]["segmented_voxels"] < timings[1]["segmented_voxels"] < timings[0]["brain_voxels"]


def test_masking_models_get_a_row_per_mask_size_and_calibrated_mask_mode(monkeypatch):
    monkeypatch.setattr(benchmark, "uses_mask_size", lambda model: model == "swin-mae")
    monkeypatch.setattr(benchmark, "calibrated_mask_modes", lambda model: ("iterative",) * (model == "swin-mae"))
    variants = benchmark.detect_variants(["vqvae", "swin-mae"], [], ["cpu"])
    assert [v["label"] for v in variants] == ["vqvae", "swin-mae (64 mm)", "swin-mae (32 mm)",
                                              "swin-mae (64 mm, iterative)", "swin-mae (32 mm, iterative)"]
    assert variants[2]["args"] == ["--mask-size", "32", "--device", "cpu"]
    assert variants[4]["args"] == ["--mask-size", "32", "--mask-mode", "iterative", "--device", "cpu"]
    monkeypatch.setattr(benchmark, "calibrated_mask_modes", lambda model: ())
    assert len(benchmark.detect_variants(["vqvae", "swin-mae"], [], ["cpu"])) == 3
    fixed = benchmark.detect_variants(["swin-mae"], ["--mask-size", "32"], [None])
    assert [(v["label"], v["args"]) for v in fixed] == [("swin-mae", ["--mask-size", "32"])]


def test_brain_slices_become_1mm_slices():
    affine = np.diag([0.9, 0.9, 1.2, 1.0])
    assert benchmark.slices_at_1mm(Volume(np.zeros((4, 4, 150), np.float32), affine), 110) == 132
    sagittal = np.array([[0, 0, 1.5, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # superior = 2nd axis
    assert benchmark.slices_at_1mm(Volume(np.zeros((4, 4, 4), np.float32), sagittal), 100) == 100


def _fake_detect_once(calls):
    def detect_once(input_path, model, args):
        mask = int(args[args.index("--mask-size") + 1]) if "--mask-size" in args else None
        calls.append(f"{model} {mask}")
        process = {None: 20.0, 64: 70.0, 32: 90.0}[mask] + len(calls) / 100  # 64 mm misses its 60 s target
        seconds = {stage: 1.0 for stage in benchmark.STAGES} | {"inference": process / 2, "process": process}
        return {"seconds": seconds, "peak_memory_mb": 1500.0, "device": "cpu", "slice_scores": [0.1] * 110 + [None]}
    return detect_once


def test_bench_writes_mask_rows_reference_targets_and_rethreshold(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "uses_mask_size", lambda model: model == "swin-mae")
    monkeypatch.setattr(benchmark, "calibrated_mask_modes", lambda model: ())  # sliding rows only, here
    calls = []
    monkeypatch.setattr(benchmark, "detect_once", _fake_detect_once(calls))

    def fake_reference(n, **kw):
        calls.append("reference")
        per_pass = [0.4, 0.5, 0.9][calls.count("reference") - 1]  # a load spike in the last round
        return {64: {"passes": 6, "seconds_per_slice_pass": per_pass, "seconds": per_pass * 6 * n, "slices": n},
                32: {"passes": 30, "seconds_per_slice_pass": per_pass, "seconds": per_pass * 30 * n, "slices": n}}
    monkeypatch.setattr(benchmark, "time_reference", fake_reference)
    monkeypatch.setattr(benchmark, "time_rethreshold", lambda: [
        {"flagged_fraction": 0.01, "seconds": 0.05, "runs": 5, "shape": (256,) * 3, "brain_voxels": 1_500_000,
         "segmented_voxels": 9000}])
    monkeypatch.setattr(benchmark, "_record_expected_seconds", lambda results: None)  # the package's manifest
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "BENCHMARKS.md"
    results = benchmark.bench(IXI_T1, ["vqvae", "swin-mae"], 3, str(out), [])
    assert calls == ["vqvae None", "swin-mae 64", "swin-mae 32", "reference"] * 3  # interleaved rounds
    assert list(results) == ["vqvae", "swin-mae (64 mm)", "swin-mae (32 mm)"]
    assert results["swin-mae (64 mm)"]["process_spread"] == pytest.approx((70.02, 70.06, 70.10))
    assert [r["target"]["met"] for r in results.values()] == [True, False, True]
    text = out.read_text()
    assert "| swin-mae (64 mm) | cpu |" in text and "≤ 60 s, ≤ 4 GB | **no** (time) |" in text
    assert "| swin-mae (32 mm) | cpu |" in text and "≤ 120 s, ≤ 4 GB | yes |" in text
    assert "no GPU present" in text
    slices = benchmark.slices_at_1mm(benchmark.load_volume(IXI_T1), 110)
    assert f"over the {slices} axial 1 mm slices" in text
    assert "| 70.0 / 70.1 / 70.1 | 1500 |" in text
    inference = 70.06 / 2  # median round
    assert (f"| 0.400 / 0.500 / 0.900 | {0.5 * 6 * slices:.0f} | swin-mae (64 mm) | {inference:.1f} | 70.1 | "
            f"{0.5 * 6 * slices / inference:.0f}× |") in text
    assert "| 1% | 9000 | 0.050 | yes |" in text


def test_bench_times_a_real_detect_run(tmp_path, monkeypatch, capsys):
    """`uad bench` end to end with one real timing: a fresh `uad detect` process. The reference network and the
    256^3 re-threshold (timed above on their own) run on small samples here, and the package's manifest is left
    alone; every number in the table comes from the measurement."""
    from conftest import run_cli

    real_reference, real_rethreshold = benchmark.time_reference, benchmark.time_rethreshold
    monkeypatch.setattr(benchmark, "REFERENCE_SAMPLE", {"batches": 1, "batch_size": 1})
    monkeypatch.setattr(benchmark, "time_reference", lambda n, **kw: real_reference(
        n, **{**kw, "passes": {64: 1, 32: 2}, "network": benchmark.reference_network()}))
    monkeypatch.setattr(benchmark, "time_rethreshold", lambda: real_rethreshold(shape=(64, 64, 64), runs=1))
    recorded = []
    monkeypatch.setattr(benchmark, "_record_expected_seconds", recorded.append)
    out = tmp_path / "BENCHMARKS.md"
    code, stdout, err = run_cli(capsys, "bench", "--input", str(IXI_T1), "--models", "intensity", "--runs", "1",
                                "--out", str(out), "--detect-args", "--device", "cpu")
    assert code == 0, err
    [results] = recorded
    timing = results["intensity"]
    seconds = timing["seconds"]
    assert timing["device"] == "cpu" and timing["runs"] == 1 and timing["peak_memory_mb"] > 100
    assert 0 < seconds["inference"] < seconds["total"] < seconds["process"]
    assert seconds["registration"] > 0 and seconds["preprocessing"] > 0
    # A brain is 110-150 mm tall: at IXI's 2 mm, 55-75 slices hold brain (the count of the report's scores).
    assert 50 <= timing["brain_slices"] <= 80
    row = next(line for line in out.read_text().splitlines() if line.startswith("| intensity | cpu |"))
    assert f"| {seconds['process']:.1f} |" in row and f"| {seconds['total']:.1f} |" in row
    assert f"intensity on cpu: {seconds['process']:.1f} s for the whole command" in stdout

