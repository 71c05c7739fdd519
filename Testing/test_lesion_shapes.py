"""Real lesion shapes placed into healthy working-grid volumes (EVALUATION.md protocol 2)."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from uad.lesion_shapes import (
    add_ovoid_lesions,
    add_stroke_lesion,
    add_stroke_lesions,
    lesion_shape_files,
    shape_on_grid,
)
from uad.preprocessing import WORKING_GRID

SOOP_AFFINE = np.array([[-1.0, 0, 0, 78], [0, 1, 0, -112], [0, 0, 1, -50], [0, 0, 0, 1]])  # as the SOOP masks


def ball_mask(path, centre_ras_mm, radius_mm: float = 8.0):
    """A 1 mm MNI-space mask with a ball at ``centre_ras_mm`` (world RAS), like a SOOP lesion file."""
    shape = (157, 189, 136)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = ijk @ SOOP_AFFINE[:3, :3].T + SOOP_AFFINE[:3, 3]
    data = (np.linalg.norm(world - np.asarray(centre_ras_mm), axis=-1) <= radius_mm).astype(np.uint8)
    nib.save(nib.Nifti1Image(data, SOOP_AFFINE), str(path))
    return path


def working_grid_world_ras(index) -> np.ndarray:
    """RAS mm of a working-grid voxel (the grid is defined in LPS)."""
    direction = np.reshape(WORKING_GRID.direction, (3, 3))
    lps = np.asarray(WORKING_GRID.origin) + direction @ (np.asarray(index) * WORKING_GRID.spacing)
    return lps * np.array([-1, -1, 1])


def test_a_shape_lands_at_its_own_mni_position(tmp_path):
    """A ball in the right hemisphere, anterior and superior stays there on the working grid."""
    centre = (30.0, 20.0, 25.0)  # RAS mm: right, anterior, superior
    fraction = shape_on_grid(ball_mask(tmp_path / "sub-1_lesion.nii.gz", centre))
    assert fraction.shape == WORKING_GRID.shape and 0 <= fraction.min() and fraction.max() <= 1
    centroid = np.argwhere(fraction >= 0.5).mean(axis=0)
    np.testing.assert_allclose(working_grid_world_ras(centroid), centre, atol=2.0)
    assert (fraction >= 0.5).sum() * 8 == pytest.approx(4 / 3 * np.pi * 8**3, rel=0.25)  # volume kept, in mm³


def test_the_lesion_is_dark_soft_edged_inside_the_brain_and_the_input_is_untouched(tmp_path):
    ball_mask(tmp_path / "sub-1_lesion.nii.gz", (30.0, 20.0, 25.0))
    ball_mask(tmp_path / "sub-2_lesion.nii.gz", (-20.0, -10.0, 10.0), radius_mm=1.0)  # too small to use
    shapes = lesion_shape_files(tmp_path)
    rng = np.random.default_rng(0)
    brain = np.zeros(WORKING_GRID.shape, bool)
    brain[10:70, 10:86, 10:70] = True
    image = np.where(brain, rng.uniform(0.5, 1.0, WORKING_GRID.shape), 0).astype(np.float32)
    original = image.copy()
    modified, truth, name = add_stroke_lesion(image, brain, rng, shapes, min_volume_ml=1.0)
    assert name == "sub-1_lesion.nii.gz" and np.array_equal(image, original)
    truth = truth.astype(bool)
    assert truth.any() and not (truth & ~brain).any()
    fill = np.percentile(original[brain], 5)
    np.testing.assert_allclose(modified[truth], fill, atol=1e-5)
    changed = ~np.isclose(modified, original)
    rim = changed & ~truth
    assert rim.any() and not (changed & ~brain).any()  # a blended edge, never outside the brain
    far = np.ones_like(brain)
    far[np.argwhere(truth).min(0)[0] - 5:np.argwhere(truth).max(0)[0] + 6] = False
    assert np.array_equal(modified[far], original[far])


def test_a_faint_lesion_goes_only_part_of_the_way_to_csf(tmp_path):
    """Validation lesions at partial contrast (real MS lesions on T1 are rarely CSF-dark): halfway is halfway."""
    shapes = [ball_mask(tmp_path / "sub-1_lesion.nii.gz", (30.0, 20.0, 25.0))]
    rng = np.random.default_rng(0)
    brain = np.zeros(WORKING_GRID.shape, bool)
    brain[10:70, 10:86, 10:70] = True
    image = np.where(brain, rng.uniform(0.5, 1.0, WORKING_GRID.shape), 0).astype(np.float32)
    fill = np.percentile(image[brain], 5)
    modified, truth, _ = add_stroke_lesion(image, brain, np.random.default_rng(1), shapes, contrast=0.5)
    inside = truth > 0
    np.testing.assert_allclose(modified[inside], (image[inside] + fill) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="contrast must be in"):
        add_stroke_lesion(image, brain, np.random.default_rng(1), shapes, contrast=0.0)


def test_a_size_window_draws_only_shapes_within_it(tmp_path):
    """Small shapes (MS-lesion sized) for validation: a window of 0.15-1 ml never gives the 2 ml ball."""
    ball_mask(tmp_path / "sub-1_lesion.nii.gz", (30.0, 20.0, 25.0))  # 2.1 ml
    ball_mask(tmp_path / "sub-2_lesion.nii.gz", (-20.0, -10.0, 10.0), radius_mm=4.0)  # 0.27 ml
    shapes = lesion_shape_files(tmp_path)
    brain = np.zeros(WORKING_GRID.shape, bool)
    brain[10:70, 10:86, 10:70] = True
    image = brain.astype(np.float32)
    rng = np.random.default_rng(0)
    drawn = {add_stroke_lesion(image, brain, rng, shapes, min_volume_ml=0.15, max_volume_ml=1.0)[2]
             for _ in range(6)}
    assert drawn == {"sub-2_lesion.nii.gz"}
    with pytest.raises(ValueError, match="no lesion shape of 3.0 to"):
        add_stroke_lesion(image, brain, rng, shapes, min_volume_ml=3.0)


def test_many_lesions_in_one_scan_are_all_in_its_truth(tmp_path):
    """MS-like validation cases: every painted shape is dark and in the truth; the input stays untouched."""
    ball_mask(tmp_path / "sub-1_lesion.nii.gz", (30.0, 20.0, 25.0), radius_mm=5.0)
    ball_mask(tmp_path / "sub-2_lesion.nii.gz", (-20.0, -10.0, 10.0), radius_mm=5.0)
    shapes = lesion_shape_files(tmp_path)
    brain = np.zeros(WORKING_GRID.shape, bool)
    brain[10:70, 10:86, 10:70] = True
    rng = np.random.default_rng(1)
    image = np.where(brain, rng.uniform(0.5, 1.0, WORKING_GRID.shape), 0).astype(np.float32)
    original = image.copy()
    modified, truth = add_stroke_lesions(image, brain, rng, shapes, count=6, min_volume_ml=0.1, max_volume_ml=1.0)
    assert np.array_equal(image, original)
    labels, n_lesions = ndimage.label(truth)
    assert n_lesions == 2  # six draws of two shapes: both land, each at its own position
    assert np.all(modified[truth > 0] < 0.6)  # CSF-dark: the darkest 5 % of 0.5-1


def test_ovoid_lesions_are_small_faint_and_centred_where_asked():
    """The MS-like validation kind: each lesion an ellipsoid of 0.05-0.5 ml around a voxel of ``centres_from``,
    only part of the way to CSF; the input stays untouched."""
    brain = np.zeros(WORKING_GRID.shape, bool)
    brain[10:70, 10:86, 10:70] = True
    centres = np.zeros_like(brain)
    centres[30:50, 40:60, 30:50] = True  # a "periventricular" block in the middle of the brain
    image = np.where(brain, 0.9, 0.1).astype(np.float32)
    image[10:20] = np.where(brain[10:20], 0.2, 0.1)  # a CSF-like slab: the darkest 5 % of the brain
    original = image.copy()
    modified, truth = add_ovoid_lesions(image, brain, np.random.default_rng(3), centres, count=12)
    assert np.array_equal(image, original)
    labels, n_lesions = ndimage.label(truth)
    assert 6 <= n_lesions <= 12  # some of twelve may touch one another
    volumes_ml = ndimage.sum(truth, labels, range(1, n_lesions + 1)) * 8 / 1000
    assert volumes_ml.min() >= 0.008 and volumes_ml.max() <= 1.0
    centroids = np.array(ndimage.center_of_mass(truth, labels, range(1, n_lesions + 1)))
    assert np.all((centroids >= [28, 38, 28]) & (centroids <= [52, 62, 52]))
    darkening = (original - modified)[truth > 0] / (0.9 - 0.2)  # fraction of the way to the CSF-like fill
    assert darkening.min() >= 0.15 - 1e-4 and 0.15 <= np.median(darkening) <= 0.4  # faint (overlaps add up)
