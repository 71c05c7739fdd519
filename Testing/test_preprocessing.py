"""Geometry: whatever the input's orientation and spacing, outputs land on the input's own voxels."""

import ants
import numpy as np
import pytest
from models.synthetic_brain import healthy_like

from uad import resources
from uad.errors import UserInputError
from uad.io import Volume, load_volume
from uad.preprocessing import (
    WORKING_GRID,
    PreprocessConfig,
    ants_affine,
    background_value,
    normalise_intensity,
    preprocess,
    reference_intensity_field,
    to_ants,
)

from conftest import IXI_MASK, IXI_T1, oblique_affine

# A point inside the left frontal white matter, in RAS millimetres (MNI space).
MARKER_RAS = np.array([-22.0, 18.0, 24.0])
# Deep inside the right hemisphere: set to exactly 0, as dark CSF can be in a stripped, bias-corrected scan.
ZERO_RAS = np.array([25.0, -10.0, 20.0])


def ras_to_voxel(affine: np.ndarray, point: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(affine) @ np.append(point, 1.0))[:3]


def voxel_to_ras(affine: np.ndarray, voxel) -> np.ndarray:
    return (affine @ np.append(np.asarray(voxel, float), 1.0))[:3]


def test_ants_conversion_is_exact_for_oblique_anisotropic_affines():
    affine = oblique_affine()
    data = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    image = to_ants(Volume(data, affine))
    np.testing.assert_allclose(ants_affine(image), affine, atol=1e-6)
    np.testing.assert_array_equal(image.numpy(), data)


def moved(point: np.ndarray) -> np.ndarray:
    """Where MNI point ``point`` lies in the oblique brain: the brain is rotated 10 degrees and shifted 15 mm, so
    registration is far from the identity and a transform applied the wrong way round lands centimetres off."""
    return BRAIN_MOTION[:3, :3] @ point + BRAIN_MOTION[:3, 3]


