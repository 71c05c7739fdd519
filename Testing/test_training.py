"""Training from a folder of real healthy scans: split, cache, steps, resume, calibration, provenance."""

import nibabel as nib
import numpy as np
import pytest
import torch

from uad import calibration
from uad.checkpoint import load_checkpoint
from uad.data import find_subjects, split_subjects
from uad.errors import UserInputError
from uad.models.dae import DAEModel
from uad.models.slicewise import brain_slices_from_volumes
from uad.training import TrainConfig, _augment, train

from conftest import IXI_MASK, IXI_T1, run_cli


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three 'subjects' made from the bundled IXI scan (original, mirrored, noisier): real anatomy, real files."""
    folder = tmp_path_factory.mktemp("healthy")
    source = nib.load(str(IXI_T1))
    data = np.asanyarray(source.dataobj).astype(np.float32)
    rng = np.random.default_rng(0)
    variants = {"sub-a": data, "sub-b": data[::-1].copy(), "sub-c": data + rng.normal(0, 5, data.shape)}
    mask = np.asanyarray(nib.load(str(IXI_MASK)).dataobj)
    for name, array in variants.items():
        nib.save(nib.Nifti1Image(array.astype(np.float32), source.affine), str(folder / f"{name}_T1.nii.gz"))
        flipped = mask[::-1] if name == "sub-b" else mask
        nib.save(nib.Nifti1Image(flipped.astype(np.uint8), source.affine), str(folder / f"{name}_brainmask.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One preprocessing cache for the module: each scan is registered once, not once per test."""
    return tmp_path_factory.mktemp("cache")


def test_subjects_and_masks_are_paired(cohort):
    subjects = find_subjects(cohort)
    assert [s.subject_id for s in subjects] == ["sub-a", "sub-b", "sub-c"]
    assert all(s.mask_path.name == f"{s.subject_id}_brainmask.nii.gz" for s in subjects)


def test_split_is_reproducible_and_disjoint():
    ids = [f"s{i:03d}" for i in range(150)]
    split = split_subjects(ids)
    assert split == split_subjects(list(reversed(ids)))
    assert (len(split.train), len(split.validation), len(split.test)) == (105, 15, 30)
    assert not set(split.train) & set(split.test) and not set(split.validation) & set(split.test)


def test_train_resume_calibrate_and_provenance(cohort, cache, tmp_path):
    config = TrainConfig(model="vqvae", data_dir=str(cohort), out_dir=str(tmp_path / "run"),
                         cache_dir=str(cache), steps=2, batch_size=4, checkpoint_every=1,
                         validate_every=2, threads=1, model_options={"channels": [8, 16, 16]})
    path = train(config)
    first = load_checkpoint(path)
    assert first.training["steps"] == 2 and first.threshold > 0
    assert first.calibration["fpr"] == 0.01 and first.calibration["n_volumes"] == 1
    split = first.training["subjects"]
    cached = {p.stem for p in cache.rglob("*.npz")}
    assert cached == set(split["train"]) | set(split["validation"])  # the test subject was never touched
    assert first.model.config.channels == (8, 16, 16)

    # Asking for more steps with the same command resumes from last.pt instead of starting over.
    state_before = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state_before["step"] == 2
    resumed = load_checkpoint(train(TrainConfig(**{**config.__dict__, "steps": 3})))
    assert resumed.training["steps"] == 3
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3
    # The validation curve (for the model card) keeps the run's points across the resume: steps 2 and 3.
    assert [step for step, _ in resumed.training["best_validation"]["curve"]] == [2, 3]


def test_zero_steps_from_trained_weights_fits_only_statistics_and_threshold_for_new_options(cohort, cache, tmp_path):
    """How an option that only changes scoring (mirror_averaging) is given to trained weights."""
    options = {"channels": [8, 16, 32]}
    base = train(TrainConfig(model="dae", data_dir=str(cohort), out_dir=str(tmp_path / "base"), cache_dir=str(cache),
                             steps=2, batch_size=4, validate_every=2, threads=1, model_options=options))
    rescored = train(TrainConfig(model="dae", data_dir=str(cohort), out_dir=str(tmp_path / "mirror"),
                                 cache_dir=str(cache), steps=0, threads=1, init_from=str(base),
                                 model_options={**options, "mirror_averaging": True}))
    before, after = load_checkpoint(base), load_checkpoint(rescored)
    assert after.model.config.mirror_averaging and after.training["steps"] == 0
    assert after.training["initialised_from"]["sha256"] == before.sha256
    # The weights are kept; the statistics, fitted again, are those of one pass, as before; the threshold is
    # calibrated again, on the averaged map.
    assert all(torch.equal(value, after.model.state_dict()[k]) for k, value in before.model.state_dict().items())
    assert after.threshold > 0 and after.threshold != before.threshold
    # Rescored once more (e.g. in more reading directions), the file still names the run that trained the weights.
    views = {**options, "mirror_averaging": True, "reading_directions": ["axial", "coronal"], "reading_weights": [1, 1]}
    again = load_checkpoint(train(TrainConfig(model="dae", data_dir=str(cohort), out_dir=str(tmp_path / "views"),
                                              cache_dir=str(cache), steps=0, threads=1, init_from=str(rescored),
                                              model_options=views)))
    origin = again.training["initialised_from"]["initialised_from"]
    assert origin["sha256"] == before.sha256 and origin["steps"] == 2


