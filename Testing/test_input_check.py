"""Scans clinicians actually bring: a battery of bad and doubtful inputs, made from the small test scan.

Each case says what a user must see: the exit code, the one-line message, the report's warnings, and nothing in
``--out`` on refusal. File-level problems go through the real command line; the input check's judgement of
doubtful scans is asked of :func:`uad.input_check.check_input` (what ``uad detect`` runs before the model),
and the wiring from that check to the command line, report.json and stderr is proven once per outcome
(refusal, warning) with a full ``uad detect``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uad.input_check import check_input, decide_skull_stripping
from uad.io import load_volume

from conftest import IXI_MASK, IXI_T1, run_cli


@pytest.fixture(scope="session")
def ixi():
    """The test scan (AIL, 2 mm, full head): data, affine, brain mask, and its tissue classes inside the brain."""
    image = nib.load(str(IXI_T1))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    brain = np.asanyarray(nib.load(str(IXI_MASK)).dataobj) > 0
    values = data[brain]
    csf_gm, gm_wm = np.percentile(values, [20, 60])  # rough T1 classes: CSF darkest, WM brightest
    tissue = np.zeros(data.shape, np.uint8)
    tissue[brain] = 1 + (data[brain] > csf_gm) + (data[brain] > gm_wm)  # 1 CSF, 2 GM, 3 WM
    return {"data": data, "affine": image.affine, "brain": brain, "tissue": tissue, "header": image.header}


def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype), affine), str(path))
    return path


def relabel(ixi, levels: dict[int, float]) -> np.ndarray:
    """The scan with each tissue class re-painted at ``levels`` x its T1 mean (keeps texture and the skull)."""
    data, tissue = ixi["data"].copy(), ixi["tissue"]
    wm_mean = data[tissue == 3].mean()
    for label, level in levels.items():
        region = tissue == label
        data[region] = data[region] / data[region].mean() * level * wm_mean
    return data


# --- every doubtful scan: how the check judges it ------------------------------------------------------------

def make_t2(ixi, d):  # CSF brightest, WM darkest
    return save(d / "t2.nii.gz", relabel(ixi, {1: 1.6, 2: 0.9, 3: 0.6}), ixi["affine"])


def make_flair(ixi, d):  # CSF dark, GM brighter than WM
    return save(d / "flair.nii.gz", relabel(ixi, {1: 0.3, 2: 1.15, 3: 0.85}), ixi["affine"])


def make_flipped_lr(ixi, d):  # voxels mirrored left-right, affine left as it was (a wrong affine)
    lr_axis = int(np.argmax(np.abs(ixi["affine"][0, :3])))
    return save(d / "flipped.nii.gz", np.flip(ixi["data"], lr_axis), ixi["affine"])


def make_upside_down(ixi, d):  # voxels mirrored head-foot, affine unchanged
    is_axis = int(np.argmax(np.abs(ixi["affine"][2, :3])))
    return save(d / "upside_down.nii.gz", np.flip(ixi["data"], is_axis), ixi["affine"])


def make_thick_slices(ixi, d):  # a 4 mm clinical scan: every other slice along head-foot, spacing doubled
    is_axis = int(np.argmax(np.abs(ixi["affine"][2, :3])))
    data = np.take(ixi["data"], np.arange(0, ixi["data"].shape[is_axis], 2), axis=is_axis)
    affine = ixi["affine"].copy()
    affine[:3, is_axis] *= 2
    return save(d / "thick.nii.gz", data, affine)


def make_half_brain(ixi, d):  # the field of view cut through the middle of the brain (head-foot)
    is_axis = int(np.argmax(np.abs(ixi["affine"][2, :3])))
    brain_slices = np.flatnonzero(np.moveaxis(ixi["brain"], is_axis, 0).any(axis=(1, 2)))
    middle = int(brain_slices.mean())
    data = np.take(ixi["data"], np.arange(middle, ixi["data"].shape[is_axis]), axis=is_axis)
    affine = ixi["affine"].copy()
    affine[:3, 3] = (ixi["affine"] @ np.r_[np.eye(3)[is_axis] * middle, 1])[:3]
    return save(d / "half.nii.gz", data, affine)


def make_child_head(ixi, d):  # the same head at 80 % of its size (about half the volume)
    affine = ixi["affine"].copy()
    affine[:3, :3] *= 0.8
    return save(d / "child.nii.gz", ixi["data"], affine)


def make_huge_range(ixi, d):  # float intensities in the 1e9s with a few 1e15 spikes
    data = ixi["data"] * 1e7
    data.flat[:: 5000] = 1e15
    return save(d / "huge.nii.gz", data, ixi["affine"])


def make_stripped(ixi, d):  # the scan skull-stripped by its own brain mask
    return save(d / "stripped.nii.gz", ixi["data"] * ixi["brain"], ixi["affine"])


def make_noise(ixi, d):  # uniform noise on the scan's grid
    return save(d / "noise.nii.gz", np.random.default_rng(0).random(ixi["data"].shape), ixi["affine"])


def make_phantom(ixi, d):  # a uniform ellipsoid the size of a head: a phantom, not a brain
    shape = ixi["data"].shape
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum((g / 0.7) ** 2 for g in grid) < 1
    return save(d / "phantom.nii.gz", inside * 100.0 + np.random.default_rng(1).normal(0, 2, shape),
                ixi["affine"])


def make_knee_like(ixi, d):  # a bright cylinder along head-foot: a limb, not a head
    shape = ixi["data"].shape
    is_axis = int(np.argmax(np.abs(ixi["affine"][2, :3])))
    others = [a for a in range(3) if a != is_axis]
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (grid[others[0]] / 0.5) ** 2 + (grid[others[1]] / 0.4) ** 2 < 1
    core = (grid[others[0]] / 0.2) ** 2 + (grid[others[1]] / 0.2) ** 2 < 1
    return save(d / "limb.nii.gz", inside * 80.0 + core * 60.0, ixi["affine"])


# name -> (make, skull_stripped flag, expected: "ok" | "warn" | "refuse", words in the warning or refusal)
CHECK_CASES = {
    "T2 given as T1": (make_t2, None, "warn", "T2"),
    "FLAIR given as T1": (make_flair, None, "warn", "white matter is not brighter"),
    "flipped left-right, wrong affine": (make_flipped_lr, None, "ok", ""),
    "upside down, wrong affine": (make_upside_down, None, "warn", "matches the template poorly"),
    "4 mm thick slices": (make_thick_slices, None, "ok", ""),
    "cropped to half the brain": (make_half_brain, None, "warn", "outside the field of view"),
    "child-sized head": (make_child_head, None, "warn", "brain_volume_ml"),
    "huge intensity range": (make_huge_range, None, "ok", ""),
    "skull-stripped, auto-detected": (make_stripped, None, "ok", ""),
    "skull-stripped given as --full-head": (make_stripped, False, "refuse", "--full-head was given"),
    "full head given as --skull-stripped": (None, True, "refuse", "drop --skull-stripped"),
    "uniform phantom": (make_phantom, None, "refuse", "does not look like a brain"),
    "a limb, not a head": (make_knee_like, None, "refuse", "does not look like a brain"),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_the_input_check_judges_each_doubtful_scan(tmp_path, ixi, case):
    make, flag, expected, words = CHECK_CASES[case]
    path = make(ixi, tmp_path) if make else IXI_T1
    check = check_input(path, skull_stripped=flag)
    measured = {name: round(m.value, 3) for name, m in check.measures.items()}
    if expected == "refuse":
        assert check.refusal and words in check.refusal, (check.refusal, measured)
        assert "\n" not in check.refusal
    elif expected == "warn":
        assert check.passed, (check.refusal, measured)
        assert any(words in w for w in check.warnings), (check.warnings, measured)
    else:
        assert check.passed and check.warnings == [], (check.refusal, check.warnings, measured)


def test_skull_stripping_is_detected_both_ways(ixi, tmp_path):
    head = decide_skull_stripping(load_volume(IXI_T1), None)
    brain = decide_skull_stripping(load_volume(make_stripped(ixi, tmp_path)), None)
    assert (head.skull_stripped, head.decided_by) == (False, "auto") and "head-sized" in head.reason
    assert (brain.skull_stripped, brain.decided_by) == (True, "auto") and "brain-sized" in brain.reason
    assert 1300 < brain.signal_ml < 1700  # the test scan's own brain mask: 1489 ml
    assert decide_skull_stripping(load_volume(IXI_T1), None, brain_mask_given=True).decided_by == "brain mask"


# --- the command line: exit code, one line, nothing in --out -------------------------------------------------

def _refused_cleanly(code, err, out: Path, words: str) -> None:
    assert code == 2, err
    assert err.startswith("uad: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err, err
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def _gzip_text(d: Path) -> Path:
    path = d / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"patient notes, not an image\n" * 20))
    return path


def _renamed_text(d: Path) -> Path:
    path = d / "renamed.nii.gz"
    path.write_text("a text file renamed to .nii.gz\n")
    return path


def _all_nan(ixi, d: Path) -> Path:
    return save(d / "nan.nii.gz", np.full(ixi["data"].shape, np.nan, np.float32), ixi["affine"])


def _slope_overflow(ixi, d: Path) -> Path:
    image = nib.Nifti1Image(ixi["data"].astype(np.int16), ixi["affine"])
    image.header.set_slope_inter(1e36, 0)  # int16 x 1e36 overflows 32-bit floats
    path = d / "slope.nii.gz"
    nib.save(image, str(path))
    return path


# name -> (make(ixi, folder), extra flags, message words)
FILE_CASES = {
    "all NaN": (_all_nan, [], "NaN"),
    "text renamed .nii.gz": (lambda ixi, d: _renamed_text(d), [], "not gzip-compressed"),
    "gzip that is not NIfTI": (lambda ixi, d: _gzip_text(d), [], "not a NIfTI image"),
    "scl_slope overflow": (_slope_overflow, [], "scl_slope"),
    "random noise (full detect)": (make_noise, [], "does not look like a brain"),
    "full head with --skull-stripped": (lambda ixi, d: IXI_T1, ["--skull-stripped"], "drop --skull-stripped"),
    "empty brain mask": (lambda ixi, d: IXI_T1, ["--brain-mask", "EMPTY"], "brain mask is empty"),
    "a brain mask of a few voxels": (lambda ixi, d: IXI_T1, ["--brain-mask", "TINY"], "brain_volume_ml"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_refused_inputs_give_one_line_and_write_nothing(capsys, tmp_path, ixi, case):
    make, flags, words = FILE_CASES[case]
    path = make(ixi, tmp_path)
    masks = {"EMPTY": np.zeros(ixi["data"].shape), "TINY": np.zeros(ixi["data"].shape)}
    masks["TINY"][60:64, 60:64, 40:44] = 1
    flags = [str(save(tmp_path / f"{f}.nii.gz", masks[f], ixi["affine"], np.uint8)) if f in masks else f
             for f in flags]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "detect", str(path), "--out", str(out), "--model", "intensity",
                           "--progress", "none", *flags)
    _refused_cleanly(code, err, out, words)


def test_a_doubtful_input_runs_with_a_warning_everywhere(capsys, tmp_path, ixi):
    """stderr line, report.json warnings and the measured values (the Slicer panel shows report warnings)."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "detect", str(make_t2(ixi, tmp_path)), "--out", str(out), "--model", "intensity",
                           "--progress", "none")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] and all(f"uad: warning: {w}" in err for w in report["warnings"])
    assert "Traceback" not in err
    check = report["input_check"]
    assert check["measures"]["wm_gm_ratio"]["value"] < 1 and check["measures"]["wm_gm_ratio"]["verdict"] == "warn"
    assert check["skull_stripping"] == {**check["skull_stripping"], "skull_stripped": False, "decided_by": "auto"}


