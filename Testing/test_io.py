import gzip

import nibabel as nib
import numpy as np
import pytest

from uad.errors import UserInputError
from uad.io import Volume, load_volume, save_volume

from conftest import oblique_affine


def test_round_trip_keeps_data_and_affine_exactly(write_nifti, tmp_path):
    affine = oblique_affine()
    data = np.random.default_rng(0).random((7, 8, 9)).astype(np.float32)
    volume = load_volume(write_nifti(data, affine))
    assert volume.shape == (7, 8, 9)
    np.testing.assert_allclose(volume.spacing, [1.1, 0.9, 2.5], atol=1e-5)
    save_volume(volume, tmp_path / "copy.nii.gz")
    again = nib.load(str(tmp_path / "copy.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(again.dataobj), data)
    np.testing.assert_allclose(again.affine, affine, atol=1e-5)


def test_non_finite_voxels_become_background(write_nifti):
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.nan, np.inf, -np.inf
    volume = load_volume(write_nifti(data))
    assert np.isfinite(volume.data).all()
    assert volume.data[0, 0, 0] == 0 and volume.data[3, 3, 3] == 1


def test_single_volume_4d_is_accepted(write_nifti):
    assert load_volume(write_nifti(np.ones((4, 5, 6, 1), np.float32))).shape == (4, 5, 6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, w: d / "missing.nii.gz", "not found"),
        (lambda d, w: d, "folder"),
        (lambda d, w: (d / "scan.txt").write_text("hello") and d / "scan.txt", "not a NIfTI"),
        (lambda d, w: (d / "junk.nii").write_bytes(b"\0" * 100) and d / "junk.nii", "not a NIfTI image"),
        (lambda d, w: w(np.ones((5, 5, 5, 3), np.float32)), "4D"),
        (lambda d, w: w(np.ones((5, 5), np.float32)), "not a 3D volume"),
        (lambda d, w: w(np.ones((5, 5, 1), np.float32)), "not a 3D volume"),
        (lambda d, w: w(np.zeros((5, 5, 5), np.float32)), "empty"),
    ],
)
def test_bad_inputs_give_one_line_errors(tmp_path, write_nifti, make, message):
    path = make(tmp_path, write_nifti)
    with pytest.raises(UserInputError, match=message) as error:
        load_volume(path)
    assert "\n" not in str(error.value)


def test_truncated_gzip_is_reported(write_nifti, tmp_path):
    path = write_nifti(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserInputError, match="truncated or corrupt"):
        load_volume(truncated)
    assert gzip.decompress(raw)  # the original is intact: we only read


def test_volume_spacing_from_affine():
    assert np.allclose(Volume(np.zeros((2, 2, 2)), np.diag([2.0, 3.0, 4.0, 1.0])).spacing, [2, 3, 4])
