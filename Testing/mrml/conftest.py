"""A real vtkMRMLScene (slicer-core, no Slicer app) set up the way the Slicer application sets up its own."""

from __future__ import annotations

import numpy as np
import pytest
from slicer import vtkMRMLScene, vtkSlicerApplicationLogic, vtkSlicerSegmentationsModuleLogic

from .scene_helpers import INPUT_SHAPE, add_volume
from conftest import oblique_affine


@pytest.fixture
def scene():
    scene = vtkMRMLScene()
    app_logic = vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    segmentations_logic = vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)  # registers the labelmap <-> surface converters
    yield scene
    scene.Clear(1)


@pytest.fixture
def input_affine():
    return oblique_affine(origin=(-30.0, 45.0, -20.0))


@pytest.fixture
def input_volume(scene, input_affine):
    array = np.random.default_rng(0).normal(100.0, 10.0, size=INPUT_SHAPE).astype(np.float32)
    return add_volume(scene, array, input_affine)
