"""The detectors built to be sharp: the coarse-noise DAE, patch retrieval and their fusion."""

import numpy as np
import pytest
import torch

from uad.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from uad.errors import UserInputError
from uad.models import build_model
from uad.models.dae import DAEConfig, coarse_noise, faint_dark_blobs, foreign_patches, training_noise, widen_csf_spaces
from uad.models.fusion import FusionConfig, fuse_maps
from uad.models.patch_retrieval import PatchRetrievalConfig
from uad.models.scoring import healthy_map_statistics, standardise_map
from uad.preprocessing import PreprocessConfig

from .synthetic_brain import GRID, healthy_like


def test_dae_noise_is_coarse_and_of_the_configured_strength():
    torch.manual_seed(0)
    noise = coarse_noise((64, 1, 80, 96), divisor=8, std=0.2, generator_device=torch.device("cpu"))
    assert noise.shape == (64, 1, 80, 96)
    # Drawn on a 10 x 12 grid and upsampled: neighbouring pixels nearly equal, unlike pixel noise.
    neighbours = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    assert neighbours > 0.95
    assert 0.1 < float(noise.std()) < 0.2  # bilinear upsampling smooths a little of the 0.2 away


def test_fine_noise_is_drawn_twice_as_fine_in_its_share_of_the_slices():
    def neighbour_correlation(noise):
        return float(torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1])

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    coarse = training_noise((64, 1, 80, 96), DAEConfig(noise_grid_divisor=8), cpu)
    fine = training_noise((64, 1, 80, 96), DAEConfig(noise_grid_divisor=8, fine_noise_probability=1.0), cpu)
    assert neighbour_correlation(fine) < neighbour_correlation(coarse) - 0.02
    half = training_noise((200, 1, 80, 96), DAEConfig(noise_grid_divisor=8, fine_noise_probability=0.5), cpu)
    fine_slices = torch.tensor([neighbour_correlation(s) < 0.955 for s in half]).float().mean()
    assert 0.35 < float(fine_slices) < 0.65


def test_foreign_patches_blend_another_slice_into_an_irregular_blob_inside_the_brain():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 80, 96)
    masks = torch.zeros_like(images)
    masks[..., 10:70, 10:86] = 1
    corrupted, blobs = foreign_patches(images, masks, probability=0.5)
    touched = blobs.flatten(1).amax(1) > 0
    assert 0.25 < float(touched.float().mean()) < 0.75  # about the configured share of slices
    assert torch.equal(corrupted[~touched], images[~touched])  # the others are left exactly as they were
    assert not blobs[masks == 0].any()  # never outside the brain
    # Inside a blob the value lies between this slice's and the donor's (the previous slice of the batch).
    donors = images.roll(1, dims=0)
    inside = blobs > 0
    low, high = torch.minimum(images, donors)[inside], torch.maximum(images, donors)[inside]
    assert ((corrupted[inside] >= low - 1e-6) & (corrupted[inside] <= high + 1e-6)).all()
    # Irregular, not a box: the largest blob fills clearly less than its bounding box (a tiny one could fill it).
    largest = blobs[(blobs > 0).flatten(1).sum(1).argmax(), 0] > 0
    rows, cols = largest.any(1).nonzero(), largest.any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert float(largest.sum()) < 0.9 * float(box)


def test_dae_refuses_a_foreign_patch_share_outside_0_to_1():
    with pytest.raises(UserInputError, match="between 0 and 1"):
        build_model(DAEConfig(foreign_patch_probability=1.5))
    with pytest.raises(UserInputError, match="csf_widening_probability"):
        build_model(DAEConfig(csf_widening_probability=-0.1))
    with pytest.raises(UserInputError, match="fine_noise_probability"):
        build_model(DAEConfig(fine_noise_probability=2.0))
    with pytest.raises(UserInputError, match="dark_blob_probability"):
        build_model(DAEConfig(dark_blob_probability=1.1))


def test_faint_dark_blobs_darken_small_spots_inside_the_brain_by_at_most_40_percent():
    torch.manual_seed(0)
    images = 0.5 + 0.5 * torch.rand(64, 1, 80, 96)
    masks = torch.zeros_like(images)
    masks[..., 10:70, 10:86] = 1
    ratio = faint_dark_blobs(images, masks, probability=1.0) / images
    darkened = ratio < 1
    assert float(darkened.flatten(1).any(1).float().mean()) > 0.8  # nearly every slice has a blob in its brain
    assert float(ratio.min()) >= 0.6 - 1e-6 and float(ratio.max()) <= 1 + 1e-6  # faint, multiplicative: texture kept
    assert not (darkened & (masks == 0)).any()
    assert float(darkened.flatten(1).sum(1).max()) < 0.05 * 80 * 96  # small: MS-sized, not stroke-sized
    assert torch.equal(faint_dark_blobs(images, masks, probability=0.0), images)