def test_outputs_keep_the_inputs_header_codes_and_unused_options_are_reported(capsys, tmp_path, ixi):
    image = nib.Nifti1Image(ixi["data"], ixi["affine"])
    image.set_sform(ixi["affine"], code=0)  # as the scanner wrote it: sform_code 0, qform_code 1
    image.set_qform(ixi["affine"], code=1)
    image.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "codes.nii.gz"
    nib.save(image, str(path))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "detect", str(path), "--out", str(out), "--model", "intensity",
                           "--progress", "none", "--mask-size", "32")
    assert code == 0, err
    for name in ("anomaly_map", "segmentation", "brain_mask", "reconstruction", "residual"):
        header = nib.load(str(out / f"{name}.nii.gz")).header
        assert (int(header["sform_code"]), int(header["qform_code"])) == (0, 1), name
        assert header.get_xyzt_units() == ("mm", "sec"), name
        np.testing.assert_allclose(nib.load(str(out / f"{name}.nii.gz")).affine, ixi["affine"], atol=1e-4)
    # --mask-size on a model that does not mask: said, not silently ignored; the input itself is fine
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == ["--mask-size 32 was ignored: intensity does not mask its input (only masking "
                                  "models such as swin-mae do)"]
    assert report["mask_size"] is None and report["threshold_source"] == "calibrated"
    assert report["input_check"]["warnings"] == [] and report["input_check"]["refused"] is None
    assert "uad: warning: --mask-size 32 was ignored" in err


