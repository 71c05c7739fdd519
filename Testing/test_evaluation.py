"""The evaluation's bookkeeping: one row per mask size, failed cases reported, slice scores, the figure."""

from pathlib import Path

import numpy as np
import pytest
from skimage import io

from uad.checkpoint import Checkpoint
from uad.evaluation import _lesion_markdown, variants_of, working_grid_slice_scores
from uad.figures import save_model_comparison
from uad.models import Prediction, build_model
from uad.models.intensity import IntensityConfig
from uad.models.swin_mae import SwinMAEConfig
from uad.preprocessing import PreprocessConfig


def test_masking_models_are_evaluated_once_per_mask_size_with_their_own_threshold():
    calibration = {"postprocessing": {"threshold": 2.0}, "threshold_by_mask_size_mm": {"32": 1.0, "64": 2.0}}
    swin = Checkpoint(build_model(SwinMAEConfig()), PreprocessConfig(), calibration)
    variants = variants_of(swin, Path("swin-mae.pt"))
    assert [v.label for v in variants] == ["swin-mae (64 mm)", "swin-mae (32 mm)"]
    assert [v.postprocessing.threshold for v in variants] == [2.0, 1.0]
    assert [v.label for v in variants_of(swin, Path("swin-mae.pt"), (64,))] == ["swin-mae (64 mm)"]  # --mask-sizes
    plain = Checkpoint(build_model(IntensityConfig()), PreprocessConfig(), {"postprocessing": {"threshold": 3.0}})
    assert [v.label for v in variants_of(plain, Path("intensity.pt"))] == ["intensity"]


def test_a_calibrated_mask_mode_adds_a_row_per_mask_size_with_its_threshold():
    from uad.models.mae_classifier import MAEClassifierConfig

    calibration = {"postprocessing": {"threshold": 2.0}, "threshold_by_mask_size_mm": {"32": 1.0, "64": 2.0},
                   "threshold_by_mask_mode": {"iterative": {"threshold": 2.5,
                                                            "threshold_by_mask_size_mm": {"32": 1.5, "64": 2.5}}}}
    swin = Checkpoint(build_model(SwinMAEConfig()), PreprocessConfig(), calibration)
    variants = variants_of(swin, Path("swin-mae.pt"))
    assert [v.label for v in variants] == ["swin-mae (64 mm)", "swin-mae (32 mm)", "swin-mae (64 mm, iterative)",
                                           "swin-mae (32 mm, iterative)"]
    assert [v.postprocessing.threshold for v in variants] == [2.0, 1.0, 2.5, 1.5]
    classifier = Checkpoint(build_model(MAEClassifierConfig()), PreprocessConfig(),
                            {"postprocessing": {"threshold": 0.5},
                             "threshold_by_mask_mode": {"iterative": {"threshold": 0.7}}})
    variants = variants_of(classifier, Path("mae-classifier.pt"))
    assert [(v.label, v.postprocessing.threshold) for v in variants] == [("mae-classifier", 0.5),
                                                                         ("mae-classifier (iterative)", 0.7)]


def test_slice_scores_come_from_the_model_when_it_has_them():
    mask = np.zeros((20, 20, 12), bool)
    mask[2:18, 2:18, 2:10] = True
    filtered = np.zeros(mask.shape, np.float32)
    filtered[..., 5] = 5.0
    filtered[2, 2, 3] = 99.0  # on the brain's rim: outside the eroded brain that segmentation (and scoring) uses
    variant = variants_of(Checkpoint(build_model(IntensityConfig()), PreprocessConfig()), Path("x.pt"))[0]
    empty = np.zeros(mask.shape, np.float32)
    from_map = working_grid_slice_scores(variant, Prediction(empty, empty, filtered), filtered, mask)
    np.testing.assert_allclose(from_map, np.eye(12)[5] * 5.0)
    own = np.linspace(0, 1, 12).astype(np.float32)
    scored = Prediction(empty, empty, filtered, slice_scores=own)
    np.testing.assert_array_equal(working_grid_slice_scores(variant, scored, filtered, mask), own)


