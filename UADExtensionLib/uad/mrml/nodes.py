"""The scene side of a detection: output nodes, their geometry, display, provenance and subject-hierarchy place.

Array convention: ``slicer.util.arrayFromVolume`` gives voxels in (k, j, i) order; the backend's NIfTI files
and ``uad.postprocessing`` use (i, j, k). This module converts at the file boundary only (:func:`kji_from_ijk`)
and otherwise keeps (k, j, i) arrays with (k, j, i) spacing (:func:`spacing_kji`), which is equivalent for
every per-axis operation the post-processing does and avoids a 16M-voxel transpose per slider move.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import slicer
import slicer.util
import vtk

ATTRIBUTE_PREFIX = "UAD."
ANOMALY_SEGMENT_ID = "Anomaly"
# Colour tables to show float maps with, best first: Inferno ships with the Slicer app (a file-based table);
# PET-Heat is built in, so it also exists under slicer-core.
HEATMAP_COLOR_NAMES = ("Inferno", "PET-Heat")
# The Anomaly segment's fill in slice views (its outline stays opaque): light enough to see the map through it.
SEGMENT_FILL_OPACITY = 0.25


@dataclass(frozen=True)
class OutputSpec:
    role: str  # node reference role on the input volume, so a second run finds and reuses the node
    node_class: str
    name_suffix: str


OUTPUT_SPECS = {
    "reconstruction": OutputSpec("UADReconstruction", "vtkMRMLScalarVolumeNode", "UAD reconstruction"),
    "residual": OutputSpec("UADResidual", "vtkMRMLScalarVolumeNode", "UAD residual"),
    "anomaly_map": OutputSpec("UADAnomalyMap", "vtkMRMLScalarVolumeNode", "UAD anomaly map"),
    "brain_mask": OutputSpec("UADBrainMask", "vtkMRMLLabelMapVolumeNode", "UAD brain mask"),
    "labelmap": OutputSpec("UADAnomalyLabelmap", "vtkMRMLLabelMapVolumeNode", "UAD anomaly labelmap"),
    "segmentation": OutputSpec("UADSegmentation", "vtkMRMLSegmentationNode", "UAD anomalies"),
    "findings": OutputSpec("UADFindings", "vtkMRMLTableNode", "UAD findings"),
}


@dataclass
class OutputNodes:
    """The nodes one detection fills; field names are the keys of :data:`OUTPUT_SPECS`."""

    reconstruction: slicer.vtkMRMLScalarVolumeNode
    residual: slicer.vtkMRMLScalarVolumeNode
    anomaly_map: slicer.vtkMRMLScalarVolumeNode
    brain_mask: slicer.vtkMRMLLabelMapVolumeNode
    labelmap: slicer.vtkMRMLLabelMapVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    findings: slicer.vtkMRMLTableNode

    def all(self) -> list:
        return [getattr(self, role) for role in OUTPUT_SPECS]


# --- geometry -----------------------------------------------------------------------------------------------


def ijk_to_ras(volume_node) -> np.ndarray:
    return slicer.util.arrayFromVTKMatrix(_ijk_to_ras_matrix(volume_node))


def spacing_kji(volume_node) -> tuple[float, float, float]:
    """Voxel size in mm along the axes of ``arrayFromVolume`` (k, j, i)."""
    return tuple(float(s) for s in reversed(volume_node.GetSpacing()))


def dimensions_kji(volume_node) -> tuple[int, int, int]:
    return tuple(int(d) for d in reversed(volume_node.GetImageData().GetDimensions()))


def kji_from_ijk(array: np.ndarray) -> np.ndarray:
    """A NIfTI-order (i, j, k) array as a C-contiguous (k, j, i) array (free for nibabel's Fortran-order data)."""
    return np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))


def set_volume_array(volume_node, array_kji: np.ndarray, geometry_node) -> None:
    """Fill ``volume_node`` with ``array_kji`` on exactly ``geometry_node``'s grid (origin, spacing, directions)."""
    volume_node.CopyOrientation(geometry_node)
    slicer.util.updateVolumeFromArray(volume_node, array_kji)


def same_geometry(a, b, atol: float = 1e-4) -> bool:
    return dimensions_kji(a) == dimensions_kji(b) and np.allclose(ijk_to_ras(a), ijk_to_ras(b), atol=atol)


# --- output nodes -------------------------------------------------------------------------------------------


