"""What a user sees from the real ``uad detect`` on real scans.

A bright lesion is painted into the test IXI scan, into an oblique resampled copy, into a superior-first copy
and into the bundled sample; each is run through ``uad detect`` once (session fixtures, shared by the tests) and
must be flagged at its own position in millimetres, with the slice scores peaking at its slice. Every
post-processing flag is proven to take effect: one run with all flags changed must equal a recomputation from
its own anomaly map with exactly those values, and differ from the recomputation with any single flag at its
default. The `intensity` baseline runs where the model does not matter (no network, same registration); the
sample runs with the default model, as `uad demo` does. Thresholds are read from the checkpoints, never written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
import torch

from uad import catalog, resources
from uad.checkpoint import load_checkpoint
from uad.cli import main
from uad.io import Volume
from uad.postprocessing import PostprocessConfig, erode_brain_mask, median_filter, segment_filtered
from uad.preprocessing import to_ants

from conftest import IXI_T1, oblique_affine

LESION_RADIUS_MM = 9.0
# Offsets from the centroid of each scan's brighter half of voxels (see brain_centroid_ras): for the IXI subject
# the right centrum semiovale (white matter).
IXI_LESION_OFFSET_RAS = np.array([25.0, 0.0, 15.0])
# The sample (MSLUB patient 26): left frontal white matter, away from its own MS lesions and from its enlarged
# ventricles, which the default model flags (its known false positive there): at 22 mm from the centroid instead of
# 28, the ball's flagged rim joined the frontal horn's component (12.3 ml in one piece).
SAMPLE_LESION_OFFSET_RAS = np.array([-28.0, 20.0, 12.0])
# Centroid of the flagged lesion vs the painted one; the map is median-filtered and registered at 2 mm.
CENTROID_TOLERANCE_MM = 4.0
# A clean scan: the `intensity` baseline at its calibrated threshold flags about 1.4 ml of this subject.
CLEAN_MAX_ML = 5.0


@dataclass
class Run:
    """One ``uad detect`` run: its input, the painted lesion centre (RAS mm), and its outputs."""

    input: Path
    out: Path
    lesion_ras: np.ndarray | None

    @property
    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())

    def load(self, name: str) -> np.ndarray:
        return np.asanyarray(nib.load(str(self.out / f"{name}.nii.gz")).dataobj)

    @property
    def affine(self) -> np.ndarray:
        return nib.load(str(self.input)).affine


def detect(input_path: Path, out: Path, *flags: str, lesion_ras=None) -> Run:
    code = main(["detect", str(input_path), "--out", str(out), "--progress", "none", *flags])
    assert code == 0, f"uad detect {input_path.name} {' '.join(flags)} exited with {code}"
    return Run(input_path, out, lesion_ras)


def voxel_of(affine: np.ndarray, ras: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(affine) @ np.append(ras, 1.0))[:3]


def paint_lesion(data: np.ndarray, affine: np.ndarray, centre_ras: np.ndarray, value: float) -> np.ndarray:
    """A ball of ``value`` of LESION_RADIUS_MM around ``centre_ras``, in physical millimetres."""
    grid = np.indices(data.shape).reshape(3, -1)
    ras = affine[:3, :3] @ grid + affine[:3, 3:4]
    inside = (np.linalg.norm(ras - centre_ras[:, None], axis=0) <= LESION_RADIUS_MM).reshape(data.shape)
    painted = data.copy()
    painted[inside] = value
    return painted


def brain_centroid_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    head = data > np.percentile(data[data > 0], 50)
    return affine[:3, :3] @ np.array(np.nonzero(head)).mean(axis=1) + affine[:3, 3]


def with_lesion(source: Path, offset_ras: np.ndarray, out: Path) -> tuple[Path, np.ndarray]:
    image = nib.load(str(source))
    data = np.asanyarray(image.dataobj).astype(np.float32)
    centre = brain_centroid_ras(data, image.affine) + offset_ras
    bright = 1.4 * np.percentile(data[data > 0], 99)
    nib.save(nib.Nifti1Image(paint_lesion(data, image.affine, centre, bright), image.affine), str(out))
    return out, centre


def superior_first_copy(source: Path, out: Path) -> Path:
    """The same physical image with the inferior-superior voxel axis stored the other way round."""
    image = nib.load(str(source))
    axis = int(np.argmax(np.abs(image.affine[2, :3])))
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, image.shape[axis] - 1
    data = np.flip(np.asanyarray(image.dataobj), axis=axis)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), image.affine @ flip), str(out))
    return out


def oblique_copy(source: Path, out: Path) -> Path:
    """The image resampled onto a tilted, anisotropic grid around the same centre (as a tilted slab)."""
    image = nib.load(str(source))
    shape = (135, 150, 120)  # the tilted box still holds the whole head
    affine = oblique_affine(spacing=(2.2, 1.9, 2.1), angles_deg=(14.0, -9.0, 17.0))
    centre = image.affine[:3, :3] @ ((np.array(image.shape) - 1) / 2) + image.affine[:3, 3]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    moving = to_ants(Volume(np.asanyarray(image.dataobj).astype(np.float32), image.affine))
    target = to_ants(Volume(np.zeros(shape, np.float32), affine))
    data = ants.resample_image_to_target(moving, target, interp_type="linear").numpy()
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(out))
    return out


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray | None]]:
    folder = tmp_path_factory.mktemp("scans")
    ixi, ixi_centre = with_lesion(IXI_T1, IXI_LESION_OFFSET_RAS, folder / "ixi_lesion.nii.gz")
    sample, sample_centre = with_lesion(resources.sample_scan(), SAMPLE_LESION_OFFSET_RAS,
                                        folder / "sample_lesion.nii.gz")
    return {
        "ixi": (ixi, ixi_centre),
        "superior-first": (superior_first_copy(ixi, folder / "ixi_lesion_sup_first.nii.gz"), ixi_centre),
        "oblique": (oblique_copy(ixi, folder / "ixi_lesion_oblique.nii.gz"), ixi_centre),
        "sample": (sample, sample_centre),
    }


@pytest.fixture(scope="session")
def lesion_runs(scans, tmp_path_factory) -> dict[str, Run]:
    """One default-settings ``uad detect`` per orientation (the expensive part: one registration each)."""
    folder = tmp_path_factory.mktemp("lesion-runs")
    runs = {}
    for name, (path, centre) in scans.items():
        # The sample runs as `uad demo` does (default model, skull-stripped): the baseline flags a lot on a scan
        # from another site (README, Limits), the IXI copies with the baseline (no network, same registration).
        flags = ["--model", "intensity"] if name != "sample" else ["--skull-stripped"]
        flags += ["--device", "cpu"]
        runs[name] = detect(path, folder / name, *flags, lesion_ras=centre)
    return runs


ORIENTATIONS = ["ixi", "superior-first", "oblique", "sample"]


def flagged_component(run: Run) -> tuple[np.ndarray, float]:
    """(RAS centroid, volume in ml) of the flagged connected component that holds the painted lesion's centre."""
    from scipy import ndimage

    segmentation = run.load("segmentation") > 0
    labels, _ = ndimage.label(segmentation, structure=np.ones((3, 3, 3)))
    centre_voxel = tuple(np.round(voxel_of(run.affine, run.lesion_ras)).astype(int))
    label = labels[centre_voxel]
    assert label > 0, "the painted lesion's centre is not flagged"
    voxels = np.array(np.nonzero(labels == label))
    voxel_ml = abs(np.linalg.det(run.affine[:3, :3])) / 1000
    return run.affine[:3, :3] @ voxels.mean(axis=1) + run.affine[:3, 3], voxels.shape[1] * voxel_ml


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_a_painted_lesion_is_flagged_at_its_own_position(lesion_runs, name):
    run = lesion_runs[name]
    centroid, flagged_ml = flagged_component(run)
    assert np.linalg.norm(centroid - run.lesion_ras) < CENTROID_TOLERANCE_MM, centroid - run.lesion_ras
    painted_ml = 4 / 3 * np.pi * LESION_RADIUS_MM**3 / 1000
    # The flagged region runs a few mm past the lesion's edge (2 mm working grid, 5 mm median filter, 1 mm dilation,
    # and the denoising autoencoder of the default fusion smooths its residual): the default segments this 3.1 ml
    # ball as ~10.8 ml on the sample (a boundary ~4 mm out). More than 4x would mean the map leaks into healthy tissue.
    assert 0.5 * painted_ml < flagged_ml < 4 * painted_ml, (flagged_ml, painted_ml)


