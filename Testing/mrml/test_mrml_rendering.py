"""What a Slicer user sees: real slice views, drawn offscreen by Slicer's own slice logic and displayable managers.

trame-slicer builds the views Slicer builds (vtkMRMLSliceLogic, the segmentation and volume displayable
managers) on slicer-core and renders them through Mesa's software EGL, so no display or GPU is needed. The
scene is what the module makes after a real ``uad detect`` on the bundled sample scan (loaded as Slicer loads
it, qfac = -1 and all). Positions are compared in RAS millimetres through each view's own XY-to-RAS matrix.

Set ``UAD_SAVE_PICTURES=<folder>`` to keep the rendered views (Resources/slice-views.png in the README is
made that way).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import slicer
import slicer.util
import vtk
from vtk.util import numpy_support

from uad.mrml import nodes
from uad.mrml.logic import DetectionLogic, PostprocessSettings
from uad.mrml.sample_data import SAMPLE_FILE

VIEW_PIXELS = 320
FIELD_OF_VIEW_MM = 120.0
# Around a finding, what the overlay and the segment draw must agree to within this (about two voxels of the
# sample; the segment is made from the median-filtered map and dilated, the overlay shows the raw map).
AGREEMENT_MM = 3.0


@pytest.fixture(scope="module")
def slicer_app():
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    views = {
        "axial": app.view_manager.create_view(ViewLayoutDefinition.axial_view()),
        "coronal": app.view_manager.create_view(ViewLayoutDefinition.coronal_view()),
    }
    for view in views.values():
        view.render_window().SetSize(VIEW_PIXELS, VIEW_PIXELS)
        view.render()
    return app, views


@pytest.fixture(scope="module")
def sample_outputs(tmp_path_factory):
    """``uad detect`` on the bundled sample with the default model, run once for this file (about 30 s)."""
    from uad.cli import main

    out = tmp_path_factory.mktemp("sample") / "out"
    assert main(["detect", str(SAMPLE_FILE), "--out", str(out), "--skull-stripped", "--progress", "none"]) == 0
    return out


@pytest.fixture
def scene(slicer_app):
    """The app's scene; what a test adds is removed afterwards (the views' own nodes stay)."""
    app, _ = slicer_app
    before = {app.scene.GetNthNode(i).GetID() for i in range(app.scene.GetNumberOfNodes())}
    yield app.scene
    added = [app.scene.GetNthNode(i) for i in range(app.scene.GetNumberOfNodes())]
    for node in added:
        if node.GetID() not in before and app.scene.IsNodePresent(node):
            app.scene.RemoveNode(node)


def load_sample(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MSLUB patient26 T1")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(SAMPLE_FILE))
    assert storage.ReadData(volume)
    volume.CreateDefaultDisplayNodes()
    volume.GetDisplayNode().AutoWindowLevelOn()
    return volume


def rigid_transform(scene):
    transform = vtk.vtkTransform()
    transform.Translate(50.0, -20.0, 35.0)
    transform.RotateWXYZ(30.0, 0.3, 0.5, 1.0)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


class Screen:
    """One slice view: what it draws, and where each pixel is in RAS."""

    def __init__(self, scene, view):
        self.view = view
        self.slice_node = view.get_view_node()
        layout = self.slice_node.GetLayoutName()
        composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        self.composite = next(
            composites.GetItemAsObject(i)
            for i in range(composites.GetNumberOfItems())
            if composites.GetItemAsObject(i).GetLayoutName() == layout
        )

    def look_at(self, ras_world) -> None:
        # What Slicer's slice widget does on a resize (offscreen windows send no resize event).
        self.slice_node.SetDimensions(*self.view.render_window().GetSize(), 1)
        self.slice_node.SetFieldOfView(FIELD_OF_VIEW_MM, FIELD_OF_VIEW_MM, self.slice_node.GetFieldOfView()[2])
        self.slice_node.JumpSliceByCentering(*ras_world)

    def grab(self) -> np.ndarray:
        """The view's pixels (rows top to bottom, RGB)."""
        self.view.render()
        capture = vtk.vtkWindowToImageFilter()
        capture.SetInput(self.view.render_window())
        capture.ReadFrontBufferOff()
        capture.Update()
        image = capture.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
        return pixels[::-1, :, :3].copy()

    def ras(self, rows_columns: np.ndarray) -> np.ndarray:
        """RAS (n, 3) of pixels given as (row, column), through the slice node's XY-to-RAS."""
        height = self.slice_node.GetDimensions()[1]
        xy = np.c_[rows_columns[:, 1], height - 1 - rows_columns[:, 0], np.zeros(len(rows_columns))]
        matrix = slicer.util.arrayFromVTKMatrix(self.slice_node.GetXYToRAS())
        return (matrix @ np.c_[xy, np.ones(len(xy))].T).T[:, :3]

    def layers(self, outputs) -> dict[str, np.ndarray]:
        """The input alone, input + overlay, input + segment: and which pixels each layer changes."""
        segment_display = outputs.segmentation.GetDisplayNode()
        opacity = self.composite.GetForegroundOpacity()
        segment_display.SetVisibility(False)
        self.composite.SetForegroundOpacity(0.0)
        base = self.grab()
        self.composite.SetForegroundOpacity(1.0)
        overlay = self.grab()
        self.composite.SetForegroundOpacity(0.0)
        segment_display.SetVisibility(True)
        segment = self.grab()
        self.composite.SetForegroundOpacity(opacity)
        both = self.grab()
        # For the saved picture: the segment's outline over the map. (Offscreen, trame-slicer's views blend the
        # segment's fill against black rather than the image, which hides the map under it.)
        segment_display.SetVisibility2DFill(False)
        picture = self.grab()
        segment_display.SetVisibility2DFill(True)
        return {
            "base": base,
            "both": both,
            "picture": picture,
            "overlay": np.any(overlay != base, axis=2),
            "segment": np.any(segment != base, axis=2),
        }