def test_a_failed_case_is_a_row_and_pooled_slice_auroc_uses_the_others():
    case = {"dice": 0.5, "best_dice": 0.6, "auprc": 0.4, "auroc": 0.9, "slice_auroc": 1.0, "flagged_ml": 3.0,
            "lesion_ml": 2.0, "slice_scores": [0.1, 0.2, 0.9, 0.8], "slice_truth": [False, False, True, True]}
    results = {"vqvae": {"lesions": {"mslub T1": case, "tcga T1": {"error": "the brain region has no signal"}}}}
    markdown = _lesion_markdown(results, [], "lesions", "Real lesions")
    assert "failed: the brain region has no signal" in markdown
    assert "| vqvae | 1 | 4 | 2 | 1.000 |" in markdown


def test_the_model_comparison_picture_has_a_row_per_scan_and_two_panels_per_model(tmp_path):
    rng = np.random.default_rng(0)
    brain = np.zeros((40, 48), bool)
    brain[5:35, 6:42] = True
    truth = np.zeros_like(brain)
    truth[15:22, 20:28] = True

    def column(label):
        image = rng.random(brain.shape).astype(np.float32) * brain
        return {"label": label, "threshold": 1.0, "healthy_image": image, "abnormal_image": image, "brain": brain,
                "truth": truth, **{f"{row}_{kind}": image for row in ("healthy", "abnormal")
                                   for kind in ("reconstruction", "map")}}

    path = tmp_path / "figure.png"
    save_model_comparison(path, [column("a"), column("b"), column("c")])
    picture = io.imread(path)
    single = tmp_path / "single.png"
    save_model_comparison(single, [column("a")])
    assert picture.shape[0] == io.imread(single).shape[0]  # two rows either way
    assert picture.shape[1] > 2 * io.imread(single).shape[1]  # 1 + 2 x 3 panels against 1 + 2
    assert picture.std() > 0


def test_a_model_whose_map_is_its_first_stage_points_to_that_row():
    from uad.evaluation import EvaluationConfig, _synthetic_markdown

    row = {"ssim_ixi": 0.6, "ssim_mass": 0.5, "auroc_mean": 0.8, "auprc_mean": 0.3, "auroc_pooled": 0.8,
           "auroc_pooled_ci": [0.78, 0.82], "auprc_pooled": 0.3, "auprc_pooled_ci": [0.28, 0.32], "dice_mean": 0.2,
           "dice_mean_ci": [0.15, 0.25], "threshold": 2.0, "flagged_ml_ixi": 1.0, "flagged_ml_mass": 2.0,
           "cases": 60, "n_ixi": 30, "n_mass": 15}
    intensity = {**row, "auprc_pooled": 0.4, "auprc_pooled_ci": [0.38, 0.42]}
    results = {"intensity": {"synthetic": intensity}, "swin-mae (64 mm)": {"synthetic": row},
               "mae-classifier": {"synthetic": {"same_as_stage_one": "swin-mae"}}}
    markdown = _synthetic_markdown(results, [], EvaluationConfig("data", ("intensity",), "cache"))
    assert "| swin-mae (64 mm) |" in markdown and "| mae-classifier |" not in markdown
    assert "`mae-classifier`'s pixel map and threshold are those of its first stage `swin-mae`" in markdown
    assert "| **no** |" in markdown and "Best model by pooled AUPRC: **intensity**" in markdown


def test_anomalies_from_a_fixed_mask_do_not_move_when_the_brain_mask_does():
    """Registration noise moves a brain mask by a voxel; anomalies drawn from a fixed mask must stay put."""
    from uad.synthetic import add_synthetic_anomaly

    image = np.full((40, 48, 40), 0.5, np.float32)
    brain = np.zeros(image.shape, bool)
    brain[5:35, 5:43, 5:35] = True
    jittered = brain.copy()
    jittered[5, 5:43, 5:35] = False  # one voxel layer fewer
    fixed = np.zeros(image.shape, bool)
    fixed[10:30, 10:38, 10:30] = True

    def truth(mask, centres_from):
        return add_synthetic_anomaly(image, mask, np.random.default_rng(1), centres_from=centres_from)[1]

    assert not np.array_equal(truth(brain, None), truth(jittered, None))  # the old way: every anomaly moves
    np.testing.assert_array_equal(truth(brain, fixed)[6:], truth(jittered, fixed)[6:])