_angle = np.deg2rad(10.0)
BRAIN_MOTION = np.array([[np.cos(_angle), -np.sin(_angle), 0, 9.0], [np.sin(_angle), np.cos(_angle), 0, -12.0],
                         [0, 0, 1, 0.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def oblique_brain() -> Volume:
    """The MNI brain resampled onto a tilted, anisotropic grid and then moved by BRAIN_MOTION, with a bright
    marker at MARKER_RAS (before the motion: at moved(MARKER_RAS) in the input)."""
    affine = oblique_affine(spacing=(1.4, 1.7, 2.3), angles_deg=(9.0, -6.0, 14.0), origin=(0, 0, 0))
    shape = (120, 110, 80)
    centre_voxel = (np.array(shape) - 1) / 2
    affine[:3, 3] = np.array([0.0, -18.0, 8.0]) - affine[:3, :3] @ centre_voxel  # brain centre in the middle
    target = to_ants(Volume(np.zeros(shape, np.float32), affine))
    data = ants.resample_image_to_target(resources.template_image("mni_brain"), target, interp_type="linear").numpy()
    marker = np.round(ras_to_voxel(affine, MARKER_RAS)).astype(int)
    data[tuple(slice(v - 1, v + 2) for v in marker)] = data.max() * 1.4
    zero = np.round(ras_to_voxel(affine, ZERO_RAS)).astype(int)
    data[tuple(slice(v - 1, v + 2) for v in zero)] = 0.0
    return Volume(data.astype(np.float32), BRAIN_MOTION @ affine)  # voxel v now lies at the moved position


def test_marker_lands_where_it_should_both_ways(oblique_brain):
    prep = preprocess(oblique_brain, PreprocessConfig(), skull_stripped=True)
    try:
        grid_affine = ants_affine(WORKING_GRID.reference_image())
        # forward: the bright marker sits at the same physical point on the working grid (registration ~ identity)
        found = voxel_to_ras(grid_affine, np.unravel_index(np.argmax(prep.image), prep.image.shape))
        assert np.linalg.norm(found - MARKER_RAS) < 5.0

        # backward: a marker placed on the working grid at an MNI point comes back to where that anatomy is in
        # the input (the inverse transform; the forward one would land about 2 x 16 mm away)
        grid_marker = np.zeros(WORKING_GRID.shape, np.float32)
        voxel = np.round(ras_to_voxel(grid_affine, MARKER_RAS)).astype(int)
        grid_marker[tuple(voxel)] = 1.0
        back = prep.to_input_space(grid_marker)
        assert back.shape == oblique_brain.shape
        landed = voxel_to_ras(oblique_brain.affine, np.unravel_index(np.argmax(back), back.shape))
        assert np.linalg.norm(landed - moved(MARKER_RAS)) < 4.0

        # and forward again: a marker on the input grid (a lesion label) reaches the working grid at the same point
        input_marker = np.zeros(oblique_brain.shape, np.float32)
        input_marker[tuple(np.round(ras_to_voxel(oblique_brain.affine, moved(MARKER_RAS))).astype(int))] = 1.0
        there = prep.to_working_grid(input_marker)
        assert there.shape == WORKING_GRID.shape
        found = voxel_to_ras(grid_affine, np.unravel_index(np.argmax(there), there.shape))
        assert np.linalg.norm(found - MARKER_RAS) < 5.0

        # the brain mask comes back on the input grid too, covering the brain and little else
        mask = prep.input_brain_mask.data.astype(bool)
        inside = oblique_brain.data > 0
        assert mask.shape == oblique_brain.shape
        assert (mask & inside).sum() / inside.sum() > 0.95
        zero = tuple(np.round(ras_to_voxel(oblique_brain.affine, moved(ZERO_RAS))).astype(int))
        assert oblique_brain.data[zero] == 0 and mask[zero]  # zeros inside a stripped brain are brain
    finally:
        prep.close()


def test_full_head_scan_gets_a_brain_mask_from_the_template():
    volume = load_volume(IXI_T1)
    truth = load_volume(IXI_MASK).data > 0
    prep = preprocess(volume, PreprocessConfig())
    try:
        mask = prep.input_brain_mask.data.astype(bool)
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.85, f"template brain mask agrees poorly with the subject's mask (Dice {dice:.2f})"
        assert prep.image.shape == WORKING_GRID.shape and np.isfinite(prep.image).all()
        assert set(prep.seconds) == {"preprocessing", "registration"}
    finally:
        prep.close()


def test_normalisation_maps_the_percentile_to_one():
    image = np.linspace(0, 200, 1000, dtype=np.float32).reshape(10, 10, 10)
    mask = np.ones_like(image, bool)
    normalised, scale = normalise_intensity(image, mask, PreprocessConfig(normalisation_percentile=50))
    assert scale == pytest.approx(100, rel=0.01)
    assert normalised.max() == pytest.approx(1.5)  # capped


def test_reference_field_recovers_a_smooth_bias_and_is_not_bent_by_a_lesion():
    """A scan darkening from top to bottom (as N4 leaves some sites' scans), with a dark lesion: the fitted field is
    the darkening, also under the lesion, so dividing it out restores the healthy level without erasing the lesion."""
    reference, mask = healthy_like(0)
    scan, _ = healthy_like(1)
    z = np.linspace(-1, 1, scan.shape[2])[None, None, :]
    true_field = np.broadcast_to(np.exp(0.3 * z - 0.2 + 0.05 * z ** 2), scan.shape)
    lesion = (slice(30, 42), slice(40, 52), slice(30, 42))
    scan[lesion] = 0.1
    field = reference_intensity_field(scan * true_field, mask, reference, degree=2)
    assert np.abs(field / true_field - 1)[mask].max() < 0.05
    assert np.abs(field / true_field - 1)[lesion].max() < 0.03
    corrected = scan * true_field / field
    assert corrected[lesion].mean() < 0.2 < 0.5 < corrected[mask].mean()


def test_reference_field_is_flat_for_a_scan_already_on_the_reference_level():
    reference, mask = healthy_like(0)
    field = reference_intensity_field(healthy_like(1)[0], mask, reference, degree=3)
    assert np.abs(field - 1)[mask].max() < 0.02


def test_empty_brain_region_is_a_user_error():
    with pytest.raises(UserInputError, match="no signal"):
        normalise_intensity(np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), bool), PreprocessConfig())


def test_mismatched_brain_mask_is_a_user_error():
    volume = Volume(np.ones((10, 10, 10), np.float32), np.eye(4))
    with pytest.raises(UserInputError, match="brain mask shape"):
        preprocess(volume, PreprocessConfig(), brain_mask=Volume(np.ones((9, 10, 10), np.float32), np.eye(4)))


def test_background_is_the_minimum_only_when_it_fills_the_background():

    z_scored = np.full((20, 20, 20), -5.0, np.float32)
    z_scored[5:15, 5:15, 5:15] = np.random.default_rng(0).normal(0, 1, (10, 10, 10))
    assert background_value(z_scored) == -5.0  # BraTS-like: the whole background holds the minimum
    stripped = np.zeros((20, 20, 20), np.float32)
    stripped[5:15, 5:15, 5:15] = 100.0
    stripped[5, 5, 5] = -51.0  # MSLUB-like interpolation noise: not a background, no shift
    assert background_value(stripped) == 0.0


def test_single_threaded_registration_repeats_bit_for_bit(tmp_path):
    """What `uad evaluate` relies on for figures that repeat: two fresh processes with one ITK thread give the
    same working-grid volume and mask (multi-threaded registration sums its metric in a varying order)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from uad.io import load_volume\n"
        "from uad.preprocessing import PreprocessConfig, preprocess\n"
        f"scan, mask = load_volume({str(IXI_T1)!r}), load_volume({str(IXI_MASK)!r})\n"
        "prep = preprocess(scan, PreprocessConfig(), brain_mask=mask)\n"
        "np.savez(sys.argv[1], image=prep.image, mask=prep.brain_mask)\n"
    )
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    runs = []
    for index in range(2):
        out = tmp_path / f"run{index}.npz"
        subprocess.run([sys.executable, "-c", script, str(out)], env=env, check=True)
        runs.append(np.load(out))
    np.testing.assert_array_equal(runs[0]["image"], runs[1]["image"])
    np.testing.assert_array_equal(runs[0]["mask"], runs[1]["mask"])