def lesion_slice_inferior_first(run: Run) -> tuple[int, float]:
    """(index of the lesion centre's slice, counted from the inferior end; slice spacing in mm), worked out
    from the affine here rather than by the code under test."""
    affine = run.affine
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(directions[2])))
    index = int(round(voxel_of(affine, run.lesion_ras)[axis]))
    size = nib.load(str(run.input)).shape[axis]
    return (size - 1 - index if directions[2, axis] < 0 else index), float(np.linalg.norm(affine[:3, axis]))


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_slice_scores_peak_at_the_lesion_slice(lesion_runs, name):
    run = lesion_runs[name]
    scores = run.report["slice_scores"]
    lesion_slice, spacing = lesion_slice_inferior_first(run)
    peak = int(np.nanargmax(np.array([np.nan if s is None else s for s in scores], float)))
    assert abs(peak - lesion_slice) * spacing <= LESION_RADIUS_MM, (peak, lesion_slice)
    assert run.report["volume_score"] == pytest.approx(scores[peak])


def test_slice_scores_list_the_same_anatomy_whatever_the_storage_order(lesion_runs):
    """The superior-first copy holds the same voxels reversed: its report lists the same slices, inferior first."""
    plain, reversed_ = lesion_runs["ixi"].report["slice_scores"], lesion_runs["superior-first"].report["slice_scores"]
    assert len(plain) == len(reversed_) == nib.load(str(lesion_runs["ixi"].input)).shape[1]
    present = [i for i, (a, b) in enumerate(zip(plain, reversed_)) if a is not None and b is not None]
    assert len(present) > 0.8 * sum(s is not None for s in plain)
    # Registration of the flipped copy is run anew, so allow small differences; the profile must correlate.
    assert np.corrcoef([plain[i] for i in present], [reversed_[i] for i in present])[0, 1] > 0.95


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_slice_scores_are_the_99th_percentile_inside_the_eroded_brain(lesion_runs, name):
    """The report's slice scores, recomputed from the run's own map, brain mask and settings."""
    run = lesion_runs[name]
    report = run.report
    post = PostprocessConfig.from_dict(report["postprocessing"])
    spacing = tuple(np.linalg.norm(run.affine[:3, :3], axis=0))
    brain = run.load("brain_mask") > 0
    filtered = median_filter(run.load("anomaly_map"), brain, spacing, post.median_mm)
    region = erode_brain_mask(brain, spacing, post.brain_erosion_mm)
    directions = run.affine[:3, :3] / np.linalg.norm(run.affine[:3, :3], axis=0)
    axis = int(np.argmax(np.abs(directions[2])))
    expected = []
    for index in range(brain.shape[axis]):
        take = (slice(None),) * axis + (index,)
        if not brain[take].any():
            expected.append(None)
        else:
            values = filtered[take][region[take]]
            expected.append(float(np.percentile(values, 99)) if values.size else 0.0)
    if directions[2, axis] < 0:
        expected = expected[::-1]
    assert [s is None for s in report["slice_scores"]] == [s is None for s in expected]
    np.testing.assert_allclose([s for s in report["slice_scores"] if s is not None],
                               [s for s in expected if s is not None], atol=2e-6)
    # The rim is excluded: over the whole brain the 99th percentiles differ (else this test could not tell).
    whole = [float(np.percentile(filtered[(slice(None),) * axis + (i,)][brain[(slice(None),) * axis + (i,)]], 99))
             for i in range(brain.shape[axis]) if brain[(slice(None),) * axis + (i,)].any()]
    if directions[2, axis] < 0:
        whole = whole[::-1]
    assert np.abs(np.array(whole) - [s for s in report["slice_scores"] if s is not None]).max() > 0.1