def test_widened_csf_spaces_grow_from_the_csf_at_its_intensity_and_stay_in_the_brain():
    torch.manual_seed(0)
    images = torch.full((8, 1, 40, 48), 0.8)
    images[:, :, 18:22, 10:38] = 0.1  # a ventricle-like slit of CSF
    masks = torch.zeros_like(images)
    masks[:, :, 4:36, 4:44] = 1
    widened = widen_csf_spaces(images, masks, probability=1.0)
    changed = widened != images
    assert changed.any()
    assert torch.allclose(widened[changed], torch.tensor(0.1))  # filled with the slice's CSF intensity
    rows = changed.nonzero()[:, 2]
    assert rows.min() >= 18 - 2 and rows.max() <= 21 + 2  # at most 2 pixels from the CSF it grew from
    assert not (changed & (masks == 0)).any()
    assert torch.equal(widen_csf_spaces(images, masks, probability=0.0), images)


def test_dae_mirror_averaging_gives_the_mean_of_the_scan_s_and_its_left_right_mirror_s_maps():
    torch.manual_seed(0)
    plain = build_model(DAEConfig(channels=(8, 16, 32))).eval()
    mirrored = build_model(DAEConfig(channels=(8, 16, 32), mirror_averaging=True)).eval()
    mirrored.load_state_dict(plain.state_dict())
    image, mask = healthy_like()
    image[20:30, 40:50, 30:40] = 0.1  # a lesion on the left only: the two passes see it on opposite sides
    # Axis 0 of the working grid runs from left to right: the mirror image is image[::-1].
    own, mirror = plain.predict(image, mask), plain.predict(image[::-1].copy(), mask[::-1].copy())
    averaged = mirrored.predict(image, mask)
    for output in ("reconstruction", "residual", "anomaly_map"):  # statistics not fitted: the raw map
        expected = (getattr(own, output) + getattr(mirror, output)[::-1]) / 2
        np.testing.assert_allclose(getattr(averaged, output), expected, atol=1e-5, err_msg=output)


def _read_across(model, image, mask, order):
    """The axial-only model's raw map of the volume transposed by ``order``, transposed back."""
    back = np.argsort(order)
    prediction = model.predict(image.transpose(order).copy(), mask.transpose(order).copy())
    return prediction.anomaly_map.transpose(back)


def test_dae_reading_directions_average_the_axial_coronal_and_sagittal_readings_by_their_weights():
    torch.manual_seed(0)
    plain = build_model(DAEConfig(channels=(8, 16, 32))).eval()
    three = build_model(DAEConfig(channels=(8, 16, 32), reading_directions=("axial", "coronal", "sagittal"),
                                  reading_weights=(2.0, 1.0, 1.0))).eval()
    three.load_state_dict(plain.state_dict())
    image, mask = healthy_like()
    image[20:30, 40:50, 30:40] = 0.1
    # Coronal slices span left-right and foot-head (axes 0 and 2); sagittal ones back-front and foot-head (1, 2).
    coronal, sagittal = (_read_across(plain, image, mask, order) for order in ((0, 2, 1), (1, 2, 0)))
    expected = (2 * plain.predict(image, mask).anomaly_map + coronal + sagittal) / 4  # statistics not fitted: raw
    np.testing.assert_allclose(three.predict(image, mask).anomaly_map, expected, atol=1e-5)


def test_dae_reading_power_takes_the_weighted_power_mean_of_the_readings_maps_only():
    torch.manual_seed(0)
    model = build_model(DAEConfig(channels=(8, 16, 32), reading_directions=("axial", "coronal", "sagittal"),
                                  reading_weights=(2.0, 1.0, 1.0), reading_power=0.5)).eval()
    image, mask = healthy_like()
    image[20:30, 40:50, 30:40] = 0.1
    axial, coronal, sagittal = model.read_directions(image, mask)
    prediction = model.predict(image, mask)
    roots = (2 * np.sqrt(axial.anomaly_map) + np.sqrt(coronal.anomaly_map) + np.sqrt(sagittal.anomaly_map)) / 4
    np.testing.assert_allclose(prediction.anomaly_map, roots**2, atol=1e-5)
    # Below the arithmetic mean wherever the readings disagree; the reconstruction is still the weighted average.
    mean = (2 * axial.anomaly_map + coronal.anomaly_map + sagittal.anomaly_map) / 4
    assert (prediction.anomaly_map <= mean + 1e-6).all() and (prediction.anomaly_map < mean - 1e-3).any()
    np.testing.assert_allclose(prediction.reconstruction,
                               (2 * axial.reconstruction + coronal.reconstruction + sagittal.reconstruction) / 4,
                               atol=1e-6)