def test_beats_needs_intervals_that_do_not_overlap():
    from uad.evaluation import beats_outside_intervals, with_interval

    model = {"auroc_pooled": 0.93, "auroc_pooled_ci": [0.92, 0.94]}
    assert beats_outside_intervals(model, {"auroc_pooled": 0.88, "auroc_pooled_ci": [0.86, 0.90]}, "auroc_pooled")
    assert not beats_outside_intervals(model, {"auroc_pooled": 0.91, "auroc_pooled_ci": [0.89, 0.925]},
                                       "auroc_pooled")
    assert with_interval(model, "auroc_pooled") == "0.930 [0.920, 0.940]"


def test_uad_evaluate_runs_the_protocols_on_a_tiny_data_folder(tmp_path, capsys):
    """`uad evaluate` end to end on real scans: five IXI 'subjects' (one lands in the held-out test split), one
    healthy skull-stripped scan from 'another site' and one lesion case with its expert mask (the sample)."""
    import json
    import shutil

    import nibabel as nib

    from uad import resources
    from uad.data import split_subjects

    from conftest import IXI_MASK, IXI_T1, run_cli

    data = tmp_path / "data"
    ixi, mass, lesion = data / "healthy/ixi_t1", data / "healthy/mass_t1", data / "lesion/mslub/patient26"
    for folder in (ixi, mass, lesion):
        folder.mkdir(parents=True)
    ids = [f"IXI90{i}" for i in range(5)]
    for subject in ids:
        shutil.copy(IXI_T1, ixi / f"{subject}_T1.nii.gz")
        shutil.copy(IXI_MASK, ixi / f"{subject}_brainmask.nii.gz")
    shutil.copy(resources.sample_scan(), mass / "mass01_T1.nii.gz")
    shutil.copy(resources.sample_scan(), lesion / "T1.nii.gz")
    shutil.copy(resources.sample_lesion_mask(), lesion / "lesion_mask.nii.gz")
    out, results, cache = tmp_path / "B.md", tmp_path / "results.json", tmp_path / "cache"

    code, stdout, err = run_cli(capsys, "evaluate", "--data", str(data), "--models", "intensity", "--cache", str(cache),
                                "--out", str(out), "--figure", str(tmp_path / "fig.png"), "--results", str(results))
    assert code == 0, err
    result = json.loads(results.read_text())["intensity"]
    synthetic = result["synthetic"]
    assert synthetic["n_ixi"] == 1 and synthetic["n_mass"] == 1 and synthetic["cases"] == 4  # 4 anomalies a scan
    assert 0.5 < synthetic["auroc_pooled"] <= 1 and 0 < synthetic["auprc_pooled"] <= 1
    # Only the held-out test subject and the other site's scan were ever preprocessed.
    assert {p.stem for p in cache.rglob("*.npz")} == {*split_subjects(ids).test, "mass01"}
    case = result["lesions"]["mslub/patient26 T1"]
    truth = nib.load(str(lesion / "lesion_mask.nii.gz"))
    voxel_ml = np.prod(truth.header.get_zooms()) / 1000
    assert case["lesion_ml"] == pytest.approx(np.count_nonzero(np.asanyarray(truth.dataobj)) * voxel_ml)
    # best Dice is the oracle before erosion and components, so it may fall a little below the post-processed Dice
    assert 0 <= case["dice"] <= 1 and 0 <= case["best_dice"] <= 1 and case["flagged_ml"] > 0
    assert result["stroke"] == {} and result["other_contrasts"] == {}  # no stroke shapes, no other contrast here
    assert result["site_calibration"] == result["small_stroke"] == {}  # they paint stroke shapes too
    table = out.read_text()
    low, high = synthetic["auroc_pooled_ci"]
    assert low - 1e-3 <= synthetic["auroc_pooled"] <= high + 1e-3  # intervals come from binned counts (~1e-4)
    assert (f"| intensity | {synthetic['ssim_ixi']:.3f} | {synthetic['ssim_mass']:.3f} | {synthetic['auroc_mean']:.3f} "
            f"| {synthetic['auprc_mean']:.3f} | {synthetic['auroc_pooled']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{synthetic['auprc_pooled']:.3f} [") in table
    assert f"| intensity | mslub/patient26 T1 | {case['lesion_ml']:.3f} | {case['flagged_ml']:.3f} |" in table
    assert f"intensity: SSIM {synthetic['ssim_ixi']:.3f}, AUROC {synthetic['auroc_pooled']:.3f}" in stdout
    assert io.imread(tmp_path / "fig.png").ndim == 3
    assert "auprc_pooled_draws" not in synthetic  # the bootstrap draws stay in the cache, unpublished

    # A result cached before the draws existed re-runs that protocol alone (the lesion cases' detect is slow).
    cached_file = next((cache / "evaluation").glob("*.json"))
    stored = json.loads(cached_file.read_text())
    assert len(stored["synthetic"]["auprc_pooled_draws"]) == 1000
    for key in ("revision", "auroc_pooled_draws", "auprc_pooled_draws"):
        del stored["synthetic"][key]
    stored["lesions"]["mslub/patient26 T1"]["dice"] = -1.0  # a marker that only a re-run would overwrite
    cached_file.write_text(json.dumps(stored))
    code, _, err = run_cli(capsys, "evaluate", "--data", str(data), "--models", "intensity", "--cache", str(cache),
                           "--out", str(out), "--figure", "", "--results", str(results))
    assert code == 0, err
    again = json.loads(cached_file.read_text())
    assert len(again["synthetic"]["auprc_pooled_draws"]) == 1000
    assert again["synthetic"]["auprc_pooled"] == synthetic["auprc_pooled"]
    assert again["lesions"]["mslub/patient26 T1"]["dice"] == -1.0


