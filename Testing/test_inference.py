import numpy as np
import pytest

from uad.errors import UserInputError
from uad.inference import OUTPUT_FILES, DetectOptions, detect, superior_axis

from conftest import IXI_MASK, IXI_T1, oblique_affine


def test_python_api_detect(tmp_path):
    result = detect(IXI_T1, tmp_path / "out", DetectOptions(model="intensity", device="cpu"))
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(OUTPUT_FILES)
    assert result.report["model"] == "intensity" and result.report["device"] == "cpu"


@pytest.mark.parametrize(
    "affine, expected",
    [
        (np.diag([1.0, 1.0, 1.0, 1.0]), (2, False)),  # RAS: k runs inferior -> superior
        (np.diag([1.0, 1.0, -1.0, 1.0]), (2, True)),  # k runs superior -> inferior
        (np.array([[0, 0, -2, 0], [2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1.0]]), (1, False)),  # IXI's AIL layout
        (oblique_affine(angles_deg=(20.0, 0.0, 0.0)), (2, False)),  # tilted slab: still closest to k
    ],
)
def test_superior_axis(affine, expected):
    assert superior_axis(affine) == expected


def test_unsupported_mask_size_is_a_user_error():
    with pytest.raises(UserInputError, match="mask size 48"):
        DetectOptions(mask_size=48)


def test_each_mask_size_gets_its_own_calibrated_threshold():
    from uad.checkpoint import Checkpoint
    from uad.models import build_model
    from uad.models.swin_mae import SwinMAEConfig
    from uad.preprocessing import PreprocessConfig

    calibration = {"threshold": 2.0, "postprocessing": {"threshold": 2.0, "median_mm": 3.0},
                   "threshold_by_mask_size_mm": {"32": 1.5, "64": 2.0}}
    checkpoint = Checkpoint(build_model(SwinMAEConfig()), PreprocessConfig(), calibration)
    assert checkpoint.calibrated_postprocessing(32).threshold == 1.5
    assert checkpoint.calibrated_postprocessing(64).threshold == 2.0
    assert checkpoint.calibrated_postprocessing(32).median_mm == 3.0  # the rest is shared


def test_iterative_mask_mode_uses_its_own_threshold_and_sliding_keeps_the_old_keys():
    from uad.checkpoint import Checkpoint
    from uad.models import build_model
    from uad.models.swin_mae import SwinMAEConfig
    from uad.preprocessing import PreprocessConfig

    calibration = {"threshold": 2.0, "postprocessing": {"threshold": 2.0, "median_mm": 3.0},
                   "threshold_by_mask_size_mm": {"32": 1.5, "64": 2.0},
                   "threshold_by_mask_mode": {"iterative": {"threshold": 2.4,
                                                            "threshold_by_mask_size_mm": {"32": 1.7, "64": 2.4}}}}
    checkpoint = Checkpoint(build_model(SwinMAEConfig()), PreprocessConfig(), calibration)
    assert checkpoint.calibrated_postprocessing(32, "iterative").threshold == 1.7
    assert checkpoint.calibrated_postprocessing(64, "iterative").threshold == 2.4
    assert checkpoint.calibrated_postprocessing(32, "sliding").threshold == 1.5
    assert checkpoint.calibrated_postprocessing(32, "iterative").median_mm == 3.0
    del calibration["threshold_by_mask_mode"]  # a checkpoint calibrated before the mode existed
    with pytest.raises(UserInputError, match="no threshold calibrated for --mask-mode iterative.*uad calibrate"):
        checkpoint.calibrated_postprocessing(64, "iterative")