def test_dae_z_scores_each_reading_direction_on_its_own_healthy_statistics():
    torch.manual_seed(0)
    plain = build_model(DAEConfig(channels=(8, 16, 32))).eval()  # its statistics stay unfitted: raw maps
    two = build_model(DAEConfig(channels=(8, 16, 32), reading_directions=("axial", "coronal"),
                                reading_weights=(1.0, 1.0))).eval()
    two.load_state_dict(plain.state_dict())
    volumes = np.stack([healthy_like(seed)[0] for seed in range(3)])
    masks = np.stack([healthy_like()[1]] * 3)
    two.fit_map_statistics(volumes, masks)
    axial_stats = healthy_map_statistics(((plain.predict(v, m).anomaly_map, m) for v, m in zip(volumes, masks)),
                                         GRID)
    coronal_stats = healthy_map_statistics(((_read_across(plain, v, m, (0, 2, 1)), m)
                                            for v, m in zip(volumes, masks)), GRID)
    np.testing.assert_allclose(two.map_std.numpy(), axial_stats[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(two.map_std_coronal.numpy(), coronal_stats[1], rtol=1e-4, atol=1e-6)
    image, mask = healthy_like(5)
    image[20:30, 40:50, 30:40] = 0.1
    expected = (standardise_map(plain.predict(image, mask).anomaly_map, mask, *axial_stats)
                + standardise_map(_read_across(plain, image, mask, (0, 2, 1)), mask, *coronal_stats)) / 2
    np.testing.assert_allclose(two.predict(image, mask).anomaly_map, expected, atol=1e-3)


def test_a_checkpoint_keeps_each_reading_direction_s_statistics(tmp_path):
    torch.manual_seed(0)
    model = build_model(DAEConfig(channels=(8, 16, 32), reading_directions=("axial", "sagittal"),
                                  reading_weights=(0.7, 0.3))).eval()
    image, mask = healthy_like()
    model.fit_map_statistics(np.stack([healthy_like(seed)[0] for seed in (1, 2)]), np.stack([mask] * 2))
    path = tmp_path / "dae.pt"
    loaded = load_checkpoint(path, expected_sha256=save_checkpoint(Checkpoint(model, PreprocessConfig(), {}), path))
    assert loaded.model.map_std_sagittal.any() and not hasattr(loaded.model, "map_std_coronal")
    np.testing.assert_allclose(loaded.model.predict(image, mask).anomaly_map, model.predict(image, mask).anomaly_map,
                               atol=1e-5)


def test_dae_refuses_an_unknown_reading_or_training_direction_a_missing_weight_or_a_bad_power():
    with pytest.raises(UserInputError, match="reading_directions"):
        build_model(DAEConfig(reading_directions=("oblique",)))
    with pytest.raises(UserInputError, match="reading_weights"):
        build_model(DAEConfig(reading_directions=("axial", "coronal"), reading_weights=(1.0,)))
    with pytest.raises(UserInputError, match="training_directions"):
        build_model(DAEConfig(training_directions=("axial", "oblique")))
    for power in (0.0, 1.5):
        with pytest.raises(UserInputError, match="reading_power"):
            build_model(DAEConfig(reading_power=power))


def test_dae_learns_to_remove_its_noise():
    """A few steps on one slice already lower the denoising loss: the loss measures what it should."""
    torch.manual_seed(0)
    model = build_model(DAEConfig(channels=(8, 16, 32)))
    image, mask = healthy_like()
    x = torch.from_numpy(np.moveaxis(image, 2, 0)[38:42, None].copy())
    m = torch.from_numpy(np.moveaxis(mask, 2, 0)[38:42, None].astype(np.float32).copy())
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(x, m).total
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.fixture(scope="module")
def patch_model():
    model = build_model(PatchRetrievalConfig(neighbours=3, best_matches=1))
    volumes = np.stack([healthy_like(seed)[0] for seed in range(4)])
    masks = np.stack([healthy_like()[1]] * 4)
    model.fit(volumes, masks)
    model.fit_map_statistics(volumes, masks)
    return model


def test_patch_retrieval_returns_a_stored_healthy_scan_unchanged(patch_model):
    image, mask = healthy_like(2)  # stored as scan 2
    pseudo = patch_model.pseudo_healthy(torch.from_numpy(image), torch.from_numpy(mask.astype(np.float32)))
    assert np.abs(pseudo.numpy() - image)[mask].max() < 1 / 170  # its own patches match exactly (8-bit storage)


def test_patch_retrieval_replaces_an_anomaly_by_healthy_tissue(patch_model):
    image, mask = healthy_like(9)  # not stored
    lesion = image.copy()
    lesion[35:45, 40:50, 35:45] = 0.05
    prediction = patch_model._raw_prediction(lesion, mask)
    inside = prediction.residual[35:45, 40:50, 35:45]
    outside = prediction.residual[mask & (np.abs(np.indices(mask.shape)[0] - 40) > 15)]
    assert inside.mean() > 5 * outside.mean()
    assert np.abs(prediction.reconstruction[35:45, 40:50, 35:45] - image[35:45, 40:50, 35:45]).mean() < 0.1


def test_patch_retrieval_statistics_leave_each_scan_out(patch_model):
    """A stored scan must not find itself when the healthy map statistics are fitted (its error would be 0)."""
    image, mask = healthy_like(1)
    own = patch_model._raw_prediction(image, mask).residual[mask].mean()
    left_out = patch_model._raw_prediction(image, mask, exclude=1).residual[mask].mean()
    assert own < 1 / 170 < left_out


def _with_dark_slab(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A test brain with a flat, CSF-dark slab 4 voxels thick at a slightly different place in each scan."""
    image, mask = healthy_like(seed)
    start = 38 + seed % 3
    image[start:start + 4] = np.where(mask[start:start + 4], 0.1, 0)
    return image, mask


def test_patch_retrieval_coarse_search_sees_the_flat_interior_that_the_fine_one_copies():
    """The known weakness: small patches of dark CSF fill a dark lesion's flat interior, which then vanishes from the
    fine residual. On the coarse grid the patch spans the lesion, and no healthy neighbourhood is that dark."""
    model = build_model(PatchRetrievalConfig(neighbours=3, best_matches=1))
    model.fit(np.stack([_with_dark_slab(seed)[0] for seed in range(4)]), np.stack([healthy_like()[1]] * 4))
    image, mask = _with_dark_slab(9)
    lesion = image.copy()
    lesion[34:46, 42:54, 34:46] = 0.1  # 24 mm across, as dark as the slab it overlaps
    interior = (slice(37, 43), slice(45, 51), slice(37, 43))
    far = mask & (np.abs(np.indices(mask.shape)[0] - 40) > 20)
    fine = model._raw_prediction(lesion, mask).residual
    coarse = model.to_working_grid(model.coarse_raw_map(lesion, mask)[0], mask)
    assert fine[interior].mean() < 0.5 * fine[far].mean()
    assert coarse[interior].mean() > 5 * coarse[far].mean()
    healthy = model.to_working_grid(model.coarse_raw_map(image, mask)[0], mask)
    assert healthy[interior].mean() < healthy[far].mean()  # the slab itself is healthy: matched at both scales


def test_patch_retrieval_map_averages_the_two_scales_by_coarse_weight(patch_model):
    image, mask = healthy_like(9)
    image[35:45, 40:50, 35:45] = 0.05
    fine_only = build_model(PatchRetrievalConfig(neighbours=3, best_matches=1, coarse_weight=0.0))
    both = build_model(PatchRetrievalConfig(neighbours=3, best_matches=1, coarse_weight=1.0))
    for model in (fine_only, both):
        model.load_state_dict(patch_model.state_dict())
    coarse = both.predict(image, mask).anomaly_map
    fine = fine_only.predict(image, mask).anomaly_map
    mixed = patch_model.predict(image, mask).anomaly_map  # the default, coarse_weight 0.5
    assert np.isfinite(mixed).all() and not mixed[~mask].any()
    np.testing.assert_allclose(mixed, 0.5 * fine + 0.5 * coarse, atol=1e-5)
    assert not np.allclose(fine, coarse)


def test_patch_retrieval_divides_out_a_scan_wide_intensity_field(patch_model):
    """A healthy scan whose brain darkens towards the bottom finds no healthy match there unless the field is
    divided out first; with it, its residual is that of the scan as it should be, and the reconstruction comes back
    in the scan's own intensities."""
    image, mask = healthy_like(9)
    darkening = np.broadcast_to(np.linspace(0.6, 1.0, image.shape[2], dtype=np.float32), image.shape)
    darkened = image * darkening
    matched, plain = (build_model(PatchRetrievalConfig(neighbours=3, best_matches=1, intensity_field_degree=degree))
                      for degree in (2, 0))
    matched.load_state_dict(patch_model.state_dict())
    plain.load_state_dict(patch_model.state_dict())
    as_it_should_be = matched.predict(image, mask).residual[mask].mean()
    assert plain.predict(darkened, mask).residual[mask].mean() > 3 * as_it_should_be
    prediction = matched.predict(darkened, mask)
    assert prediction.residual[mask].mean() < 1.5 * as_it_should_be
    assert np.abs(prediction.reconstruction - darkened)[mask].mean() < 0.05


def test_patch_retrieval_checkpoint_from_before_the_field_option_keeps_no_field():
    """Its statistics were fitted on uncorrected scans; correcting its inputs now would misread every scan. A new
    model (`uad train` without options) gets the bundled default."""
    legacy = PatchRetrievalConfig().to_dict()
    del legacy["intensity_field_degree"]
    assert PatchRetrievalConfig.from_checkpoint(legacy).intensity_field_degree == 0
    assert PatchRetrievalConfig.from_checkpoint(PatchRetrievalConfig().to_dict()).intensity_field_degree == 2
    assert PatchRetrievalConfig.from_dict({}).intensity_field_degree == 2


def test_patch_retrieval_refuses_a_checkpoint_without_the_coarse_statistics(patch_model):
    state = {k: v for k, v in patch_model.state_dict().items() if not k.startswith("coarse_")}
    with pytest.raises(UserInputError, match="refit it with 'uad train --model patch-retrieval'"):
        build_model(PatchRetrievalConfig()).load_state_dict(state)


@pytest.mark.parametrize("option", [{"coarse_weight": 1.5}, {"coarse_weight": -0.1}, {"coarse_factor": 0}])
def test_patch_retrieval_refuses_impossible_coarse_options(option):
    with pytest.raises(UserInputError, match=next(iter(option))):
        build_model(PatchRetrievalConfig(**option))


def test_fusion_is_the_weighted_sum_of_its_members_maps():
    image, mask = healthy_like(3)
    lesion = image.copy()
    lesion[35:45, 40:50, 35:45] = 0.05
    single = build_model(FusionConfig(members=("intensity",), weights=(1.0,)))
    double = build_model(FusionConfig(members=("intensity", "intensity"), weights=(0.25, 0.5)))
    np.testing.assert_allclose(double.predict(lesion, mask).anomaly_map,
                               0.75 * single.predict(lesion, mask).anomaly_map, rtol=1e-5)


def test_fusion_smoothing_removes_a_speck_keeps_a_lesion_and_stays_inside_the_brain():
    brain = np.zeros((40, 40, 40), bool)
    brain[5:35, 5:35, 5:35] = True
    speck, lesion = np.zeros(brain.shape, np.float32), np.zeros(brain.shape, np.float32)
    speck[20, 20, 20] = 10.0
    lesion[15:25, 15:25, 15:25] = 10.0
    config = FusionConfig(members=("a", "b"), weights=(0.7, 0.3), smoothing_sigma_voxels=1.5)
    assert fuse_maps([speck, speck], brain, config).max() < 1.0  # a one-voxel blob: noise, averaged away
    assert fuse_maps([lesion, lesion], brain, config)[20, 20, 20] > 9.0  # a 2 cm lesion keeps its score
    edge = np.zeros(brain.shape, np.float32)
    edge[5:8, 5:35, 5:35] = 10.0
    assert not fuse_maps([edge, edge], brain, config)[~brain].any()
    unsmoothed = FusionConfig(members=("a", "b"), weights=(0.7, 0.3))
    np.testing.assert_allclose(fuse_maps([lesion, speck], brain, unsmoothed), 0.7 * lesion + 0.3 * speck)


def test_fusion_weights_follow_the_voxels_intensity_between_anchors():
    """White-matter-like voxels take the first member's map at its white-matter weight, grey-matter-like ones at
    the grey-matter weight, intensities between anchors a linear blend; the scale is the brain's 99th percentile,
    so a scan twice as bright fuses the same."""
    brain = np.zeros((20, 20, 20), bool)
    brain[2:18, 2:18, 2:18] = True
    image = np.where(brain, 0.5, 0.0).astype(np.float32)  # grey-matter-like
    image[2:18, 2:18, 10:18] = 1.0  # white-matter-like (the brain's 99th percentile)
    image[2:18, 2:18, 9] = 0.75  # half way between the two anchors
    first, second = np.full(brain.shape, 10.0, np.float32), np.zeros(brain.shape, np.float32)
    config = FusionConfig(members=("a", "b"), weights=(0.5, 0.5), intensity_anchors=(0.5, 1.0),
                          anchor_weights=((0.2, 0.8), (0.7, 0.3)))
    fused = fuse_maps([first, second], brain, config, image)
    assert fused[10, 10, 5] == pytest.approx(2.0)  # grey matter: 0.2 x 10
    assert fused[10, 10, 14] == pytest.approx(7.0)  # white matter: 0.7 x 10
    assert fused[10, 10, 9] == pytest.approx(4.5)  # between: 0.45 x 10
    assert not fused[~brain].any()
    np.testing.assert_allclose(fuse_maps([first, second], brain, config, 2 * image), fused, rtol=1e-6)
    with pytest.raises(ValueError, match="needs the image"):
        fuse_maps([first, second], brain, config)


def test_fusion_with_intensity_anchors_survives_its_checkpoint_and_refuses_malformed_rows(tmp_path):
    from uad.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from uad.preprocessing import PreprocessConfig

    image, mask = healthy_like(3)
    config = FusionConfig(members=("intensity", "intensity"), weights=(0.5, 0.5), intensity_anchors=(0.3, 0.8),
                          anchor_weights=((0.2, 0.8), (0.7, 0.3)))
    path = tmp_path / "fusion.pt"
    sha256 = save_checkpoint(Checkpoint(model=build_model(config), preprocessing=PreprocessConfig()), path)
    loaded = load_checkpoint(path, expected_sha256=sha256).model
    assert loaded.config.anchor_weights == ((0.2, 0.8), (0.7, 0.3))
    np.testing.assert_array_equal(loaded.predict(image, mask).anomaly_map,
                                  build_model(config).predict(image, mask).anomaly_map)
    for anchors, rows in (((0.3, 0.8), ((0.2, 0.8),)), ((0.8, 0.3), ((0.2, 0.8), (0.7, 0.3))),
                          ((0.3, 0.8), ((0.2,), (0.7, 0.3)))):
        with pytest.raises(UserInputError, match="intensity_anchors must increase"):
            build_model(FusionConfig(members=("a", "b"), weights=(0.5, 0.5), intensity_anchors=anchors,
                                     anchor_weights=rows))


def test_fitted_fusion_flags_nothing_where_no_healthy_training_scan_had_brain(tmp_path):
    """A scan whose brain reaches beyond the training brains (another site's stripping) is scored only where the
    members' healthy statistics exist, and the support survives saving and loading the checkpoint."""
    from uad.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from uad.preprocessing import PreprocessConfig

    image, mask = healthy_like(3)
    lesion = image.copy()
    lesion[mask] = 0.05  # everything anomalous, so a zero can only come from the support
    training_masks = np.stack([mask, mask])
    training_masks[:, :, :, :30] = False  # no training scan has brain in the lowest 30 slices
    fusion = build_model(FusionConfig(members=("intensity",), weights=(1.0,)))
    assert fusion.predict(lesion, mask).anomaly_map[:, :, :30][mask[:, :, :30]].min() > 0  # unfitted: no limit
    fusion.fit(np.stack([image, image]), training_masks)
    path = tmp_path / "fusion.pt"
    sha256 = save_checkpoint(Checkpoint(model=fusion, preprocessing=PreprocessConfig()), path)
    loaded = load_checkpoint(path, expected_sha256=sha256).model
    fused = loaded.predict(lesion, mask).anomaly_map
    assert not fused[:, :, :30].any()
    assert fused[:, :, 30:][mask[:, :, 30:]].min() > 0


def test_fusion_refuses_members_other_than_those_it_was_fitted_with():
    with pytest.raises(UserInputError, match="not the one this fusion was fitted with"):
        build_model(FusionConfig(members=("intensity",), weights=(1.0,), member_sha256=("0" * 64,))).load_members()
    with pytest.raises(UserInputError, match="one weight per member"):
        build_model(FusionConfig(members=("intensity", "dae"), weights=(1.0,)))
