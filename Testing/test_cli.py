"""The command line as a user meets it: one-line errors with exit code 2, and complete outputs on success."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uad import catalog
from uad.inference import OUTPUT_FILES

from conftest import IXI_MASK, IXI_T1, run_cli


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bad_inputs(tmp_path, write_nifti):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    good = write_nifti(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), name="good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:300])
    return {
        "missing file": (tmp_path / "nope.nii.gz", "not found"),
        "not a NIfTI": (text, "not a NIfTI"),
        "truncated .gz": (truncated, "truncated or corrupt"),
        "2D image": (write_nifti(np.ones((30, 30), np.float32), name="flat.nii.gz"), "not a 3D volume"),
        "single slice": (write_nifti(np.ones((30, 30, 1), np.float32), name="one.nii.gz"), "not a 3D volume"),
        "4D volume": (write_nifti(np.ones((10, 10, 10, 4), np.float32), name="fmri.nii.gz"), "4D"),
        "all zero": (write_nifti(np.zeros((20, 20, 20), np.float32), name="zero.nii.gz"), "empty"),
    }


@pytest.mark.parametrize("case", ["missing file", "not a NIfTI", "truncated .gz", "2D image", "single slice",
                                  "4D volume", "all zero"])
def test_bad_input_files(capsys, tmp_path, bad_inputs, case):
    path, message = bad_inputs[case]
    before = sha(path) if path.exists() else None
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "detect", str(path), "--out", str(out), "--progress", "none")
    assert code == 2
    assert err.startswith("uad: error:") and message in err and err.count("\n") == 1
    assert not out.exists()
    assert list(tmp_path.glob(".out.partial-*")) == []
    if before:
        assert sha(path) == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "vqvea"], "did you mean 'vqvae'"),
        (["--mask-size", "48"], "invalid choice"),
        (["--device", "tpu"], "invalid choice"),
        (["--mask-mode", "random"], "invalid choice"),
        (["--model", "intensity", "--mask-mode", "iterative"], "intensity does not mask"),
    ],
)
def test_bad_options(capsys, tmp_path, flags, message):
    code, _, err = run_cli(capsys, "detect", str(IXI_T1), "--out", str(tmp_path / "out"), "--progress", "none", *flags)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "detect", str(IXI_T1), "--out", str(blocker / "out"), "--progress", "none")
    assert code == 2 and f"{blocker}, which is a file, not a folder" in err and err.count("\n") == 1


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "uad", "detect", str(tmp_path / "x.nii.gz"), "--out",
                                str(tmp_path / "o")], capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [f"uad: error: input file not found: {tmp_path / 'x.nii.gz'}; "
                                                      "check the path"]


def test_models_lists_every_bundled_model_as_json(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    listed = json.loads(out)
    assert code == 0
    assert {m["name"] for m in listed} == {m.name for m in catalog.list_models()} >= {"vqvae", "intensity"}
    assert sum(m["default"] for m in listed) == 1
    assert all(len(m["sha256"]) == 64 and m["threshold"] > 0 for m in listed)


def test_models_shows_the_training_provenance_the_readme_promises(capsys):
    code, out, _ = run_cli(capsys, "models", "--provenance")
    models = catalog.list_models()
    assert code == 0
    for line_start in ("  trained on ", "  command: uad ", "  calibrated on "):
        assert out.count(line_start) == len(models), line_start
    assert "(training provenance of each model" not in out  # the hint is only for the short listing


@pytest.mark.parametrize("model", ["vqvae", "intensity"])
def test_detect_end_to_end_on_a_real_full_head_scan(capsys, tmp_path, model):
    before = sha(IXI_T1)
    out = tmp_path / "result"
    code, _, err = run_cli(capsys, "detect", str(IXI_T1), "--out", str(out), "--model", model, "--progress", "none")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    source = nib.load(str(IXI_T1))
    for name in OUTPUT_FILES:
        if name.endswith(".nii.gz"):
            image = nib.load(str(out / name))
            assert image.shape == source.shape, name
            np.testing.assert_allclose(image.affine, source.affine, atol=1e-4)
            assert np.isfinite(np.asanyarray(image.dataobj)).all(), name
    segmentation = np.asanyarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    assert segmentation.dtype == np.uint8 and set(np.unique(segmentation)) <= {0, 1}
    report = json.loads((out / "report.json").read_text())
    info = catalog.get_model_info(model)
    assert report["model"] == model and report["weights_sha256"] == info.sha256
    assert report["threshold"] == pytest.approx(info.threshold) and report["device"] == "cpu"
    assert set(report["seconds"]) >= {"load", "preprocessing", "registration", "inference", "postprocessing", "total"}
    brain_slices = [s for s in report["slice_scores"] if s is not None]
    assert len(report["slice_scores"]) == source.shape[1]  # IXI's inferior-superior axis is j (AIL orientation)
    assert 20 < len(brain_slices) < source.shape[1] and report["volume_score"] == pytest.approx(max(brain_slices))
    assert sha(IXI_T1) == before


def test_non_finite_voxels_still_give_finite_outputs(capsys, tmp_path, write_nifti):
    source = nib.load(str(IXI_T1))
    data = np.asanyarray(source.dataobj).astype(np.float32)
    data[40:50, 40:50, 40:50] = np.nan
    data[0, 0, :] = np.inf
    path = write_nifti(data, source.affine, name="nan.nii.gz")
    code, _, err = run_cli(capsys, "detect", str(path), "--out", str(tmp_path / "o"), "--model", "intensity",
                           "--progress", "none")
    assert code == 0, err
    for name in ("reconstruction", "residual", "anomaly_map"):
        assert np.isfinite(nib.load(str(tmp_path / "o" / f"{name}.nii.gz")).get_fdata()).all()


def test_json_progress_lines_for_the_slicer_module(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "uad", "detect", str(IXI_T1), "--out", str(tmp_path / "o"),
                                "--model", "intensity", "--progress", "json"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    progress = [line for line in lines if line["type"] == "progress"]
    assert lines[-1] == {"type": "done", "out_dir": str(tmp_path / "o"), "device": "cpu"}
    fractions = [line["fraction"] for line in progress]
    assert fractions == sorted(fractions) and 0 <= fractions[0] < fractions[-1] <= 1
    assert {line["stage"] for line in progress} >= {"load", "preprocessing", "inference", "postprocessing", "writing"}


def test_demo_runs_on_the_bundled_sample(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--out", str(out), "--progress", "none")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert "overview.png" in stdout and "lesion mask" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == catalog.default_model_name()
    assert report["input"].endswith("mslub_patient26_T1.nii.gz")
    # a real MS case: skull stripping detected from the image, no refusal
    assert report["input_check"]["skull_stripping"]["skull_stripped"] is True
    assert report["input_check"]["refused"] is None
    assert_findings_describe_the_segmentation(out)


def assert_findings_describe_the_segmentation(out: Path) -> None:
    """report.json's findings and findings.csv: one per connected component, most anomalous first, in place."""
    import csv

    from scipy import ndimage

    report = json.loads((out / "report.json").read_text())
    image = nib.load(str(out / "segmentation.nii.gz"))
    segmentation = np.asanyarray(image.dataobj)
    anomaly_map = np.asanyarray(nib.load(str(out / "anomaly_map.nii.gz")).dataobj)
    labels, count = ndimage.label(segmentation, structure=np.ones((3, 3, 3)))
    findings = report["findings"]
    assert len(findings) == count > 0  # the sample has MS lesions
    assert sum(f["volume_ml"] for f in findings) == pytest.approx(report["segmented_volume_ml"], abs=1e-3)
    peaks = [f["peak_score"] for f in findings]
    assert peaks == sorted(peaks, reverse=True)
    for finding in findings:
        low, high = np.array(finding["bbox_voxel"][:3]), np.array(finding["bbox_voxel"][3:])
        assert np.all(low <= finding["centroid_voxel"]) and np.all(finding["centroid_voxel"] <= high)
        assert np.allclose(image.affine @ [*finding["centroid_voxel"], 1], [*finding["centroid_ras"], 1], atol=1e-3)
        box = tuple(slice(a, b + 1) for a, b in zip(low, high))
        label = np.bincount(labels[box][labels[box] > 0]).argmax()
        assert anomaly_map[labels == label].max() == pytest.approx(finding["peak_score"], abs=1e-5)
    with open(out / "findings.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["rank"]) for r in rows] == list(range(1, count + 1))
    assert [float(r["volume_ml"]) for r in rows] == pytest.approx([f["volume_ml"] for f in findings])
    assert [float(r["centroid_ras_s"]) for r in rows] == pytest.approx([f["centroid_ras"][2] for f in findings])


def test_a_given_brain_mask_is_the_one_used(capsys, tmp_path):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "detect", str(IXI_T1), "--out", str(out), "--model", "intensity",
                           "--brain-mask", str(IXI_MASK), "--progress", "none")
    assert code == 0, err
    used = np.asanyarray(nib.load(str(out / "brain_mask.nii.gz")).dataobj)
    np.testing.assert_array_equal(used > 0, np.asanyarray(nib.load(str(IXI_MASK)).dataobj) > 0)
    segmentation = np.asanyarray(nib.load(str(out / "segmentation.nii.gz")).dataobj)
    assert not (segmentation > used).any()  # nothing flagged outside the brain


def test_the_same_scan_twice_gives_the_same_map(tmp_path):
    """A clinician who runs a scan again gets the same map: the command line registers with one ITK thread unless
    told otherwise (two threads gave 1.448 and 1.424 ml here)."""
    env = {k: v for k, v in os.environ.items() if k != "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"}
    maps = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        completed = subprocess.run([sys.executable, "-m", "uad", "detect", str(IXI_T1), "--out", str(out),
                                    "--model", "intensity", "--progress", "none"], env=env, capture_output=True,
                                   text=True)
        assert completed.returncode == 0, completed.stderr
        maps.append(nib.load(str(out / "anomaly_map.nii.gz")).get_fdata())
    np.testing.assert_array_equal(maps[0], maps[1])