def test_detect_with_iterative_mask_thresholds_at_the_iterative_value(tmp_path):
    """End to end on a real scan: the report's threshold is the iterative one, and the map differs from sliding."""
    import nibabel as nib
    import torch

    from uad.bundle import add_to_manifest
    from uad.checkpoint import Checkpoint, save_checkpoint
    from uad.models import build_model
    from uad.models.swin_mae import SwinMAEConfig
    from uad.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    calibration = {"threshold": 2.0, "postprocessing": {"threshold": 2.0},
                   "threshold_by_mask_size_mm": {"32": 1.5, "64": 2.0},
                   "threshold_by_mask_mode": {"iterative": {"threshold": 3.25,
                                                            "threshold_by_mask_size_mm": {"32": 2.5, "64": 3.25}}}}
    checkpoint = Checkpoint(build_model(SwinMAEConfig()).eval(), PreprocessConfig(), calibration)
    path = tmp_path / "swin-mae.pt"
    save_checkpoint(checkpoint, path)
    add_to_manifest(path, checkpoint)
    maps = {}
    for mode in ("sliding", "iterative"):
        result = detect(IXI_T1, tmp_path / mode, DetectOptions(model=str(path), device="cpu", mask_mode=mode))
        assert result.report["mask_mode"] == mode
        maps[mode] = nib.load(str(tmp_path / mode / "anomaly_map.nii.gz")).get_fdata()
    assert result.report["threshold"] == 3.25
    assert not np.allclose(maps["sliding"], maps["iterative"])
    given = detect(IXI_T1, tmp_path / "given", DetectOptions(model=str(path), device="cpu", mask_mode="iterative",
                                                             threshold=9.0))
    assert given.report["threshold"] == 9.0


def test_a_model_that_scores_slices_reports_its_own_scores(tmp_path):
    """mae-classifier's probabilities, not the map's percentiles, become the report's slice scores."""
    import torch

    from uad.bundle import add_to_manifest
    from uad.checkpoint import Checkpoint, save_checkpoint
    from uad.models import build_model
    from uad.models.mae_classifier import MAEClassifierConfig
    from uad.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    checkpoint = Checkpoint(build_model(MAEClassifierConfig()).eval(), PreprocessConfig(), {"threshold": 1.0})
    save_checkpoint(checkpoint, tmp_path / "mae-classifier.pt")
    add_to_manifest(tmp_path / "mae-classifier.pt", checkpoint)
    result = detect(IXI_T1, tmp_path / "out", DetectOptions(model=str(tmp_path / "mae-classifier.pt"), device="cpu"))
    scores = [s for s in result.report["slice_scores"] if s is not None]
    assert scores and all(0 <= s <= 1 for s in scores)  # probabilities: a map percentile would exceed 1 here
    assert result.report["volume_score"] == max(scores)


def test_a_z_scored_scan_with_negative_values_is_handled(tmp_path, write_nifti):
    """BraTS-style inputs: z-scored, background negative. The reconstruction comes back in the input's units."""
    import nibabel as nib

    image = nib.load(str(IXI_T1))
    data = np.asarray(image.dataobj, np.float32)
    mask = np.asarray(nib.load(str(IXI_MASK)).dataobj) > 0
    z = (data - data[mask].mean()) / data[mask].std()
    z = np.where(mask, z, z[mask].min() - 0.5).astype(np.float32)  # as BraTS: the background is the minimum
    scan = write_nifti(z, image.affine, "z.nii.gz")
    brain = write_nifti(mask.astype(np.uint8), image.affine, "z_brainmask.nii.gz")
    before = nib.load(str(scan)).get_fdata()
    result = detect(scan, tmp_path / "out", DetectOptions(model="intensity", device="cpu", brain_mask=str(brain)))
    reconstruction = nib.load(str(result.out_dir / "reconstruction.nii.gz")).get_fdata()
    inside = nib.load(str(result.out_dir / "brain_mask.nii.gz")).get_fdata() > 0
    assert np.array_equal(nib.load(str(scan)).get_fdata(), before)  # the input is untouched
    assert abs(np.median(reconstruction[inside]) - np.median(z[inside])) < 1.0  # same units, not shifted back
    assert np.allclose(reconstruction[~inside], z[~inside])