def test_training_slices_are_cut_across_the_direction_asked():
    volumes = np.random.default_rng(0).random((2, 80, 96, 80), dtype=np.float32)
    masks = np.ones_like(volumes)
    coronal, _ = brain_slices_from_volumes(volumes, masks, "coronal")
    sagittal, _ = brain_slices_from_volumes(volumes, masks, "sagittal")
    assert coronal.shape == (2 * 96, 1, 80, 80) and sagittal.shape == (2 * 80, 1, 96, 80)
    np.testing.assert_array_equal(coronal[96 + 40, 0], volumes[1, :, 40, :])  # 2nd subject, 40th from the back
    np.testing.assert_array_equal(sagittal[10, 0], volumes[0, 10])


def test_only_slices_whose_first_axis_is_left_right_are_mirrored():
    images = np.random.default_rng(0).random((64, 1, 96, 80), dtype=np.float32)
    masks = np.ones_like(images)
    kept, _ = _augment(images, masks, np.random.default_rng(1), mirror=False)
    scale = kept / images  # a sagittal slice only has its intensity scaled; front-back mirrored is no brain
    assert np.allclose(scale, scale[:, :, :1, :1])
    mirrored, _ = _augment(images, masks, np.random.default_rng(1), mirror=True)
    flipped = [not np.allclose(m / i[:, ::-1], s[0, 0, 0]) for m, i, s in zip(mirrored, images, scale)]
    assert 16 < len(flipped) - sum(flipped) < 48  # about half are mirrored, with the same random scales


def test_contrast_augmentation_changes_tissue_contrast_and_is_off_by_default():
    images = np.random.default_rng(0).uniform(0.1, 1.5, (8, 1, 96, 80)).astype(np.float32)
    masks = np.ones_like(images)
    plain, _ = _augment(images, masks, np.random.default_rng(1), mirror=False)
    unchanged, _ = _augment(images, masks, np.random.default_rng(1), mirror=False, gamma_range=(1.0, 1.0))
    np.testing.assert_array_equal(plain, unchanged)  # off: the same draws and batches as before the option
    # A fixed power of 0.5: each slice is the square root of the input, times its global scale, so the ratio between
    # a dark (CSF-like) and a bright (white-matter-like) voxel moves towards 1.
    powered, _ = _augment(images, masks, np.random.default_rng(1), mirror=False, gamma_range=(0.5, 0.5))
    scale = powered / np.sqrt(images)
    assert np.allclose(scale, scale[:, :, :1, :1], rtol=1e-5) and np.all((scale > 0.89) & (scale < 1.11))
    dark, bright = images[0, 0] == images[0, 0].min(), images[0, 0] == images[0, 0].max()
    assert powered[0, 0][dark] / powered[0, 0][bright] > images[0, 0][dark] / images[0, 0][bright]


def test_a_bad_contrast_augmentation_range_is_refused_before_anything_is_written(cohort, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "dae", "--data", str(cohort), "--out", str(tmp_path / "run"),
                           "--cache", str(tmp_path / "cache"), "--gamma-range", "1.4", "0.7")
    assert code == 2 and "--gamma-range 1.4 0.7" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_net_trained_in_three_directions_learns_from_slices_of_each(cohort, cache, tmp_path, monkeypatch):
    seen = []
    loss = DAEModel.loss

    def recording_loss(self, images, masks):
        seen.append(tuple(images.shape[2:]))
        return loss(self, images, masks)

    monkeypatch.setattr(DAEModel, "loss", recording_loss)
    options = {"channels": [8, 16, 32], "training_directions": ["axial", "coronal", "sagittal"]}
    path = train(TrainConfig(model="dae", data_dir=str(cohort), out_dir=str(tmp_path / "run"), cache_dir=str(cache),
                             steps=12, batch_size=2, validate_every=12, threads=1, model_options=options))
    assert set(seen) == {(80, 96), (80, 80), (96, 80)}  # axial, coronal, sagittal slices of the working grid
    assert load_checkpoint(path).model.config.training_directions == ("axial", "coronal", "sagittal")


def test_the_slice_classifier_is_chosen_by_its_slice_auroc(cohort, cache, tmp_path, monkeypatch):
    """mae-classifier's pixel map is its frozen first stage's: its checkpoints are told apart by slice AUROC."""
    stage_one = train(TrainConfig(model="swin-mae", data_dir=str(cohort), out_dir=str(tmp_path / "stage-one"),
                                  cache_dir=str(cache), steps=1, batch_size=2, validate_every=1, threads=1))
    scored = []
    score = calibration.validation_slice_auroc

    def recording_score(model, images, masks, seed=0):
        scored.append(model.config.name)
        return score(model, images, masks, seed=seed)

    monkeypatch.setitem(calibration.VALIDATION_SCORES, "slice_auroc", recording_score)
    path = train(TrainConfig(model="mae-classifier", data_dir=str(cohort), out_dir=str(tmp_path / "run"),
                             cache_dir=str(cache), steps=2, batch_size=2, validate_every=1, threads=1,
                             init_from=str(stage_one)))
    best = load_checkpoint(path).training["best_validation"]
    assert scored == ["mae-classifier"] * 2 and [step for step, _ in best["curve"]] == [1, 2]
    assert best["slice_auroc"] == max(value for _, value in best["curve"]) and "auprc" not in best
    assert 0 <= best["slice_auroc"] <= 1