def show(scene, logic, volume, out_dir):
    outputs = logic.load_outputs(volume, out_dir, settings_of(out_dir))
    logic.show_results(volume, "anomaly_map", 0.6)
    return outputs


def settings_of(out_dir) -> PostprocessSettings:
    import json

    config = json.loads((Path(out_dir) / "report.json").read_text())["postprocessing"]
    return PostprocessSettings(
        threshold=config["threshold"],
        median_filter=config["median_mm"] > 0,
        min_component_mm3=config["min_component_mm3"],
        top_k=config["top_k"],
    )


def top_finding_world(outputs) -> np.ndarray:
    table = outputs.findings.GetTable()
    assert table.GetNumberOfRows() > 0, "the detection flagged nothing on the MS sample"
    return np.array([table.GetValueByName(0, name).ToDouble() for name in ("r", "a", "s")])


def hottest_segmented_voxel_world(outputs, volume) -> np.ndarray:
    """Where the anomaly map, as its own node places it, peaks among the segmented voxels."""
    anomaly = slicer.util.arrayFromVolume(outputs.anomaly_map)
    segmented = slicer.util.arrayFromVolume(outputs.labelmap) > 0
    kji = np.unravel_index(np.argmax(np.where(segmented, anomaly, -np.inf)), anomaly.shape)
    return nodes.voxel_to_world(outputs.anomaly_map, kji[::-1])


