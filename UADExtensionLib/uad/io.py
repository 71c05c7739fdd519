"""NIfTI in and out, with the checks that turn bad files into one-line errors.

A :class:`Volume` is a 3D float32 array in the file's own voxel order plus its RAS affine (nibabel
convention). Nothing here reorients or resamples: every output is written on the input's own grid.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from uad.errors import UserInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3D scalar image: ``data[i, j, k]`` sits at ``affine @ (i, j, k, 1)`` in RAS millimetres."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def load_volume(path: str | os.PathLike, what: str = "input") -> Volume:
    """Read a 3D NIfTI volume; raise :class:`UserInputError` for anything a user could have got wrong.

    Non-finite voxels (NaN, Inf) become 0: background, so that every later step stays finite.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{what} file not found: {path}; check the path")
    if path.is_dir():
        raise UserInputError(f"{what} is a folder, not a file: {path}; give a .nii or .nii.gz file")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise UserInputError(f"{what} is not a NIfTI file: {path.name}; convert it to .nii or .nii.gz first")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UserInputError(f"{what} file is truncated or corrupt ({exc}): {path}; copy or export it again") from exc
    except (nib.filebasedimages.ImageFileError, ValueError, OSError) as exc:
        if path.name.endswith(".gz") and not _gzip_is_whole(path):
            raise UserInputError(f"{what} file is truncated or corrupt: {path}; copy or export it again") from exc
        raise UserInputError(f"{what} cannot be read as NIfTI ({exc}): {path}; check it is a .nii/.nii.gz") from exc

    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise UserInputError(
            f"{what} is 4D ({data.shape[3]} volumes): {path}; extract one 3D volume (e.g. the T1) and pass that"
        )
    if data.ndim != 3 or min(data.shape) < 2:
        raise UserInputError(f"{what} is not a 3D volume (shape {data.shape}): {path}; pass a whole 3D scan")
    if np.iscomplexobj(data) or data.dtype.kind not in "biuf":
        raise UserInputError(f"{what} has an unsupported voxel type {data.dtype}: {path}; convert it to a scalar image")

    data = np.asarray(data, dtype=np.float32)
    data[~np.isfinite(data)] = 0.0
    if not np.any(data):
        raise UserInputError(f"{what} is empty (every voxel is zero): {path}; check that the right file was exported")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserInputError(f"{what} has an invalid orientation matrix: {path}; fix the header (qform/sform)")
    return Volume(data, affine)


def _gzip_is_whole(path: Path) -> bool:
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 24):
                pass
        return True
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        return False


def save_volume(volume: Volume, path: str | os.PathLike, dtype: type = np.float32) -> None:
    """Write ``volume`` as NIfTI with exactly its affine (qform and sform both set)."""
    image = nib.Nifti1Image(np.asarray(volume.data, dtype=dtype), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    nib.save(image, str(path))
