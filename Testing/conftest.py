"""Shared fixtures: real bundled scans and small volumes written as real NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Tests share 2 cores with whatever else runs; one thread each keeps timings stable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # as the command line does: repeatable runs

DATA_DIR = Path(__file__).parent / "data"
IXI_T1 = DATA_DIR / "IXI034-HH-1260_T1.nii.gz"
IXI_MASK = DATA_DIR / "IXI034-HH-1260_brainmask.nii.gz"


def oblique_affine(spacing=(1.1, 0.9, 2.5), angles_deg=(12.0, -8.0, 20.0), origin=(-80.0, 95.0, -60.0)) -> np.ndarray:
    """A rotated, anisotropic voxel-to-RAS affine, as a scanner with a tilted slab would write."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def write_nifti(tmp_path):
    """write_nifti(array, affine, name) -> path of a real .nii.gz file."""

    def write(array, affine=None, name="volume.nii.gz"):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
        return path

    return write


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``uad ARGV`` in this process: (exit code, stdout, stderr)."""
    from uad.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse usage errors exit directly
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