def save(name: str, pixels: np.ndarray, tmp_path: Path) -> None:
    from skimage import io

    folders = [tmp_path] + ([Path(os.environ["UAD_SAVE_PICTURES"])] if os.environ.get("UAD_SAVE_PICTURES") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        io.imsave(str(folder / name), pixels, check_contrast=False)


@pytest.mark.parametrize("transformed", [False, True], ids=["as loaded", "under a parent transform"])
def test_segment_is_drawn_on_the_overlays_hot_spot(slicer_app, scene, sample_outputs, tmp_path, transformed):
    _, views = slicer_app
    volume = load_sample(scene)
    if transformed:
        volume.SetAndObserveTransformNodeID(rigid_transform(scene).GetID())
    logic = DetectionLogic(scene)
    outputs = show(scene, logic, volume, sample_outputs)
    hot_spot = hottest_segmented_voxel_world(outputs, volume)

    pictures = []
    for name, view in views.items():
        screen = Screen(scene, view)
        screen.look_at(hot_spot)
        drawn = screen.layers(outputs)
        assert drawn["overlay"].sum() > 20 and drawn["segment"].sum() > 20, name
        # The view shows the input: the background is not blank.
        assert drawn["base"].std() > 10, name

        near_hot_spot = {}
        for layer in ("overlay", "segment"):
            rows_columns = np.argwhere(drawn[layer])
            ras = screen.ras(rows_columns)
            close = np.linalg.norm(ras - hot_spot, axis=1) < 15.0  # this lesion, not others in the slice
            assert close.any(), f"{name}: no {layer} pixel within 15 mm of the hot spot"
            near_hot_spot[layer] = ras[close]
            # The hot spot itself is drawn: a pixel of this layer within a pixel's size of it.
            pixel_mm = FIELD_OF_VIEW_MM / VIEW_PIXELS
            nearest = np.linalg.norm(ras - hot_spot, axis=1).min()
            assert nearest < 1.5 * pixel_mm, f"{name}: the {layer} is drawn {nearest:.1f} mm from the hot spot"
        offset = np.linalg.norm(near_hot_spot["overlay"].mean(axis=0) - near_hot_spot["segment"].mean(axis=0))
        assert offset < AGREEMENT_MM, f"{name}: segment and overlay centres differ by {offset:.1f} mm"
        pictures.append(drawn["picture"])

    suffix = "-transformed" if transformed else ""
    save(f"slice-views{suffix}.png", np.concatenate(pictures, axis=1), tmp_path)


def scene_state(scene) -> dict:
    """What the user set up and must keep: nodes, view layers and positions, the input's voxels."""
    state = {"nodes": sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))}
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        c = composites.GetItemAsObject(i)
        state[c.GetID()] = (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
    slices = scene.GetNodesByClass("vtkMRMLSliceNode")
    for i in range(slices.GetNumberOfItems()):
        s = slices.GetItemAsObject(i)
        state[s.GetID()] = tuple(slicer.util.arrayFromVTKMatrix(s.GetSliceToRAS()).ravel())
    return state


def test_moving_the_threshold_changes_only_what_is_drawn_for_the_anomaly(slicer_app, scene, sample_outputs, tmp_path):
    _, views = slicer_app
    volume = load_sample(scene)
    logic = DetectionLogic(scene)
    outputs = show(scene, logic, volume, sample_outputs)
    finding = top_finding_world(outputs)
    peak = outputs.findings.GetTable().GetValueByName(0, "peak_score").ToDouble()
    input_voxels = slicer.util.arrayFromVolume(volume).copy()
    screen = Screen(scene, views["axial"])
    screen.look_at(finding)
    before = screen.layers(outputs)
    state = scene_state(scene)

    # Past the finding's peak score: its overlay and its segment disappear, the input stays as it was drawn.
    settings = settings_of(sample_outputs)
    above_peak = peak * 1.01
    logic.set_display_threshold(volume, above_peak)
    logic.update_postprocessing(volume, PostprocessSettings(**{**settings.__dict__, "threshold": above_peak}))
    after = screen.layers(outputs)

    def drawn_near(layers, layer):
        ras = screen.ras(np.argwhere(layers[layer]))
        return int((np.linalg.norm(ras - finding, axis=1) < 10.0).sum())

    assert drawn_near(before, "overlay") > 0 and drawn_near(before, "segment") > 0
    assert drawn_near(after, "overlay") == 0 and drawn_near(after, "segment") == 0
    assert np.array_equal(after["base"], before["base"])
    assert not np.array_equal(after["both"], before["both"])
    assert scene_state(scene) == state
    assert np.array_equal(slicer.util.arrayFromVolume(volume), input_voxels)
    save("threshold-before-after.png", np.concatenate([before["picture"], after["picture"]], axis=1), tmp_path)