def test_a_clean_scan_has_little_flagged(tmp_path_factory, lesion_runs):
    run = detect(IXI_T1, tmp_path_factory.mktemp("clean") / "out", "--model", "intensity", "--device", "cpu",
                 lesion_ras=lesion_runs["ixi"].lesion_ras)
    report = run.report
    assert report["segmented_volume_ml"] < CLEAN_MAX_ML
    centre = tuple(np.round(voxel_of(run.affine, run.lesion_ras)).astype(int))
    assert run.load("segmentation")[centre] == 0  # where the lesion was painted in the other copy
    lesion_slice, _ = lesion_slice_inferior_first(run)
    painted = lesion_runs["ixi"].report["slice_scores"][lesion_slice]
    assert report["slice_scores"][lesion_slice] < 0.5 * painted


# Every post-processing flag through the real `uad detect`

CHANGED_FLAGS = {
    "median_mm": ("--median-mm", 3.0),
    "brain_erosion_mm": ("--brain-erosion-mm", 8.0),
    # well above the default 50 mm³, so that a small component among the top K goes whatever registration jitter does
    "min_component_mm3": ("--min-component-mm3", 500.0),
    "top_k": ("--top-k", 3),
    "dilation_mm": ("--dilation-mm", 2.5),
}
THRESHOLD_FACTOR = 0.6  # of the model's calibrated threshold, read from the checkpoint