# --- output folders: checked before any processing (an --out under a file: test_cli) ------------------------

@pytest.mark.parametrize("cohort", [False, True])
def test_an_unwritable_existing_folder_fails_before_processing(capsys, tmp_path, cohort):
    if os.geteuid() == 0:
        pytest.skip("root can write into a read-only folder")
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        inputs = [str(IXI_T1), str(IXI_T1)] if cohort else [str(IXI_T1)]
        code, _, err = run_cli(capsys, "detect", *inputs, "--out", str(out), "--model", "intensity",
                               "--progress", "none")
    finally:
        out.chmod(0o700)
    assert code == 2 and "cannot write to the output folder" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_cohort_whose_summary_cannot_be_written_stops_with_one_line(capsys, tmp_path):
    """Any OSError while writing becomes the one-line error (here the summary's temporary file is a folder)."""
    out = tmp_path / "results"
    (out / ".cohort.json.partial").mkdir(parents=True)
    code, _, err = run_cli(capsys, "detect", str(IXI_T1), str(IXI_T1), "--out", str(out), "--model", "intensity",
                           "--progress", "none")
    assert code == 2 and err.startswith("uad: error: cannot write to the output folder") and err.count("\n") == 1


def test_a_masking_models_report_says_at_which_mask_size_its_threshold_was_calibrated():
    from uad.inference import DetectOptions, Detector

    detector = Detector(DetectOptions(model="swin-mae", mask_size=32, device="cpu"))
    per_size = detector.checkpoint.calibration.get("threshold_by_mask_size_mm", {})
    calibrated_at = detector._calibration_report()["mask_size_mm"]
    warnings = detector._option_warnings()
    if "32" in per_size:  # calibrated at both sizes: the 32 mm threshold is used, nothing to warn about
        assert calibrated_at == 32 and warnings == []
        assert detector.postprocessing.threshold == per_size["32"]
    else:  # one threshold, from the model's default 64 mm masks: the report and a warning say so
        assert calibrated_at == 64
        assert warnings == ["swin-mae's threshold was calibrated at 64 mm masks, not at the 32 mm asked for; its "
                            "false-positive rate may differ (give --threshold, or recalibrate with 'uad calibrate')"]


def test_a_cohort_lists_each_cases_warnings(capsys, tmp_path):
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "detect", str(IXI_T1), "--shard", "1/1", "--out", str(out), "--model", "intensity",
                           "--mask-size", "32", "--progress", "none")
    assert code == 0, err
    case = json.loads((out / "cohort-shard-1-of-1.json").read_text())["cases"][0]
    assert case["status"] == "ok" and case["warnings"] == [
        "--mask-size 32 was ignored: intensity does not mask its input (only masking models such as swin-mae do)"]
    assert f"uad: case {case['id']}: warning: --mask-size 32 was ignored" in err
    assert "--mask-size 32 was ignored" in (out / "cohort-shard-1-of-1.csv").read_text()