def test_paired_difference_reads_the_same_resamples_of_both_models():
    from uad.evaluation import paired_difference

    baseline = {"auprc_pooled": 0.46, "auprc_pooled_draws": [0.40, 0.46, 0.50]}
    model = {"auprc_pooled": 0.60, "auprc_pooled_draws": [0.50, 0.56, 0.80]}  # resample by resample: +0.1, +0.1, +0.3
    assert paired_difference(model, baseline, ("auprc_pooled",)) == "+0.140 [+0.100, +0.290]"
    assert paired_difference(model, {"auprc_pooled": 0.46}, ("auprc_pooled",)) == "–"  # cached before the draws
    assert paired_difference(baseline, baseline, ("auprc_pooled",)) == "–"  # the baseline's own row


def test_a_sites_own_threshold_is_set_on_one_half_and_measured_on_the_other(tmp_path):
    """Scans from a brighter site flag far too much at the bundled threshold; each half's own threshold, measured on
    the other half, brings the false volume down, and the protocol's threshold is exactly the healthy quantile."""
    from models.synthetic_brain import healthy_like
    from test_lesion_shapes import ball_mask

    from uad.calibration import healthy_threshold
    from uad.evaluation import SPACING, Variant, evaluate_site_calibration
    from uad.postprocessing import PostprocessConfig

    training = [healthy_like(seed) for seed in range(4)]
    model = build_model(IntensityConfig())
    model.fit(np.stack([image for image, _ in training]), np.stack([mask for _, mask in training]))
    calibration = {"fpr": 0.01, "postprocessing": PostprocessConfig(threshold=2.0, top_k=0).to_dict()}
    variant = Variant(Checkpoint(model, PreprocessConfig(), calibration), Path("intensity.pt"), None)
    site = {}
    for seed in range(10, 14):
        image, mask = healthy_like(seed)
        site[f"site{seed}"] = (image * np.float32(1.15), mask)  # another scanner: brighter everywhere
    shapes = [ball_mask(tmp_path / "sub-1_lesion.nii.gz", (20.0, 10.0, 15.0))]

    result = evaluate_site_calibration(variant, site, shapes, seed=0)
    assert result["n_site"] == 4 and result["threshold"] == 2.0
    assert result["flagged_ml_site"] < 0.1 * result["flagged_ml_bundled"]
    maps = {i: variant.filtered(variant.predict(*site[i]), site[i][1]) for i in ("site10", "site12")}  # first half
    expected, _ = healthy_threshold(list(maps.values()), [site[i][1] for i in maps], variant.postprocessing, 0.01,
                                    SPACING)
    assert result["site_thresholds"][0] == pytest.approx(expected)
    assert all(t > 2.0 for t in result["site_thresholds"])
    assert 0 <= result["dice_site"] <= 1 and 0 <= result["dice_bundled"] <= 1
    assert evaluate_site_calibration(variant, dict(list(site.items())[:1]), shapes, seed=0) == {}  # one scan: none