def find_output_nodes(input_node) -> OutputNodes | None:
    """The outputs of an earlier detection on ``input_node``, or None when any of them is missing."""
    found = {role: input_node.GetNodeReference(spec.role) for role, spec in OUTPUT_SPECS.items()}
    if any(node is None for node in found.values()):
        return None
    return OutputNodes(**found)


def get_or_create_output_nodes(scene, input_node) -> tuple[OutputNodes, list]:
    """The output nodes of ``input_node``, reusing those of an earlier run; also returns the newly created ones."""
    created = []
    nodes = {}
    base_name = input_node.GetName()
    for role, spec in OUTPUT_SPECS.items():
        node = input_node.GetNodeReference(spec.role)
        if node is None or not node.IsA(spec.node_class):
            node = scene.AddNewNodeByClass(spec.node_class, f"{base_name} {spec.name_suffix}")
            if node.IsA("vtkMRMLDisplayableNode"):  # a table has no display node
                node.CreateDefaultDisplayNodes()
            input_node.SetNodeReferenceID(spec.role, node.GetID())
            created.append(node)
        nodes[role] = node
    return OutputNodes(**nodes), created


def remove_nodes(scene, nodes) -> None:
    for node in nodes:
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)


def place_next_to(scene, nodes, reference_node) -> None:
    """Put ``nodes`` under the same subject-hierarchy parent (patient/study/folder) as ``reference_node``."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    for node in nodes:
        # The Slicer app creates items for new nodes itself; a bare scene (slicer-core) does not.
        item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(parent, node)
        hierarchy.SetItemParent(item, parent)


def follow_transform(nodes, reference_node) -> None:
    """Outputs live in the input's voxel space, so they go under the same parent transform as the input."""
    for node in nodes:
        if node.IsA("vtkMRMLTransformableNode"):  # the findings table holds numbers, not a place
            node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())


def to_world(node, points_local: np.ndarray) -> np.ndarray:
    """Points (n, 3) in ``node``'s own RAS (before its parent transforms) in world RAS, where views show them."""
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, matrix)
    points = np.atleast_2d(np.asarray(points_local, float))
    return (slicer.util.arrayFromVTKMatrix(matrix) @ np.c_[points, np.ones(len(points))].T).T[:, :3]


def voxel_to_world(volume_node, ijk) -> np.ndarray:
    """World RAS (3,) of a (possibly fractional) voxel index (i, j, k) of ``volume_node``."""
    local = ijk_to_ras(volume_node) @ [*ijk, 1.0]
    return to_world(volume_node, local[:3])[0]


# --- provenance ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What a saved scene needs to say how an output was made; stored as ``UAD.*`` node attributes."""

    model: str
    model_version: str
    weights_sha256: str
    threshold: float
    device: str
    date: str
    input_volume: str
    postprocessing: dict
    warnings: tuple[str, ...] = ()  # the backend's doubts about the input (report.json's warnings)

    _ATTRIBUTES = {
        "model": "model",
        "model_version": "modelVersion",
        "weights_sha256": "weightsSHA256",
        "threshold": "threshold",
        "device": "device",
        "date": "date",
        "input_volume": "inputVolume",
        "postprocessing": "postprocessing",
        "warnings": "warnings",
    }
    _OPTIONAL = ("warnings",)  # scenes saved before warnings existed still load

    def attributes(self) -> dict[str, str]:
        values = asdict(self)
        values["postprocessing"] = json.dumps(self.postprocessing, sort_keys=True)
        values["warnings"] = json.dumps(list(self.warnings))
        values["threshold"] = repr(float(self.threshold))
        return {ATTRIBUTE_PREFIX + name: str(values[field]) for field, name in self._ATTRIBUTES.items()}

    @classmethod
    def from_attributes(cls, node) -> Provenance | None:
        values = {}
        for field, name in cls._ATTRIBUTES.items():
            value = node.GetAttribute(ATTRIBUTE_PREFIX + name)
            if value is None:
                if field in cls._OPTIONAL:
                    continue
                return None
            values[field] = value
        values["threshold"] = float(values["threshold"])
        values["postprocessing"] = json.loads(values["postprocessing"])
        if "warnings" in values:
            values["warnings"] = tuple(json.loads(values["warnings"]))
        return cls(**values)


def set_provenance(nodes, provenance: Provenance) -> None:
    for node in nodes:
        for name, value in provenance.attributes().items():
            node.SetAttribute(name, value)


