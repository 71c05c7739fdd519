"""Small builders shared by the MRML tests (the fixtures themselves are in conftest.py)."""

from __future__ import annotations

import numpy as np
import slicer
import slicer.util

# (i, j, k) voxels of the test input: small, anisotropic and oblique.
INPUT_SHAPE = (40, 48, 24)


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
