"""The panel's controls through the MRML logic with the real backend (`python -m uad detect`, the `intensity`
baseline) on the real test scan: the segmentation the panel shows is exactly the backend's post-processing of the
map with the panel's settings, after the run and after every control moves."""

from __future__ import annotations

import sys
import time

import nibabel as nib
import numpy as np
import pytest
import slicer.util

from uad import catalog
from uad.mrml.logic import DetectionLogic, DetectionRequest, PostprocessSettings
from uad.mrml.process import State
from uad.postprocessing import PostprocessConfig, median_filter, segment_filtered

from .scene_helpers import add_volume
from conftest import IXI_T1

REAL_BACKEND = [sys.executable, "-m", "uad"]


def ijk(node) -> np.ndarray:
    return slicer.util.arrayFromVolume(node).transpose(2, 1, 0)


def expected_segmentation(outputs, spacing, config: PostprocessConfig) -> np.ndarray:
    brain = ijk(outputs.brain_mask) > 0
    filtered = median_filter(ijk(outputs.anomaly_map).astype(np.float32), brain, spacing, config.median_mm)
    return segment_filtered(filtered, brain, spacing, config)


@pytest.fixture
def detected(scene, tmp_path):
    """One real detection through the logic, with the panel's settings (a lower threshold than the model's)."""
    image = nib.load(str(IXI_T1))
    volume = add_volume(scene, np.asanyarray(image.dataobj).astype(np.float32), image.affine, "IXI")
    logic = DetectionLogic(scene, backend_command=REAL_BACKEND, temp_root=tmp_path)
    threshold = 0.7 * catalog.get_model_info("intensity").threshold
    settings = PostprocessSettings(threshold=threshold, median_filter=True, min_component_mm3=30.0, top_k=5)
    job = logic.start(volume, DetectionRequest(model="intensity", device="cpu"), settings)
    assert job.process.wait(timeout=300) is State.SUCCEEDED, job.process.error_message
    deadline = time.monotonic() + 120
    while job.poll() is State.RUNNING and time.monotonic() < deadline:  # the outputs are read off the GUI thread
        time.sleep(0.05)
    outputs = logic.finish(job)
    return logic, volume, outputs, settings, tuple(float(s) for s in image.header.get_zooms()[:3])


def test_every_panel_control_reaches_the_segmentation(detected):
    logic, volume, outputs, settings, spacing = detected
    model = PostprocessConfig.from_dict({**catalog_defaults(), "threshold": settings.threshold})
    first = ijk(outputs.labelmap).copy()
    config = PostprocessConfig.from_dict({**model.to_dict(), "min_component_mm3": 30.0, "top_k": 5})
    np.testing.assert_array_equal(first > 0, expected_segmentation(outputs, spacing, config) > 0)

    changes = [
        dict(threshold=0.5 * settings.threshold),
        dict(min_component_mm3=400.0),
        dict(top_k=1),
        dict(median_filter=False),
    ]
    previous = first
    for change in changes:
        settings = PostprocessSettings(**{**settings.__dict__, **change})
        logic.update_postprocessing(volume, settings)
        shown = ijk(outputs.labelmap) > 0
        config = PostprocessConfig.from_dict({
            **config.to_dict(), "threshold": settings.threshold, "min_component_mm3": settings.min_component_mm3,
            "top_k": settings.top_k, "median_mm": model.median_mm if settings.median_filter else 0.0})
        np.testing.assert_array_equal(shown, expected_segmentation(outputs, spacing, config) > 0)
        assert not np.array_equal(shown, previous > 0), f"{change} changed nothing"
        previous = shown


def catalog_defaults() -> dict:
    from uad.checkpoint import load_checkpoint

    return load_checkpoint(catalog.get_model_info("intensity").path).calibrated_postprocessing().to_dict()