def test_small_shapes_are_painted_two_per_scan_and_found_by_a_model_that_sees_dark_spots(tmp_path):
    from models.synthetic_brain import healthy_like
    from test_lesion_shapes import ball_mask

    from uad.evaluation import SMALL_SHAPES, STROKE_SHAPES, Variant, evaluate_stroke_shapes

    training = [healthy_like(seed) for seed in range(4)]
    model = build_model(IntensityConfig())
    model.fit(np.stack([image for image, _ in training]), np.stack([mask for _, mask in training]))
    variant = Variant(Checkpoint(model, PreprocessConfig(), {"postprocessing": {"threshold": 3.0}}),
                      Path("intensity.pt"), None)
    scans = {f"s{seed}": healthy_like(seed) for seed in (10, 11, 12)}
    small = [ball_mask(tmp_path / "sub-1_lesion.nii.gz", (20.0, 10.0, 15.0), radius_mm=4.5)]  # 0.38 ml
    result = evaluate_stroke_shapes(variant, scans, small, seed=0, draw=SMALL_SHAPES)
    assert result["cases"] == 6 and result["auroc"] > 0.9
    for key in ("auroc", "auprc"):  # a few lesion voxels in 10^4: the intervals' bins must still rank them
        low, high = result[f"{key}_ci"]
        assert low - 1e-3 <= result[key] <= high + 1e-3 and low < high
    with pytest.raises(ValueError, match="no lesion shape of 1.0 to inf ml"):
        evaluate_stroke_shapes(variant, scans, small, seed=0, draw=STROKE_SHAPES)  # too small for protocol 2


def test_many_small_shapes_share_one_scan_and_are_painted_once_for_every_model(tmp_path):
    from models.synthetic_brain import healthy_like
    from scipy import ndimage
    from test_lesion_shapes import ball_mask

    from uad.evaluation import MANY_SMALL_SHAPES, painted_cases

    shapes = [ball_mask(tmp_path / "sub-1_lesion.nii.gz", (20.0, 10.0, 15.0), radius_mm=4.5),
              ball_mask(tmp_path / "sub-2_lesion.nii.gz", (-20.0, -10.0, 10.0), radius_mm=4.5)]
    image, mask = healthy_like(10)
    cases = painted_cases("s10", image, mask, shapes, 0, MANY_SMALL_SHAPES)
    assert len(cases) == 1
    modified, truth = cases[0]
    assert ndimage.label(truth)[1] == 2  # at least 8 draws of the two shapes: both lesions in the one case
    assert np.all(modified[truth > 0] < np.percentile(image[mask > 0], 50))
    # Every model gets the very same cases (painted once per run), but another scan under the same name is repainted.
    assert painted_cases("s10", image, mask, shapes, 0, MANY_SMALL_SHAPES) is cases
    assert painted_cases("s10", image * 0.9, mask, shapes, 0, MANY_SMALL_SHAPES) is not cases
