"""Small builders shared by the MRML tests (the fixtures themselves are in conftest.py)."""

from __future__ import annotations

import numpy as np
import slicer
import slicer.util

# (i, j, k) voxels of the test input: small, anisotropic and oblique.
INPUT_SHAPE = (40, 48, 24)


def oblique_affine(spacing=(1.1, 0.9, 2.5), angles_deg=(12.0, -8.0, 20.0), origin=(-30.0, 45.0, -20.0)) -> np.ndarray:
    """A rotated, anisotropic IJK-to-RAS matrix, as a scanner with a tilted slab would write."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def add_volume(scene, array_ijk: np.ndarray, affine: np.ndarray, name: str = "T1"):
    """A scalar volume whose voxel (i, j, k) holds ``array_ijk[i, j, k]`` at ``affine @ (i, j, k, 1)``."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    node.CreateDefaultDisplayNodes()
    return node


def add_slice_views(scene, names=("Red", "Yellow", "Green")) -> list:
    """The slice composite nodes the Slicer app creates for its three slice views."""
    composites = []
    for name in names:
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        composites.append(composite)
    return composites