def test_zero_steps_without_trained_weights_is_refused_before_anything_is_written(cohort, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "dae", "--data", str(cohort), "--out", str(tmp_path / "run"),
                           "--steps", "0")
    assert code == 2 and "--init-from" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_zero_steps_from_another_model_s_weights_is_refused(cohort, cache, tmp_path, capsys):
    """A second stage started from its first stage's weights has nothing trained yet: 0 steps would ship it so."""
    first = train(TrainConfig(model="vqvae", data_dir=str(cohort), out_dir=str(tmp_path / "vqvae"),
                              cache_dir=str(cache), steps=1, batch_size=4, validate_every=1, threads=1,
                              model_options={"channels": [8, 16, 16]}))
    capsys.readouterr()  # that run's progress bars
    code, _, err = run_cli(capsys, "train", "--model", "vqvae-transformer", "--data", str(cohort), "--cache",
                           str(cache), "--out", str(tmp_path / "run"), "--steps", "0", "--init-from", str(first),
                           "--option", "channels=[8,16,16]")
    assert code == 2 and "vqvae" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_intensity_baseline_fits_in_closed_form(cohort, cache, tmp_path, capsys):
    path = train(TrainConfig(model="intensity", data_dir=str(cohort), out_dir=str(tmp_path / "run"),
                             cache_dir=str(cache), threads=1))
    checkpoint = load_checkpoint(path)
    assert checkpoint.training["steps"] == 0 and checkpoint.threshold > 0
    assert float(checkpoint.model.mean.max()) > 0.5  # a mean brain, normalised near 1

    # Re-calibrating (`uad calibrate`, as a user does) at a 5x higher false-positive rate lowers the threshold, on
    # subjects it was not trained on.
    code, out, err = run_cli(capsys, "calibrate", "--model", str(path), "--data", str(cohort), "--cache", str(cache),
                             "--fpr", "0.05")
    assert code == 0, err
    again = load_checkpoint(path)  # the manifest was updated with the new SHA-256, so this verifies
    assert out == f"calibrated {path}: threshold {again.threshold:.4g} at 5.00% healthy voxel FPR\n"
    assert again.threshold < checkpoint.threshold and again.calibration["fpr"] == 0.05
    split = checkpoint.training["subjects"]
    assert set(again.calibration["subjects"]) == set(split["validation"])  # neither training nor test subjects


def test_the_threshold_is_calibrated_with_the_median_filter_segmentation_will_use(cohort, cache, tmp_path, capsys):
    # A model that smooths its own map (the fusion) is calibrated without the median filter: the threshold is a
    # quantile of the filtered healthy map, so the stored filter and the threshold must come from the same map.
    code, _, err = run_cli(capsys, "train", "--model", "intensity", "--data", str(cohort), "--out",
                           str(tmp_path / "run"), "--cache", str(cache), "--threads", "1", "--median-mm", "0")
    assert code == 0, err
    unfiltered = load_checkpoint(tmp_path / "run" / "model.pt")
    assert unfiltered.calibrated_postprocessing().median_mm == 0
    assert unfiltered.calibration["method"].startswith("quantile of healthy map values")  # what the model card says
    filtered = load_checkpoint(train(TrainConfig(model="intensity", data_dir=str(cohort),
                                                 out_dir=str(tmp_path / "filtered"), cache_dir=str(cache), threads=1)))
    assert filtered.calibrated_postprocessing().median_mm == 5.0
    assert unfiltered.threshold > filtered.threshold  # a median filter trims the healthy map's highest values
    code, _, err = run_cli(capsys, "train", "--model", "intensity", "--data", str(cohort), "--out",
                           str(tmp_path / "bad"), "--cache", str(cache), "--median-mm", "-1")
    assert code == 2 and "median_mm must be 0 (off) or positive" in err and not (tmp_path / "bad").exists()


def test_a_mistyped_model_option_is_refused(cohort, tmp_path):
    with pytest.raises(UserInputError, match="unknown option.*chanels"):
        train(TrainConfig(model="vqvae", data_dir=str(cohort), out_dir=str(tmp_path / "run"),
                          cache_dir=str(tmp_path / "cache"), model_options={"chanels": [8, 16]}))


def test_an_out_of_range_model_option_is_refused_before_anything_is_written(cohort, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", "dae", "--data", str(cohort), "--out", str(tmp_path / "run"),
                           "--cache", str(tmp_path / "cache"), "--option", "foreign_patch_probability=2")
    assert code == 2 and "between 0 and 1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