# --- display ------------------------------------------------------------------------------------------------


def heatmap_color_node_id(scene) -> str:
    for name in HEATMAP_COLOR_NAMES:
        node = scene.GetFirstNode(name, "vtkMRMLColorNode")
        if node is not None:
            return node.GetID()
    return "vtkMRMLColorTableNodeRainbow"


def robust_range(array_kji: np.ndarray, mask_kji: np.ndarray | None = None) -> tuple[float, float]:
    """0.1 and 99.9 percentiles (inside ``mask``): a window that a few outliers cannot squash.

    Large volumes are subsampled to about 2 million voxels, which keeps this near 30 ms for 256^3.
    """
    step = max(1, int(round((array_kji.size / 2e6) ** (1 / 3))))
    values = array_kji[::step, ::step, ::step]
    if mask_kji is not None:
        inside = values[mask_kji[::step, ::step, ::step] > 0]
        values = inside if inside.size else values
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.1, 99.9])
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def show_as_heatmap(scene, volume_node, window: tuple[float, float], lower_threshold: float | None = None) -> None:
    """Colour map + fixed window; with ``lower_threshold`` the voxels below it are transparent in the overlay."""
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(heatmap_color_node_id(scene))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*window)
    set_display_threshold(volume_node, lower_threshold)


def set_display_threshold(volume_node, lower_threshold: float | None) -> None:
    display = volume_node.GetDisplayNode()
    if lower_threshold is None:
        display.SetApplyThreshold(0)
        return
    display.AutoThresholdOff()
    display.SetLowerThreshold(lower_threshold)
    display.SetUpperThreshold(max(float(volume_node.GetImageData().GetScalarRange()[1]), lower_threshold) + 1.0)
    display.SetApplyThreshold(1)


def show_in_slice_views(scene, background, foreground=None, opacity: float = 0.5) -> None:
    """Input as background and a float map as foreground in every slice view (composite nodes are plain MRML)."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(opacity)


def set_foreground_opacity(scene, opacity: float, foreground_ids) -> None:
    """The overlay's opacity, only in the views that show one of ``foreground_ids`` (the user's other views keep
    theirs)."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for index in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(index)
        if composite.GetForegroundVolumeID() in set(foreground_ids):
            composite.SetForegroundOpacity(opacity)


def centre_slice_views(scene, ras_world) -> None:
    """Move every slice view so that ``ras_world`` is at its centre, keeping each view's orientation."""
    slices = scene.GetNodesByClass("vtkMRMLSliceNode")
    for index in range(slices.GetNumberOfItems()):
        slices.GetItemAsObject(index).JumpSliceByCentering(*(float(x) for x in ras_world))


# --- findings table -----------------------------------------------------------------------------------------

# (column name, title with unit); the voxel columns let a row be found again after the input is moved.
FINDINGS_TABLE_COLUMNS = (
    ("rank", "#"),
    ("volume_ml", "Volume (ml)"),
    ("peak_score", "Peak score"),
    ("mean_score", "Mean score"),
    ("r", "R (mm)"),
    ("a", "A (mm)"),
    ("s", "S (mm)"),
    ("i", "I"),
    ("j", "J"),
    ("k", "K"),
)


def write_findings_table(table_node, findings, volume_node) -> None:
    """Fill the table with one row per finding (``uad.postprocessing.Finding``, voxel indices of ``volume_node``
    in (i, j, k) order); the R, A, S columns are world coordinates, where the views show the finding."""
    world = [voxel_to_world(volume_node, f.centroid_voxel) for f in findings]
    values = {
        "rank": list(range(1, len(findings) + 1)),
        "volume_ml": [f.volume_ml for f in findings],
        "peak_score": [f.peak_score for f in findings],
        "mean_score": [f.mean_score for f in findings],
        "r": [p[0] for p in world],
        "a": [p[1] for p in world],
        "s": [p[2] for p in world],
        "i": [f.centroid_voxel[0] for f in findings],
        "j": [f.centroid_voxel[1] for f in findings],
        "k": [f.centroid_voxel[2] for f in findings],
    }
    table = vtk.vtkTable()
    for name, _title in FINDINGS_TABLE_COLUMNS:
        column = vtk.vtkIntArray() if name == "rank" else vtk.vtkDoubleArray()
        column.SetName(name)
        for value in values[name]:
            column.InsertNextValue(value)
        table.AddColumn(column)
    was_modifying = table_node.StartModify()
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    for name, title in FINDINGS_TABLE_COLUMNS:
        table_node.SetColumnTitle(name, title)
    table_node.SetLocked(True)  # computed: editing a cell would only be overwritten by the next slider step
    table_node.EndModify(was_modifying)