def recompute(run: Run, config: PostprocessConfig) -> np.ndarray:
    spacing = tuple(np.linalg.norm(run.affine[:3, :3], axis=0))
    brain = run.load("brain_mask") > 0
    filtered = median_filter(run.load("anomaly_map"), brain, spacing, config.median_mm)
    image = np.asanyarray(nib.load(str(run.input)).dataobj).astype(np.float32)
    return segment_filtered(filtered, brain, spacing, config, image=image)


@pytest.fixture(scope="session")
def flags_run(scans, tmp_path_factory) -> tuple[Run, float]:
    threshold = THRESHOLD_FACTOR * catalog.get_model_info("intensity").threshold
    flags = [flag for flag, value in CHANGED_FLAGS.values() for flag in (flag, str(value))]
    path, centre = scans["ixi"]
    run = detect(path, tmp_path_factory.mktemp("flags") / "out", "--model", "intensity", "--device", "cpu",
                 "--threshold", repr(threshold), *flags, lesion_ras=centre)
    return run, threshold


def test_every_postprocessing_flag_takes_effect(flags_run):
    run, threshold = flags_run
    requested = {"threshold": threshold, **{key: value for key, (_, value) in CHANGED_FLAGS.items()}}
    report = run.report
    assert {key: report["postprocessing"][key] for key in requested} == requested
    assert report["threshold"] == threshold
    config = PostprocessConfig.from_dict(report["postprocessing"])
    segmentation = run.load("segmentation")
    np.testing.assert_array_equal(segmentation, recompute(run, config))
    defaults = load_checkpoint(catalog.get_model_info("intensity").path).calibrated_postprocessing().to_dict()
    # With a setting back at the model's default the result differs: the flag is what changed it. The component
    # filters go back together: whether one alone removes anything here depends on the component sizes, which move
    # with run-to-run registration jitter (each alone failed about one run in six).
    for keys in ("threshold", "median_mm", "brain_erosion_mm", "dilation_mm", ("min_component_mm3", "top_k")):
        keys = keys if isinstance(keys, tuple) else (keys,)
        reverted = PostprocessConfig.from_dict({**config.to_dict(), **{key: defaults[key] for key in keys}})
        assert not np.array_equal(segmentation, recompute(run, reverted)), f"{keys} made no difference here"


def test_atropos_refinement_takes_effect(scans, tmp_path_factory):
    path, centre = scans["ixi"]
    run = detect(path, tmp_path_factory.mktemp("atropos") / "out", "--model", "intensity", "--device", "cpu",
                 "--refine", "atropos", "--top-k", "1", lesion_ras=centre)
    config = PostprocessConfig.from_dict(run.report["postprocessing"])
    assert config.refine == "atropos"
    segmentation = run.load("segmentation").astype(bool)
    unrefined = recompute(run, PostprocessConfig.from_dict({**config.to_dict(), "refine": "none"})).astype(bool)
    refined = recompute(run, config).astype(bool)
    assert (segmentation != unrefined).sum() > 0.05 * unrefined.sum()
    assert 2 * (segmentation & refined).sum() / (segmentation.sum() + refined.sum()) > 0.95


def test_device_cpu_is_what_runs(lesion_runs):
    assert all(run.report["device"] == "cpu" for run in lesion_runs.values())


def test_device_cuda_without_a_gpu_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code = main(["detect", str(IXI_T1), "--out", str(out), "--model", "intensity", "--device", "cuda",
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA GPU" in err and err.count("\n") == 1
    assert not out.exists()


def test_device_cuda_runs_on_the_gpu_or_is_refused(tmp_path, capsys):
    """On this machine as it is: a GPU runs the model and says so; without one, one line and exit code 2."""
    out = tmp_path / "out"
    code = main(["detect", str(IXI_T1), "--out", str(out), "--model", "intensity", "--device", "cuda",
                 "--progress", "none"])
    if torch.cuda.is_available():
        assert code == 0 and json.loads((out / "report.json").read_text())["device"] == "cuda"
    else:
        assert code == 2 and "no CUDA GPU" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="session")
def masking_checkpoint(tmp_path_factory) -> Path:
    """A real swin-mae checkpoint (random weights, so a few seconds) calibrated per mask size."""
    from uad.bundle import add_to_manifest
    from uad.checkpoint import Checkpoint, save_checkpoint
    from uad.models import build_model
    from uad.models.swin_mae import SwinMAEConfig
    from uad.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    calibration = {"threshold": 1.3, "postprocessing": {"threshold": 1.3},
                   "threshold_by_mask_size_mm": {"32": 0.7, "64": 1.3}}
    checkpoint = Checkpoint(build_model(SwinMAEConfig()).eval(), PreprocessConfig(), calibration)
    path = tmp_path_factory.mktemp("swin") / "swin-mae.pt"
    save_checkpoint(checkpoint, path)
    add_to_manifest(path, checkpoint)
    return path


def test_mask_size_has_its_own_threshold_and_its_own_map(masking_checkpoint, tmp_path):
    runs = {mm: detect(IXI_T1, tmp_path / f"{mm}", "--model", str(masking_checkpoint), "--mask-size", str(mm),
                       "--device", "cpu") for mm in (32, 64)}
    checkpoint = load_checkpoint(masking_checkpoint)
    for mm, run in runs.items():
        assert run.report["mask_size"] == mm
        assert run.report["threshold"] == checkpoint.calibrated_postprocessing(mm).threshold
    assert runs[32].report["threshold"] != runs[64].report["threshold"]
    brain = (runs[32].load("brain_mask") > 0) & (runs[64].load("brain_mask") > 0)
    small, large = runs[32].load("anomaly_map")[brain], runs[64].load("anomaly_map")[brain]
    # Registration is repeated per run: two runs at the same size differ by about 1 % of the map (measured); the
    # masking pattern changes it by about 5 %.
    assert np.abs(small - large).mean() > 0.03 * np.abs(large).mean()
