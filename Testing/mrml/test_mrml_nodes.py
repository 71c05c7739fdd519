"""Scene-level building blocks against a real vtkMRMLScene: geometry, segments, terminology, views, provenance."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import slicer
import slicer.util
import vtk

from uad.mrml import nodes
from uad.mrml.logic import write_volume_file

from .scene_helpers import INPUT_SHAPE, add_slice_views

EXPORT = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode
TERMINOLOGY_FILE = (
    Path(__file__).parents[2] / "UADExtension" / "Resources" / "SegmentationCategoryTypeModifier-UADExtension.term.json"
)


def ras_of_voxel(node, ijk) -> np.ndarray:
    return (nodes.ijk_to_ras(node) @ np.array([*ijk, 1.0]))[:3]


def test_array_order_and_geometry_of_an_oblique_anisotropic_volume(scene, input_volume, input_affine):
    assert nodes.dimensions_kji(input_volume) == INPUT_SHAPE[::-1]
    assert np.allclose(nodes.ijk_to_ras(input_volume), input_affine)
    assert np.allclose(nodes.spacing_kji(input_volume), (2.5, 0.9, 1.1))

    # A volume filled on the input's grid holds voxel (i, j, k) of an (i, j, k) array at the same RAS point.
    array_ijk = np.arange(np.prod(INPUT_SHAPE), dtype=np.float32).reshape(INPUT_SHAPE)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")
    nodes.set_volume_array(output, nodes.kji_from_ijk(array_ijk), input_volume)
    assert nodes.same_geometry(output, input_volume)
    i, j, k = 31, 7, 19
    assert slicer.util.arrayFromVolume(output)[k, j, i] == array_ijk[i, j, k]
    assert np.allclose(ras_of_voxel(output, (i, j, k)), (input_affine @ np.array([i, j, k, 1.0]))[:3])


def test_input_written_for_the_backend_keeps_voxels_and_affine(tmp_path, input_volume, input_affine):
    path = tmp_path / "input.nii"
    write_volume_file(input_volume, path)
    image = nib.load(str(path))
    assert image.shape == INPUT_SHAPE
    assert np.allclose(image.affine, input_affine, atol=1e-4)
    assert np.allclose(
        nodes.kji_from_ijk(np.asanyarray(image.dataobj)), slicer.util.arrayFromVolume(input_volume), atol=1e-4
    )


def test_output_nodes_are_created_once_and_then_reused(scene, input_volume):
    first, created = nodes.get_or_create_output_nodes(scene, input_volume)
    assert len(created) == len(nodes.OUTPUT_SPECS)
    assert [n.GetClassName() for n in first.all()] == [s.node_class for s in nodes.OUTPUT_SPECS.values()]
    assert first.anomaly_map.GetName() == "T1 UAD anomaly map"
    count = scene.GetNumberOfNodes()
    second, created_again = nodes.get_or_create_output_nodes(scene, input_volume)
    assert created_again == []
    assert [n.GetID() for n in second.all()] == [n.GetID() for n in first.all()]
    assert scene.GetNumberOfNodes() == count
    assert nodes.find_output_nodes(input_volume).segmentation is first.segmentation

    scene.RemoveNode(first.residual)  # a user deletes one output: only that one is recreated
    third, created_once_more = nodes.get_or_create_output_nodes(scene, input_volume)
    assert [n.GetClassName() for n in created_once_more] == ["vtkMRMLScalarVolumeNode"]
    assert third.segmentation is first.segmentation


def test_segment_round_trips_through_the_labelmap(scene, input_volume):
    mask = np.zeros(INPUT_SHAPE[::-1], np.uint8)
    mask[5:12, 10:20, 8:30] = 1
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    nodes.set_volume_array(labelmap, mask, input_volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    nodes.set_reference_geometry(segmentation, input_volume)
    segment_id = nodes.ensure_segment(segmentation, nodes.load_segment_terminology(TERMINOLOGY_FILE))
    nodes.write_segment_from_labelmap(segmentation, segment_id, labelmap)

    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert EXPORT(segmentation, ids, exported, input_volume)
    assert nodes.same_geometry(exported, input_volume)
    assert np.array_equal(slicer.util.arrayFromVolume(exported) > 0, mask > 0)

    # Writing again replaces the voxels but keeps the segment (id, name, colour, terminology).
    mask[:] = 0
    mask[2:4, 2:4, 2:4] = 1
    nodes.set_volume_array(labelmap, mask, input_volume)
    nodes.write_segment_from_labelmap(segmentation, segment_id, labelmap)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert EXPORT(segmentation, ids, exported, input_volume)
    assert np.array_equal(slicer.util.arrayFromVolume(exported) > 0, mask > 0)


def test_terminology_file_loads_in_slicer_and_matches_the_segment_entry():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    context = logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    assert context == "Segmentation category and type - UADExtension"
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, "anomaly", entry)

    terminology = nodes.load_segment_terminology(TERMINOLOGY_FILE)
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(terminology.entry, parsed)
    assert parsed.GetTypeObject().GetCodeMeaning() == entry.GetTypeObject().GetCodeMeaning() == "Anomaly"
    assert parsed.GetTypeObject().GetCodeValue() == entry.GetTypeObject().GetCodeValue()
    assert parsed.GetCategoryObject().GetCodeValue() == "49755003"  # Morphologically Altered Structure
    assert parsed.GetRegionObject().GetCodeMeaning() == "Brain"
    assert logic.SerializeTerminologyEntry(parsed) == terminology.entry
    assert terminology.name == "Anomaly"
    assert all(0.0 <= c <= 1.0 for c in terminology.color)


def test_segment_carries_the_terminology(scene, input_volume):
    terminology = nodes.load_segment_terminology(TERMINOLOGY_FILE)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segment_id = nodes.ensure_segment(segmentation, terminology)
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment_id == nodes.ANOMALY_SEGMENT_ID
    assert segment.GetName() == "Anomaly"
    assert segment.GetTerminology() == terminology.entry
    assert np.allclose(segment.GetColor(), terminology.color)


def test_outputs_go_under_the_inputs_folder(scene, input_volume):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Study 1")
    input_item = hierarchy.GetItemByDataNode(input_volume) or hierarchy.CreateItem(study, input_volume)
    hierarchy.SetItemParent(input_item, study)
    outputs, _ = nodes.get_or_create_output_nodes(scene, input_volume)
    nodes.place_next_to(scene, outputs.all(), input_volume)
    for node in outputs.all():
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study


def test_outputs_follow_the_inputs_transform(scene, input_volume):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    input_volume.SetAndObserveTransformNodeID(transform.GetID())
    outputs, _ = nodes.get_or_create_output_nodes(scene, input_volume)
    nodes.follow_transform(outputs.all(), input_volume)
    placed = [node for node in outputs.all() if node is not outputs.findings]  # a table has no place
    assert {node.GetTransformNodeID() for node in placed} == {transform.GetID()}


def test_overlay_in_every_slice_view(scene, input_volume):
    composites = add_slice_views(scene)
    overlay = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "map")
    nodes.show_in_slice_views(scene, input_volume, overlay, opacity=0.4)
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == input_volume.GetID()
        assert composite.GetForegroundVolumeID() == overlay.GetID()
        assert composite.GetForegroundOpacity() == 0.4
    users_view = add_slice_views(scene, ["Slice4"])[0]  # a view the user set up with another overlay
    users_view.SetForegroundVolumeID(input_volume.GetID())
    users_view.SetForegroundOpacity(0.3)
    nodes.set_foreground_opacity(scene, 0.9, [overlay.GetID()])
    assert {c.GetForegroundOpacity() for c in composites} == {0.9}
    assert users_view.GetForegroundOpacity() == 0.3
    users_view.SetForegroundVolumeID(None)
    nodes.show_in_slice_views(scene, input_volume, None)
    assert {c.GetForegroundVolumeID() for c in composites} == {None}


def test_heatmap_display_hides_voxels_below_the_threshold(scene, input_volume):
    heat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "map")
    nodes.set_volume_array(heat, np.linspace(0, 2, np.prod(INPUT_SHAPE), dtype=np.float32).reshape(INPUT_SHAPE[::-1]),
                           input_volume)
    nodes.show_as_heatmap(scene, heat, (0.0, 1.5), lower_threshold=0.7)
    display = heat.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"  # Inferno exists only in the app
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.5)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 0.7
    assert display.GetUpperThreshold() > 2.0
    nodes.set_display_threshold(heat, None)
    assert not display.GetApplyThreshold()


def test_provenance_round_trips_through_node_attributes(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "x")
    provenance = nodes.Provenance(
        model="vqvae",
        model_version="2",
        weights_sha256="0123abcd" * 8,
        threshold=0.123456789,
        device="cuda",
        date="2025-01-02T03:04:05+00:00",
        input_volume="T1",
        postprocessing={"threshold": 0.123456789, "top_k": 10},
    )
    nodes.set_provenance([node], provenance)
    assert node.GetAttribute("UAD.model") == "vqvae"
    assert node.GetAttribute("UAD.weightsSHA256") == "0123abcd" * 8
    assert nodes.Provenance.from_attributes(node) == provenance
    assert nodes.Provenance.from_attributes(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")) is None


def test_robust_range_ignores_outliers_and_the_background():
    values = np.zeros((40, 40, 40), np.float32)
    values[:, :, :20] = np.random.default_rng(1).uniform(0, 1, (40, 40, 20))
    values[0, 0, 0] = 1e6
    mask = np.zeros(values.shape, bool)
    mask[:, :, :20] = True
    low, high = nodes.robust_range(values, mask)
    assert 0.0 <= low < 0.01 and 0.98 < high <= 1.0
