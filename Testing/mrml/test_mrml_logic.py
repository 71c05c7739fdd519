"""DetectionLogic against a real scene: loading outputs, re-thresholding, reuse, and a fake backend process."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicer
import slicer.util
import vtk

from uad.errors import UserInputError
from uad.mrml import nodes
from uad.mrml.logic import (
    DetectionError,
    DetectionLogic,
    DetectionRequest,
    PostprocessSettings,
    detect_arguments,
)
from uad.mrml.process import State

from .scene_helpers import INPUT_SHAPE, add_slice_views, add_volume
from .synthetic_outputs import THRESHOLD, synthetic_maps, write_out_dir

FAKE_BACKEND = [sys.executable, str(Path(__file__).with_name("fake_uad.py"))]
TERMINOLOGY_FILE = (
    Path(__file__).parents[2] / "UADExtension" / "Resources" / "SegmentationCategoryTypeModifier-UADExtension.term.json"
)
# The settings the synthetic out dir was made with (see synthetic_outputs.write_out_dir).
SETTINGS = PostprocessSettings(threshold=THRESHOLD, median_filter=True, min_component_mm3=20.0, top_k=10)


@pytest.fixture
def logic(scene, tmp_path):
    return DetectionLogic(
        scene,
        backend_command=FAKE_BACKEND,
        terminology=nodes.load_segment_terminology(TERMINOLOGY_FILE),
        temp_root=tmp_path,
    )


@pytest.fixture
def out_dir(tmp_path, input_affine):
    return write_out_dir(tmp_path / "out", INPUT_SHAPE, input_affine)


def labelmap_array(outputs) -> np.ndarray:
    return slicer.util.arrayFromVolume(outputs.labelmap)


def exported_segment(scene, outputs, reference) -> np.ndarray:
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(nodes.ANOMALY_SEGMENT_ID)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        outputs.segmentation, ids, exported, reference
    )
    array = slicer.util.arrayFromVolume(exported).copy()
    for node in (exported.GetDisplayNode(), exported):
        scene.RemoveNode(node)
    return array


def components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return ndimage.label(mask > 0, structure=np.ones((3, 3, 3)))[1]


def test_detect_arguments_spell_every_flag():
    request = DetectionRequest(model="vqvae", device="cpu", mask_size=32, skull_stripped=True)
    settings = PostprocessSettings(threshold=0.25, median_filter=False, min_component_mm3=80, top_k=0, refine="atropos")
    args = detect_arguments(request, settings, "/t/in.nii", "/t/out")
    assert args[:4] == ["detect", "/t/in.nii", "--out", "/t/out"]
    text = " ".join(args)
    for flag in ("--model vqvae", "--device cpu", "--mask-size 32", "--skull-stripped", "--threshold 0.25",
                 "--min-component-mm3 80.0", "--top-k 0", "--median-mm 0", "--refine atropos", "--progress json"):
        assert flag in text
    plain = " ".join(detect_arguments(DetectionRequest(model="ae"), PostprocessSettings(threshold=1.0), "i", "o"))
    assert "--mask-size" not in plain and "--skull-stripped" not in plain and "--median-mm" not in plain
    with pytest.raises(ValueError):
        DetectionRequest(model="x", device="gpu")
    with pytest.raises(ValueError):
        DetectionRequest(model="x", mask_size=48)


def test_loading_creates_every_output_on_the_inputs_grid(scene, logic, input_volume, input_affine, out_dir):
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)

    expected = {"reconstruction": "vtkMRMLScalarVolumeNode", "residual": "vtkMRMLScalarVolumeNode",
                "anomaly_map": "vtkMRMLScalarVolumeNode", "brain_mask": "vtkMRMLLabelMapVolumeNode",
                "labelmap": "vtkMRMLLabelMapVolumeNode", "segmentation": "vtkMRMLSegmentationNode"}
    for role, node_class in expected.items():
        assert getattr(outputs, role).IsA(node_class), role
    for node in (outputs.reconstruction, outputs.residual, outputs.anomaly_map, outputs.brain_mask, outputs.labelmap):
        assert np.array_equal(nodes.ijk_to_ras(node), nodes.ijk_to_ras(input_volume)), node.GetName()
        assert np.allclose(nodes.ijk_to_ras(node), input_affine)
        assert nodes.dimensions_kji(node) == INPUT_SHAPE[::-1]
    assert outputs.anomaly_map.GetImageData().GetScalarType() == vtk.VTK_FLOAT
    assert outputs.residual.GetImageData().GetScalarType() == vtk.VTK_FLOAT

    # Voxel values land where the files put them: (i, j, k) in the file is [k, j, i] in the node.
    maps = synthetic_maps(INPUT_SHAPE)
    assert np.allclose(slicer.util.arrayFromVolume(outputs.anomaly_map), maps["anomaly_map"].transpose(2, 1, 0))
    segmentation_file = np.asanyarray(nib.load(str(out_dir / "segmentation.nii.gz")).dataobj)
    assert np.array_equal(labelmap_array(outputs), segmentation_file.transpose(2, 1, 0))
    assert components(labelmap_array(outputs)) == 2

    # The segmentation is ready for Segment Editor: one terminology-tagged segment on the input's geometry.
    segmentation = outputs.segmentation
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is input_volume
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    segment = segmentation.GetSegmentation().GetSegment(nodes.ANOMALY_SEGMENT_ID)
    assert segment.GetName() == "Anomaly" and "99UAD^1^Anomaly" in segment.GetTerminology()
    assert np.array_equal(exported_segment(scene, outputs, input_volume), labelmap_array(outputs))


def test_every_output_says_how_it_was_made(logic, input_volume, out_dir):
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)
    for node in outputs.all():
        provenance = nodes.Provenance.from_attributes(node)
        assert provenance is not None, node.GetName()
        assert provenance.model == "fake-model"
        assert provenance.model_version == "3"
        assert provenance.weights_sha256 == "ab" * 32
        assert provenance.threshold == THRESHOLD
        assert provenance.device == "cpu"
        assert provenance.date == "2025-01-02T03:04:05+00:00"
        assert provenance.input_volume == "T1"
        assert provenance.postprocessing["median_mm"] == 3.0


def test_outputs_are_placed_next_to_the_input_in_the_data_tree(scene, logic, input_volume, out_dir):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 26")
    study = hierarchy.CreateStudyItem(patient, "MRI 2018")
    hierarchy.SetItemParent(hierarchy.CreateItem(study, input_volume), study)
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)
    for node in outputs.all():
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study, node.GetName()


def test_rethresholding_changes_labelmap_segment_and_provenance(scene, logic, input_volume, out_dir):
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)
    before = labelmap_array(outputs).copy()
    node_count = scene.GetNumberOfNodes()

    summary = logic.update_postprocessing(input_volume, replace(SETTINGS, threshold=0.7))
    assert scene.GetNumberOfNodes() == node_count
    after = labelmap_array(outputs)
    assert components(before) == 2 and components(after) == 1  # lesion B (peak 0.65) drops out
    assert 0 < summary.voxels == int(np.count_nonzero(after)) < int(np.count_nonzero(before))
    assert summary.volume_ml == pytest.approx(summary.voxels * 1.1 * 0.9 * 2.5 / 1000)
    assert np.array_equal(exported_segment(scene, outputs, input_volume), after)
    for node in outputs.all():
        assert nodes.Provenance.from_attributes(node).threshold == 0.7
    assert outputs.anomaly_map.GetDisplayNode().GetLowerThreshold() == 0.7

    # Back to the original threshold: the backend's segmentation again, bit for bit.
    logic.update_postprocessing(input_volume, SETTINGS)
    assert np.array_equal(labelmap_array(outputs), before)


def test_other_postprocessing_controls_take_effect(logic, input_volume, out_dir):
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)
    both = labelmap_array(outputs).copy()
    logic.update_postprocessing(input_volume, replace(SETTINGS, top_k=1))
    assert components(labelmap_array(outputs)) == 1
    logic.update_postprocessing(input_volume, replace(SETTINGS, min_component_mm3=1e5))
    assert not labelmap_array(outputs).any()
    logic.update_postprocessing(input_volume, replace(SETTINGS, median_filter=False))
    assert labelmap_array(outputs).any() and not np.array_equal(labelmap_array(outputs), np.zeros_like(both))
    provenance = nodes.Provenance.from_attributes(outputs.labelmap)
    assert provenance.postprocessing["median_mm"] == 0.0


def test_median_filter_runs_in_the_background_after_loading(logic, input_volume, out_dir):
    logic.load_outputs(input_volume, out_dir, SETTINGS)  # this out dir has no filtered map: it is computed
    deadline = time.monotonic() + 30
    while not logic.postprocessing_is_quick(input_volume, SETTINGS) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logic.postprocessing_is_quick(input_volume, SETTINGS)
    # Atropos runs on every update, so it is never "quick" (the panel shows a wait cursor), filtered map or not.
    assert not logic.postprocessing_is_quick(input_volume, replace(SETTINGS, refine="atropos"))


def test_rethresholding_works_after_the_cache_is_gone(scene, logic, input_volume, out_dir):
    """A scene loaded from disk has the nodes but no cached arrays: they are rebuilt from the nodes."""
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)
    expected = labelmap_array(outputs).copy()
    fresh = DetectionLogic(scene, backend_command=FAKE_BACKEND)
    assert fresh.has_results(input_volume)
    fresh.update_postprocessing(input_volume, replace(SETTINGS, threshold=0.7))
    fresh.update_postprocessing(input_volume, SETTINGS)
    assert np.array_equal(labelmap_array(outputs), expected)
    low, high = fresh.threshold_range(input_volume)
    assert low == 0.0 and high == pytest.approx(1.0, abs=0.01)  # up to lesion A's peak


def test_detecting_twice_reuses_the_output_nodes(scene, logic, input_volume, out_dir):
    first = logic.load_outputs(input_volume, out_dir, SETTINGS)
    node_count = scene.GetNumberOfNodes()
    second = logic.load_outputs(input_volume, out_dir, SETTINGS)
    assert [n.GetID() for n in second.all()] == [n.GetID() for n in first.all()]
    assert scene.GetNumberOfNodes() == node_count
    assert second.segmentation.GetSegmentation().GetNumberOfSegments() == 1

    # A second input gets its own outputs.
    other = add_volume(scene, np.ones(INPUT_SHAPE, np.float32), nodes.ijk_to_ras(input_volume), name="T1 follow-up")
    third = logic.load_outputs(other, out_dir, SETTINGS)
    assert not {n.GetID() for n in third.all()} & {n.GetID() for n in first.all()}
    assert third.anomaly_map.GetName() == "T1 follow-up UAD anomaly map"


def test_outputs_off_the_inputs_grid_are_refused_without_touching_the_scene(
    scene, logic, input_volume, input_affine, tmp_path
):
    shifted = input_affine.copy()
    shifted[:3, 3] += 5.0
    bad = write_out_dir(tmp_path / "shifted", INPUT_SHAPE, shifted)
    node_count = scene.GetNumberOfNodes()
    with pytest.raises(DetectionError, match="not on the input volume's voxel grid"):
        logic.load_outputs(input_volume, bad, SETTINGS)
    incomplete = write_out_dir(tmp_path / "incomplete", INPUT_SHAPE, input_affine)
    (incomplete / "residual.nii.gz").unlink()
    with pytest.raises(DetectionError, match="did not write residual.nii.gz"):
        logic.load_outputs(input_volume, incomplete, SETTINGS)
    assert scene.GetNumberOfNodes() == node_count
    assert nodes.find_output_nodes(input_volume) is None


def test_results_are_shown_as_an_overlay(scene, logic, input_volume, out_dir):
    composites = add_slice_views(scene)
    outputs = logic.load_outputs(input_volume, out_dir, SETTINGS)
    logic.show_results(input_volume, "anomaly_map", 0.6)
    assert {c.GetForegroundVolumeID() for c in composites} == {outputs.anomaly_map.GetID()}
    assert {c.GetBackgroundVolumeID() for c in composites} == {input_volume.GetID()}
    logic.show_results(input_volume, "residual", 0.3)
    assert {c.GetForegroundVolumeID() for c in composites} == {outputs.residual.GetID()}
    assert {c.GetForegroundOpacity() for c in composites} == {0.3}
    display = outputs.anomaly_map.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == THRESHOLD
    logic.set_display_threshold(input_volume, 0.8)
    assert display.GetLowerThreshold() == 0.8


def test_run_through_a_backend_process(scene, logic, input_volume, tmp_path):
    """The whole path: input written to NIfTI, a real child process, JSON progress, outputs loaded, temp removed."""
    events = []
    request = DetectionRequest(model="fake-model", device="cpu", skull_stripped=True)
    outputs = logic.run(input_volume, request, SETTINGS, on_progress=events.append, timeout=60)
    assert [e.stage for e in events] == ["load", "inference", "writing"]
    assert nodes.same_geometry(outputs.anomaly_map, input_volume)
    assert components(labelmap_array(outputs)) == 2
    assert not list(tmp_path.glob("UADExtension-*")), "the temporary folder was not removed"
    # The backend got the panel's settings, so its segmentation needed no recomputation.
    provenance = nodes.Provenance.from_attributes(outputs.segmentation)
    assert provenance.postprocessing["min_component_mm3"] == 20.0

    node_count = scene.GetNumberOfNodes()
    again = logic.run(input_volume, request, replace(SETTINGS, threshold=0.7), timeout=60)
    assert scene.GetNumberOfNodes() == node_count
    assert again.segmentation is outputs.segmentation
    assert components(labelmap_array(again)) == 1


def test_polling_like_the_panel_reads_outputs_off_the_gui_thread(scene, logic, input_volume):
    """The panel polls from a timer: the job stays RUNNING while a worker reads the files, then finish() only
    fills the nodes."""
    job = logic.start(input_volume, DetectionRequest(model="fake-model"), SETTINGS)
    states = []
    deadline = time.monotonic() + 60
    while (state := job.poll()) is State.RUNNING and time.monotonic() < deadline:
        states.append((job.process.state, state))
        time.sleep(0.01)
    assert state is State.SUCCEEDED
    assert (State.RUNNING, State.RUNNING) in states
    outputs = logic.finish(job)
    assert components(labelmap_array(outputs)) == 2
    assert not job.temp_dir.exists()


def test_cancel_while_reading_outputs_changes_nothing(scene, logic, input_volume):
    job = logic.start(input_volume, DetectionRequest(model="fake-model"), SETTINGS)
    assert job.process.wait(timeout=60) is State.SUCCEEDED
    node_count = scene.GetNumberOfNodes()
    job.poll()  # the reading of the files has started
    job.cancel()
    assert job.poll() is State.CANCELLED
    with pytest.raises(DetectionError, match="cancelled"):
        logic.finish(job)
    assert scene.GetNumberOfNodes() == node_count


def test_backend_error_is_one_line_and_leaves_the_scene_unchanged(scene, logic, input_volume, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_UAD_MODE", "error")
    logic.env = dict(os.environ)
    node_count = scene.GetNumberOfNodes()
    with pytest.raises(DetectionError) as error:
        logic.run(input_volume, DetectionRequest(model="fake-model"), SETTINGS, timeout=60)
    assert str(error.value) == "input is empty (every voxel is zero); export it again"
    assert scene.GetNumberOfNodes() == node_count
    assert not list(tmp_path.glob("UADExtension-*"))


def test_cancel_leaves_the_scene_as_it_was(scene, logic, input_volume, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_UAD_MODE", "hang")
    logic.env = dict(os.environ)
    node_count = scene.GetNumberOfNodes()
    job = logic.start(input_volume, DetectionRequest(model="fake-model"), SETTINGS)
    deadline = time.monotonic() + 30
    while (job.process.last_progress is None or job.process.last_progress.stage != "inference") and (
        time.monotonic() < deadline
    ):
        job.poll()
        time.sleep(0.02)
    assert job.poll() is State.RUNNING
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 1.0
    assert job.process.state is State.CANCELLED
    with pytest.raises(DetectionError):
        logic.finish(job)
    assert scene.GetNumberOfNodes() == node_count
    assert not job.temp_dir.exists()


def test_input_must_be_a_scalar_image(scene, logic):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(UserInputError, match="contains an image"):
        logic.start(empty, DetectionRequest(model="fake-model"), SETTINGS)


def test_rethreshold_of_a_256_cube_follows_the_slider(scene, tmp_path):
    """The issue's target: <= 0.3 s per slider step on a 256^3 map (measured after the one-off median filter)."""
    shape = (256, 256, 256)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    volume = add_volume(scene, np.zeros(shape, np.float32), affine, name="big")
    # A brain of realistic size (about 1.5 litres at 1 mm) in the cube, as in a 1 mm T1 of the whole head.
    out = write_out_dir(tmp_path / "big", shape, affine, median_mm=5.0, min_component_mm3=50.0,
                        brain_radius=(70, 85, 60))
    logic = DetectionLogic(scene)
    settings = PostprocessSettings(threshold=THRESHOLD, min_component_mm3=50.0)
    started = time.perf_counter()
    logic.load_outputs(volume, out, settings)
    print(f"loading 256^3 outputs: {time.perf_counter() - started:.2f} s")
    deadline = time.perf_counter() + 120
    while not logic.postprocessing_is_quick(volume, settings) and time.perf_counter() < deadline:
        time.sleep(0.2)  # the one-off median filter runs in the background after loading
    assert logic.postprocessing_is_quick(volume, settings)
    assert not logic.postprocessing_is_quick(volume, replace(settings, refine="atropos"))
    timings = []
    for threshold in (0.45, 0.55, 0.6, 0.7, 0.8, 0.5):
        started = time.perf_counter()
        logic.update_postprocessing(volume, replace(settings, threshold=threshold))
        timings.append(time.perf_counter() - started)
    print(f"re-threshold 256^3: median {np.median(timings):.3f} s, max {max(timings):.3f} s")
    assert np.median(timings) <= 0.3