def findings_row_world_position(table_node, row: int, volume_node) -> np.ndarray | None:
    """World RAS of the finding in ``row`` (0-based), from its voxel columns, so it stays right if the input's
    transform changed since the table was written; None for a row that is not there."""
    table = table_node.GetTable()
    if table is None or not 0 <= row < table.GetNumberOfRows():
        return None
    ijk = [table.GetValueByName(row, name).ToDouble() for name in ("i", "j", "k")]
    return voxel_to_world(volume_node, ijk)


# --- segmentation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentTerminology:
    """The serialized terminology entry Slicer stores on a segment, plus its recommended name and colour."""

    entry: str
    name: str
    color: tuple[float, float, float]


ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
BRAIN_REGION = ("SCT", "12738006", "Brain")


def load_segment_terminology(term_file: str | Path, slicer_label: str = "anomaly") -> SegmentTerminology:
    """Read the entry for ``slicer_label`` from a ``.term.json`` file shipped with the extension.

    The entry string follows ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``: context~category~
    type~type modifier~anatomic context~region~region modifier, each code as ``scheme^value^meaning``.
    """
    context = json.loads(Path(term_file).read_text())
    for category in context["SegmentationCodes"]["Category"]:
        for kind in category.get("Type", []):
            if kind.get("3dSlicerLabel") == slicer_label:
                entry = "~".join(
                    [
                        context["SegmentationCategoryTypeContextName"],
                        _code(category),
                        _code(kind),
                        "^^",
                        ANATOMIC_CONTEXT,
                        "^".join(BRAIN_REGION),
                        "^^",
                    ]
                )
                color = tuple(c / 255.0 for c in kind["recommendedDisplayRGBValue"])
                return SegmentTerminology(entry, kind["CodeMeaning"], color)
    raise KeyError(f"no type with 3dSlicerLabel '{slicer_label}' in {term_file}")


def _code(item: dict) -> str:
    return "^".join([item["CodingSchemeDesignator"], item["CodeValue"], item["CodeMeaning"]])


DEFAULT_TERMINOLOGY = SegmentTerminology(entry="", name="Anomaly", color=(0.0, 200 / 255, 1.0))


def ensure_segment(segmentation_node, terminology: SegmentTerminology, segment_id: str = ANOMALY_SEGMENT_ID) -> str:
    """The segment the detection writes to; created once, so a user's renaming or recolouring survives reruns."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSegment(segment_id) is None:
        segmentation.AddEmptySegment(segment_id, terminology.name, terminology.color)
        if terminology.entry:
            segmentation.GetSegment(segment_id).SetTerminology(terminology.entry)
    return segment_id


def set_reference_geometry(segmentation_node, volume_node) -> None:
    """What Segment Editor needs to edit on the input's grid without asking for a source geometry."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetNodeReferenceID(
        segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID()
    )


def write_segment_from_labelmap(segmentation_node, segment_id: str, labelmap_node) -> None:
    """Replace the segment's voxels with the labelmap's non-zero voxels; other segments stay as they are.

    The labelmap and the segmentation sit under the same parent transform (:func:`follow_transform`), so the
    labelmap's IJK-to-RAS is already in the segmentation's coordinates and goes in as it is. (Slicer's
    ``CreateOrientedImageDataFromVolumeNode`` would harden the parent transform in, which the segmentation node
    then applies a second time, and the image it returns is never freed from Python: a labelmap's worth of
    memory per slider step.) Going through an oriented image (about 0.1 s for 256^3) instead of
    ImportLabelmapToSegmentationNode keeps the segment's id, name, colour and terminology.
    """
    image = slicer.vtkOrientedImageData()
    image.DeepCopy(labelmap_node.GetImageData())  # the segment must not share voxels with the labelmap node
    image.SetGeometryFromImageToWorldMatrix(_ijk_to_ras_matrix(labelmap_node))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    extent = image.GetExtent()
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE, extent):
        raise RuntimeError(f"could not write the labelmap into segment '{segment_id}'")


def _ijk_to_ras_matrix(volume_node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix
