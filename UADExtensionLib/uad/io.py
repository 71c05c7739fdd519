"""NIfTI in and out, with the checks that turn bad files into one-line errors.

A :class:`Volume` is a 3D float32 array in the file's own voxel order plus its RAS affine (nibabel
convention). Nothing here reorients or resamples: every output is written on the input's own grid.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from uad.errors import UserInputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class HeaderCodes:
    """The NIfTI header fields that say how to read the affine and the units; outputs copy the input's, so a
    viewer or a PACS treats them exactly as the input (an sform_code 0 input gives sform_code 0 outputs)."""

    qform_code: int = 1
    sform_code: int = 1
    spatial_unit: str = "mm"
    time_unit: str = "unknown"


@dataclass
class Volume:
    """A 3D scalar image: ``data[i, j, k]`` sits at ``affine @ (i, j, k, 1)`` in RAS millimetres."""

    data: np.ndarray
    affine: np.ndarray
    header_codes: HeaderCodes = field(default_factory=HeaderCodes)

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
    _check_file_type(path, what)
    try:
        image = nib.load(str(path))
        with np.errstate(over="ignore", invalid="ignore"):
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

    finite = np.isfinite(data)
    if not finite.any():
        raise UserInputError(f"{what} has no valid voxel (every voxel is NaN or infinite): {path}; "
                             f"check the export or the header's scale factor (scl_slope)")
    with np.errstate(over="ignore"):
        as_float32 = np.asarray(data, dtype=np.float32)
    overflowed = finite & ~np.isfinite(as_float32)
    if overflowed.any():
        slope = image.dataobj.slope if hasattr(image.dataobj, "slope") else 1.0
        raise UserInputError(f"{what} intensities overflow 32-bit floats ({int(overflowed.sum())} voxels beyond "
                             f"3.4e38; header scl_slope {slope:g}): {path}; fix the scale factor (scl_slope) or "
                             f"rescale the image")
    data = as_float32
    data[~finite] = 0.0
    if not np.any(data):
        raise UserInputError(f"{what} is empty (every voxel is zero): {path}; check that the right file was exported")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise UserInputError(f"{what} has an invalid orientation matrix: {path}; fix the header (qform/sform)")
    return Volume(data, affine, _header_codes(image))


def _check_file_type(path: Path, what: str) -> None:
    """Name what a file really is when its name says NIfTI but its content does not."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
        if path.name.endswith(".gz"):
            if head[:2] != GZIP_MAGIC:
                raise UserInputError(f"{what} is named .nii.gz but is not gzip-compressed: {path}; if it is an "
                                     f"uncompressed NIfTI, name it .nii, else export the scan again as NIfTI")
            with gzip.open(path) as stream:
                head = stream.read(348)
        else:
            with open(path, "rb") as stream:
                head = stream.read(348)
    except UserInputError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        return  # a truncated file: nibabel's reading says so
    if len(head) < 348 or not any(int.from_bytes(head[:4], order) in (348, 540) for order in ("little", "big")):
        raise UserInputError(f"{what} is not a NIfTI image (no NIfTI header in {path.name}); export the scan as "
                             f"NIfTI (.nii/.nii.gz), e.g. with dcm2niix for DICOM")


def _header_codes(image) -> HeaderCodes:
    header = image.header
    try:
        spatial, temporal = header.get_xyzt_units()
        return HeaderCodes(int(header["qform_code"]), int(header["sform_code"]), spatial or "unknown",
                           temporal or "unknown")
    except (KeyError, TypeError, ValueError):  # not a NIfTI-1/2 header (e.g. Analyze): keep the defaults
        return HeaderCodes()


def check_output_folder(out_dir: str | os.PathLike) -> None:
    """Fail now, with one line, if ``out_dir`` cannot be a writable folder (before hours of processing)."""
    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "exists" if existing == out_dir else f"goes through {existing}, which"
        raise UserInputError(f"the output path {out_dir} {where} is a file, not a folder; choose another --out")
    try:
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".uad-write-test-")
        probe.close()
    except OSError as exc:
        raise unwritable_error(out_dir, exc) from exc


def unwritable_error(out_dir: str | os.PathLike, exc: OSError) -> UserInputError:
    reason = exc.strerror or type(exc).__name__
    return UserInputError(f"cannot write to the output folder {out_dir} ({reason}); choose a writable --out")


def _gzip_is_whole(path: Path) -> bool:
    try:
        with gzip.open(path) as stream:
            while stream.read(1 << 24):
                pass
        return True
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError):
        return False


def save_volume(volume: Volume, path: str | os.PathLike, dtype: type = np.float32) -> None:
    """Write ``volume`` as NIfTI with exactly its affine and its header codes (qform/sform codes, units)."""
    image = nib.Nifti1Image(np.asarray(volume.data, dtype=dtype), volume.affine)
    codes = volume.header_codes
    image.set_qform(volume.affine, code=codes.qform_code)
    image.set_sform(volume.affine, code=codes.sform_code)
    image.header.set_xyzt_units(codes.spatial_unit, codes.time_unit)
    nib.save(image, str(path))