def test_detect_arguments_are_accepted_by_the_real_cli():
    from uad.cli import build_parser

    request = DetectionRequest(model="vqvae", device="cuda", mask_size=32, skull_stripped=True)
    settings = PostprocessSettings(threshold=0.3, median_filter=False, min_component_mm3=10, top_k=0, refine="atropos")
    args = build_parser().parse_args(detect_arguments(request, settings, "in.nii", "out"))
    assert (args.command, args.input, args.out) == ("detect", ["in.nii"], "out")
    assert (args.model, args.device) == ("vqvae", "cuda")
    assert (args.mask_size, args.skull_stripped, args.threshold, args.median_mm) == (32, True, 0.3, 0.0)
    assert (args.min_component_mm3, args.top_k, args.refine, args.progress) == (10.0, 0, "atropos", "json")


def test_real_backend_error_reaches_the_user_as_one_line(scene, input_volume, tmp_path):
    """``python -m uad`` itself (not the fake), started the way Slicer starts it: PYTHONPATH -> the package."""
    package_parent = Path(__file__).parents[2] / "UADExtensionLib"
    python_path = os.pathsep.join(filter(None, [str(package_parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    logic = DetectionLogic(scene, backend_command=[sys.executable, "-m", "uad"], env=env, temp_root=tmp_path)
    node_count = scene.GetNumberOfNodes()
    with pytest.raises(DetectionError, match=r"^unknown model 'no-such-model'"):
        logic.run(input_volume, DetectionRequest(model="no-such-model", device="cpu"), SETTINGS, timeout=120)
    assert scene.GetNumberOfNodes() == node_count
    assert not list(tmp_path.glob("UADExtension-*"))
