"""Detection as the Slicer module runs it, without Qt: input -> ``uad detect`` process -> output nodes -> sliders.

``DetectionLogic.start`` writes the input volume to a temporary folder and starts the backend in its own process
(:mod:`uad.mrml.process`); ``finish`` loads what it wrote into reused output nodes; ``update_postprocessing``
recomputes the labelmap and the segment from a cached anomaly map when a slider moves, without running the
model again. The scene is only touched in ``finish`` and ``update_postprocessing``, after every file has been
read and checked, so a cancelled or failed run leaves it exactly as it was.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import slicer

from uad.errors import UserInputError
from uad.mrml import nodes
from uad.mrml.process import BackendProcess, Progress, State
from uad.options import DEVICE_CHOICES, MASK_SIZES_MM, REFINE_METHODS

# Files ``uad detect`` writes.
VOLUME_FILES = {
    "reconstruction": "reconstruction.nii.gz",
    "residual": "residual.nii.gz",
    "anomaly_map": "anomaly_map.nii.gz",
    "brain_mask": "brain_mask.nii.gz",
    "segmentation": "segmentation.nii.gz",
}
REPORT_FILE = "report.json"
# Geometry tolerance between the input and the backend's outputs, in mm at the grid's corners: NIfTI stores the
# affine in float32 (or as a quaternion), which moves a corner 200 mm from the origin by up to about 1e-4 mm.
AFFINE_TOLERANCE_MM = 1e-2


class DetectionError(RuntimeError):
    """A detection that could not run or could not be loaded; the message is one line for a message box."""


@dataclass(frozen=True)
class DetectionRequest:
    """What the panel's input section asks the backend for; ``cli_args`` is the only place flags are spelled."""

    model: str
    device: str = "auto"
    mask_size: int | None = None  # only for masking models
    skull_stripped: bool = False

    def __post_init__(self):
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if self.mask_size is not None and self.mask_size not in MASK_SIZES_MM:
            raise ValueError(f"mask size must be one of {MASK_SIZES_MM} mm, got {self.mask_size!r}")


@dataclass(frozen=True)
class PostprocessSettings:
    """The panel's post-processing controls. Everything else (erosion, dilation, median width) is the model's."""

    threshold: float
    median_filter: bool = True
    min_component_mm3: float = 50.0
    top_k: int = 10  # 0 keeps every component
    refine: str = "none"

    def __post_init__(self):
        if self.refine not in REFINE_METHODS:
            raise ValueError(f"refine must be one of {REFINE_METHODS}, got {self.refine!r}")


def detect_arguments(
    request: DetectionRequest, settings: PostprocessSettings, input_path: str | Path, out_dir: str | Path
) -> list[str]:
    """The ``uad detect ...`` arguments (after ``python -m uad``) for one run."""
    args = ["detect", str(input_path), "--out", str(out_dir), "--model", request.model, "--device", request.device]
    if request.mask_size is not None:
        args += ["--mask-size", str(request.mask_size)]
    if request.skull_stripped:
        args.append("--skull-stripped")
    # The backend segments with exactly the panel's settings, so its segmentation needs no recomputation.
    args += ["--threshold", repr(float(settings.threshold))]
    args += ["--min-component-mm3", repr(float(settings.min_component_mm3)), "--top-k", str(int(settings.top_k))]
    if not settings.median_filter:
        args += ["--median-mm", "0"]
    args += ["--refine", settings.refine, "--progress", "json"]
    return args


def postprocess_config(settings: PostprocessSettings, base: Mapping):
    """The backend's PostprocessConfig: the model's settings (``base``, from report.json) with the panel's on top."""
    from uad.postprocessing import PostprocessConfig  # scipy: installed with the dependencies on first Detect

    values = dict(base)
    default_median = PostprocessConfig.__dataclass_fields__["median_mm"].default
    values.update(
        threshold=float(settings.threshold),
        min_component_mm3=float(settings.min_component_mm3),
        top_k=int(settings.top_k),
        refine=settings.refine,
        # Ticked: the model's own width, as calibrated (none for a model that smooths its own map, the fusion).
        median_mm=values.get("median_mm", default_median) if settings.median_filter else 0.0,
    )
    return PostprocessConfig.from_dict(values)


@dataclass
class BackendOutputs:
    """Everything ``uad detect`` wrote, read and checked against the input, in (k, j, i) order."""

    arrays: dict[str, np.ndarray]
    report: dict


def read_backend_outputs(out_dir: str | Path, expected_shape: tuple, expected_affine: np.ndarray) -> BackendOutputs:
    """Read the output folder; raise :class:`DetectionError` if a file is missing or not on the input's grid
    (``expected_shape`` in (i, j, k) order, ``expected_affine`` the input's IJK-to-RAS). Touches no scene, so it
    can run in a worker thread: decompressing four 256^3 float volumes takes seconds."""
    import nibabel as nib  # installed with the dependencies on first Detect

    out_dir = Path(out_dir)
    expected_shape = tuple(expected_shape)

    def read(file_name: str) -> np.ndarray:
        path = out_dir / file_name
        if not path.exists():
            raise DetectionError(f"the detection did not write {file_name}; see the log for what went wrong")
        image = nib.load(str(path))
        order = voxel_order_onto(image.affine, image.shape, expected_affine, expected_shape)
        if order is None:
            raise DetectionError(f"{file_name} is not on the input volume's voxel grid; the outputs cannot be shown")
        return nodes.kji_from_ijk(order.apply(np.asanyarray(image.dataobj)))

    arrays = {role: read(file_name) for role, file_name in VOLUME_FILES.items()}
    report_path = out_dir / REPORT_FILE
    if not report_path.exists():
        raise DetectionError(f"the detection did not write {REPORT_FILE}; see the log for what went wrong")
    report = json.loads(report_path.read_text())
    return BackendOutputs(arrays, report)


@dataclass(frozen=True)
class VoxelOrder:
    """How a file's voxel axes map onto a node's: ``axes[n]`` is the file axis that becomes node axis n, then
    the node axes in ``flipped`` are reversed."""

    axes: tuple[int, int, int]
    flipped: tuple[int, ...]

    def apply(self, array_ijk: np.ndarray) -> np.ndarray:
        reordered = np.transpose(array_ijk, self.axes)
        return np.flip(reordered, self.flipped) if self.flipped else reordered


def voxel_order_onto(file_affine, file_shape, node_affine, node_shape) -> VoxelOrder | None:
    """The reordering that puts a file's voxels onto a node's grid when both are the same grid in RAS, or None.

    Slicer stores some grids in another voxel order than nibabel: a NIfTI file with qfac = -1 (the bundled
    sample) is read with its k axis reversed, which puts every voxel at the same place in RAS. So the grids are
    compared in RAS (every corner within :data:`AFFINE_TOLERANCE_MM`), not as matrices.
    """
    file_affine, node_affine = np.asarray(file_affine, float), np.asarray(node_affine, float)
    if len(file_shape) != 3 or len(node_shape) != 3:
        return None
    file_to_node = np.linalg.inv(node_affine) @ file_affine  # file voxel index -> node voxel index
    signs = np.round(file_to_node[:3, :3])
    if sorted(np.abs(signs).sum(axis=0)) != [1, 1, 1] or sorted(np.abs(signs).sum(axis=1)) != [1, 1, 1]:
        return None
    axes = tuple(int(np.flatnonzero(signs[n])[0]) for n in range(3))
    flipped = tuple(n for n in range(3) if signs[n, axes[n]] < 0)
    if tuple(file_shape[a] for a in axes) != tuple(node_shape):
        return None
    corners = np.array(np.meshgrid(*[(0, size - 1) for size in file_shape], indexing="ij")).reshape(3, -1).T
    node_corners = corners[:, axes]
    for n in flipped:
        node_corners[:, n] = node_shape[n] - 1 - node_corners[:, n]
    in_file = (file_affine @ np.c_[corners, np.ones(8)].T)[:3]
    in_node = (node_affine @ np.c_[node_corners, np.ones(8)].T)[:3]
    if np.abs(in_file - in_node).max() > AFFINE_TOLERANCE_MM:
        return None
    return VoxelOrder(axes, flipped)


def write_volume_file(volume_node, path: str | Path) -> None:
    """The input as NIfTI through Slicer's own writer, so the file's affine is exactly the node's IJK-to-RAS."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)  # a temporary file: compressing 256^3 voxels would cost seconds for nothing
    if not storage.WriteData(volume_node):
        raise DetectionError(f"could not write the input volume to {path}; check free disk space")


@dataclass
class PostprocessSummary:
    """What the panel says about the current segmentation."""

    voxels: int
    volume_ml: float
    threshold: float
    seconds: float | None  # how long the last update took; None when read back from the scene
    findings: int  # connected components (rows of the findings table)


class _MapCache:
    """The arrays re-thresholding needs, kept between slider moves; the median filter runs in a worker thread.

    The filtered map is the only slow part (about 5 s for 256^3), is independent of the threshold, and numpy
    releases the GIL in the partition it spends its time in, so computing it right after loading keeps the GUI
    responsive and the first slider move fast.
    """

    def __init__(self, anomaly_map, brain_mask, spacing, base_config: dict, executor: ThreadPoolExecutor):
        self.anomaly_map = anomaly_map
        self.brain_mask = brain_mask
        self.spacing = spacing
        self.base_config = base_config
        self.image: np.ndarray | None = None
        self._executor = executor
        self._filtered: dict[float, Future | np.ndarray] = {}

    def prefetch(self, median_mm: float) -> None:
        if median_mm > 0 and median_mm not in self._filtered:
            from uad.postprocessing import median_filter

            self._filtered[median_mm] = self._executor.submit(
                median_filter, self.anomaly_map, self.brain_mask, self.spacing, median_mm
            )

    def is_ready(self, median_mm: float) -> bool:
        entry = self._filtered.get(median_mm)
        return median_mm <= 0 or isinstance(entry, np.ndarray) or (isinstance(entry, Future) and entry.done())

    def filtered_map(self, median_mm: float) -> np.ndarray:
        if median_mm <= 0 and median_mm not in self._filtered:
            self._filtered[median_mm] = np.where(self.brain_mask, self.anomaly_map, 0).astype(np.float32)
        self.prefetch(median_mm)
        entry = self._filtered[median_mm]
        if isinstance(entry, Future):
            entry = self._filtered[median_mm] = entry.result()
        return entry


class DetectionJob:
    """One run: the temporary folder (input file + output folder), the backend process, then the reading of its
    output files in a worker thread. ``poll`` says RUNNING until both are done, so the GUI thread only ever
    does the quick part, filling the nodes."""

    def __init__(self, input_node, request, settings, temp_dir: Path, process: BackendProcess, executor):
        self.input_node_id = input_node.GetID()
        self.request = request
        self.settings = settings
        self.temp_dir = temp_dir
        self.out_dir = temp_dir / "out"
        self.process = process
        # Captured now, in the GUI thread: the worker must not read VTK objects.
        self._expected_shape = nodes.dimensions_kji(input_node)[::-1]
        self._expected_affine = nodes.ijk_to_ras(input_node)
        self._executor = executor
        self._outputs: Future | None = None
        self._cancelled = False

    def poll(self) -> State:
        if self._cancelled:
            return State.CANCELLED
        state = self.process.poll()
        if state is not State.SUCCEEDED:
            return state
        if self._outputs is None:
            self._outputs = self._executor.submit(
                read_backend_outputs, self.out_dir, self._expected_shape, self._expected_affine
            )
        return State.SUCCEEDED if self._outputs.done() else State.RUNNING

    def outputs(self) -> BackendOutputs:
        """The read output files (waits for the reading if it is still going on)."""
        if self._outputs is None:
            return read_backend_outputs(self.out_dir, self._expected_shape, self._expected_affine)
        return self._outputs.result()

    def cancel(self) -> None:
        """Kill the whole process tree and delete the temporary files; the scene was never touched."""
        self._cancelled = True
        self.process.cancel()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class DetectionLogic:
    """Runs detections into a scene and re-thresholds their results.

    ``backend_command`` is what runs ``uad`` (in Slicer ``[PythonSlicer, "-m", "uad"]``); ``env`` is the child's
    whole environment (PYTHONPATH must reach the ``uad`` package). Nothing here edits ``os.environ``.
    """

    def __init__(
        self,
        scene,
        backend_command: Sequence[str] = (sys.executable, "-m", "uad"),
        env: Mapping[str, str] | None = None,
        terminology: nodes.SegmentTerminology = nodes.DEFAULT_TERMINOLOGY,
        temp_root: str | Path | None = None,
    ):
        self.scene = scene
        self.backend_command = list(backend_command)
        self.env = dict(env) if env is not None else None
        self.terminology = terminology
        self.temp_root = temp_root
        self._caches: dict[str, _MapCache] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uad-median")
        self._io_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uad-read")

    # --- running the backend ------------------------------------------------------------------------------

    def start(
        self,
        input_node,
        request: DetectionRequest,
        settings: PostprocessSettings,
        on_progress: Callable[[Progress], None] | None = None,
        on_log: Callable[[str], None] | None = None,
    ) -> DetectionJob:
        """Write the input to a temporary folder and start the backend; returns at once."""
        if input_node is None or input_node.GetImageData() is None:
            raise UserInputError("select an input volume that contains an image")
        if input_node.GetImageData().GetNumberOfScalarComponents() != 1:
            raise UserInputError("the input volume has several components (colour or vector); select a scalar MRI")
        temp_dir = Path(tempfile.mkdtemp(prefix="UADExtension-", dir=self.temp_root))
        try:
            input_path = temp_dir / "input.nii"
            write_volume_file(input_node, input_path)
            command = self.backend_command + detect_arguments(request, settings, input_path, temp_dir / "out")
            process = BackendProcess(command, env=self.env, on_progress=on_progress, on_log=on_log)
            process.start()
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return DetectionJob(input_node, request, settings, temp_dir, process, self._io_executor)

    def finish(self, job: DetectionJob) -> nodes.OutputNodes:
        """Load a succeeded job's outputs into the scene and delete its temporary folder."""
        try:
            if job.poll() is State.CANCELLED:
                raise DetectionError("the detection was cancelled")
            if job.process.state is not State.SUCCEEDED:
                raise DetectionError(job.process.error_message or f"the detection {job.process.state.value}")
            input_node = self.scene.GetNodeByID(job.input_node_id)
            if input_node is None:
                raise DetectionError("the input volume was removed from the scene while the detection ran")
            return self.apply_outputs(input_node, job.outputs(), job.settings)
        finally:
            job.cleanup()

    def run(
        self,
        input_node,
        request: DetectionRequest,
        settings: PostprocessSettings,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float | None = None,
    ) -> nodes.OutputNodes:
        """Blocking detection (scripts, the self-test); raises :class:`DetectionError` with the one-line reason."""
        job = self.start(input_node, request, settings, on_progress=on_progress)
        if job.process.wait(timeout=timeout) is State.RUNNING:
            job.cancel()
            raise DetectionError(f"the detection took longer than {timeout} s and was stopped")
        return self.finish(job)

    # --- loading outputs ----------------------------------------------------------------------------------

    def load_outputs(self, input_node, out_dir: str | Path, settings: PostprocessSettings) -> nodes.OutputNodes:
        """Create or reuse the output nodes of ``input_node`` and fill them from ``uad detect``'s folder."""
        expected_shape = nodes.dimensions_kji(input_node)[::-1]
        results = read_backend_outputs(out_dir, expected_shape, nodes.ijk_to_ras(input_node))
        return self.apply_outputs(input_node, results, settings)

    def apply_outputs(self, input_node, results: BackendOutputs, settings: PostprocessSettings) -> nodes.OutputNodes:
        """Fill the (created or reused) output nodes of ``input_node`` from already read and checked files."""
        report = results.report
        arrays = results.arrays
        outputs, created = nodes.get_or_create_output_nodes(self.scene, input_node)
        try:
            for role in ("reconstruction", "residual", "anomaly_map"):
                nodes.set_volume_array(getattr(outputs, role), arrays[role].astype(np.float32, copy=False), input_node)
            brain = arrays["brain_mask"] > 0
            nodes.set_volume_array(outputs.brain_mask, brain.astype(np.uint8), input_node)
            nodes.follow_transform(outputs.all(), input_node)
            nodes.place_next_to(self.scene, outputs.all(), input_node)

            outputs.reconstruction.GetDisplayNode().AutoWindowLevelOn()
            nodes.show_as_heatmap(self.scene, outputs.residual, nodes.robust_range(arrays["residual"], brain))
            window = nodes.robust_range(arrays["anomaly_map"], brain)
            nodes.show_as_heatmap(self.scene, outputs.anomaly_map, (0.0, window[1]), settings.threshold)
            outputs.brain_mask.GetDisplayNode().SetVisibility(False)
            nodes.set_reference_geometry(outputs.segmentation, input_node)
            segment_id = nodes.ensure_segment(outputs.segmentation, self.terminology)
            if outputs.segmentation in created:  # a light fill keeps the heat map under it readable
                outputs.segmentation.GetDisplayNode().SetOpacity2DFill(nodes.SEGMENT_FILL_OPACITY)

            provenance = nodes.Provenance(
                model=str(report["model"]),
                model_version=str(report.get("model_version", "")),
                weights_sha256=str(report.get("weights_sha256", "")),
                threshold=float(report["threshold"]),
                device=str(report.get("device", "")),
                date=str(report.get("date", "")),
                input_volume=input_node.GetName(),
                postprocessing=dict(report.get("postprocessing", {})),
                warnings=tuple(str(w) for w in report.get("warnings", [])),
            )
            nodes.set_provenance(outputs.all(), provenance)

            cache = _MapCache(
                arrays["anomaly_map"].astype(np.float32, copy=False),
                brain,
                nodes.spacing_kji(input_node),
                provenance.postprocessing,
                self._executor,
            )
            self._caches[input_node.GetID()] = cache

            self._write_mask(input_node, outputs, segment_id, arrays["segmentation"] > 0, cache.anomaly_map)
            if postprocess_config(settings, provenance.postprocessing).to_dict() != provenance.postprocessing:
                self.update_postprocessing(input_node, settings)
            cache.prefetch(postprocess_config(settings, provenance.postprocessing).median_mm)
        except Exception:
            nodes.remove_nodes(self.scene, created)
            self._caches.pop(input_node.GetID(), None)
            raise
        return outputs

    # --- post-processing ----------------------------------------------------------------------------------

    def has_results(self, input_node) -> bool:
        return input_node is not None and nodes.find_output_nodes(input_node) is not None

    def update_postprocessing(self, input_node, settings: PostprocessSettings) -> PostprocessSummary:
        """Re-threshold the cached anomaly map with ``settings`` and rewrite the labelmap and the segment."""
        from uad.postprocessing import segment_filtered

        started = time.perf_counter()
        outputs = nodes.find_output_nodes(input_node)
        if outputs is None:
            raise DetectionError("this volume has no detection results yet; press Detect first")
        cache = self._cache(input_node, outputs)
        config = postprocess_config(settings, cache.base_config)
        image = None
        if config.refine == "atropos":
            if cache.image is None:
                cache.image = slicer.util.arrayFromVolume(input_node).astype(np.float32)
            image = cache.image
        filtered = cache.filtered_map(config.median_mm)
        mask = segment_filtered(filtered, cache.brain_mask, cache.spacing, config, image=image)

        segment_id = nodes.ensure_segment(outputs.segmentation, self.terminology)
        findings = self._write_mask(input_node, outputs, segment_id, mask, cache.anomaly_map)
        nodes.set_display_threshold(outputs.anomaly_map, config.threshold)
        provenance = nodes.Provenance.from_attributes(outputs.anomaly_map)
        if provenance is not None:
            nodes.set_provenance(
                outputs.all(), replace(provenance, threshold=config.threshold, postprocessing=config.to_dict())
            )
        voxels = int(np.count_nonzero(mask))
        voxel_ml = float(np.prod(cache.spacing)) / 1000.0
        seconds = time.perf_counter() - started
        return PostprocessSummary(voxels, voxels * voxel_ml, config.threshold, seconds, len(findings))

    def summary(self, input_node) -> PostprocessSummary | None:
        """The current segmentation of ``input_node`` as the scene holds it (after a detection, a slider step or
        loading a saved scene); None without results."""
        outputs = nodes.find_output_nodes(input_node) if input_node is not None else None
        if outputs is None:
            return None
        voxels = int(np.count_nonzero(slicer.util.arrayFromVolume(outputs.labelmap)))
        voxel_ml = float(np.prod(outputs.labelmap.GetSpacing())) / 1000.0
        provenance = nodes.Provenance.from_attributes(outputs.anomaly_map)
        threshold = provenance.threshold if provenance else float("nan")
        table = outputs.findings.GetTable()
        rows = table.GetNumberOfRows() if table is not None else 0
        return PostprocessSummary(voxels, voxels * voxel_ml, threshold, None, rows)

    def postprocessing_is_quick(self, input_node, settings: PostprocessSettings) -> bool:
        """False when the next update must wait for the median filter or run Atropos (show a wait cursor)."""
        cache = self._caches.get(input_node.GetID())
        if settings.refine != "none" or cache is None:
            return False
        return cache.is_ready(postprocess_config(settings, cache.base_config).median_mm)

    def threshold_range(self, input_node) -> tuple[float, float]:
        """Slider limits: from 0 to the map's maximum in the brain (at least 1.5x the calibrated threshold), so
        the slider can go past every anomaly and the calibrated value never sits at the end."""
        outputs = nodes.find_output_nodes(input_node)
        if outputs is None:
            raise DetectionError("this volume has no detection results yet; press Detect first")
        cache = self._cache(input_node, outputs)
        inside = cache.anomaly_map[cache.brain_mask]
        high = float(inside.max()) if inside.size else 0.0
        threshold = float(cache.base_config.get("threshold", 0.0))
        return 0.0, max(high, 1.5 * threshold, 1e-6)

    def _cache(self, input_node, outputs: nodes.OutputNodes) -> _MapCache:
        """The cached arrays, rebuilt from the nodes when the scene was loaded from a file or a map was edited."""
        cache = self._caches.get(input_node.GetID())
        anomaly_map = slicer.util.arrayFromVolume(outputs.anomaly_map)
        if cache is not None and cache.anomaly_map.shape == anomaly_map.shape:
            return cache
        provenance = nodes.Provenance.from_attributes(outputs.anomaly_map)
        base = provenance.postprocessing if provenance else {"threshold": 0.0}
        brain = slicer.util.arrayFromVolume(outputs.brain_mask) > 0
        cache = _MapCache(anomaly_map.astype(np.float32), brain, nodes.spacing_kji(input_node), base, self._executor)
        self._caches[input_node.GetID()] = cache
        return cache

    def _write_mask(
        self, input_node, outputs: nodes.OutputNodes, segment_id: str, mask_kji: np.ndarray, anomaly_map_kji
    ) -> list:
        """Labelmap, segment and findings table from one mask; returns the findings."""
        from uad.postprocessing import find_components

        nodes.set_volume_array(outputs.labelmap, mask_kji.astype(np.uint8, copy=False), input_node)
        nodes.write_segment_from_labelmap(outputs.segmentation, segment_id, outputs.labelmap)
        # Transposed views index (i, j, k), so the findings' voxel coordinates are the node's IJK.
        findings = find_components(mask_kji.T, anomaly_map_kji.T, nodes.ijk_to_ras(input_node))
        nodes.write_findings_table(outputs.findings, findings, input_node)
        return findings

    def forget(self, input_node_id: str | None = None) -> None:
        """Drop cached arrays (all, or one input's), e.g. when the scene is closed."""
        if input_node_id is None:
            self._caches.clear()
        else:
            self._caches.pop(input_node_id, None)

    # --- display ------------------------------------------------------------------------------------------

    def show_results(self, input_node, overlay: str = "anomaly_map", opacity: float = 0.5) -> None:
        """Input as background, the chosen float map (``anomaly_map``, ``residual`` or ``none``) as overlay."""
        outputs = nodes.find_output_nodes(input_node)
        foreground = getattr(outputs, overlay) if outputs is not None and overlay != "none" else None
        nodes.show_in_slice_views(self.scene, input_node, foreground, opacity)

    def set_overlay_opacity(self, input_node, opacity: float) -> None:
        """Opacity of this input's overlay, in the views that show it; other views are the user's."""
        outputs = nodes.find_output_nodes(input_node) if input_node is not None else None
        if outputs is not None:
            overlays = (outputs.anomaly_map.GetID(), outputs.residual.GetID())
            nodes.set_foreground_opacity(self.scene, opacity, overlays)

    def centre_on_finding(self, input_node, row: int) -> bool:
        """Centre every slice view on the finding in table ``row`` (0-based); False when there is no such row."""
        outputs = nodes.find_output_nodes(input_node) if input_node is not None else None
        if outputs is None:
            return False
        position = nodes.findings_row_world_position(outputs.findings, row, input_node)
        if position is None:
            return False
        nodes.centre_slice_views(self.scene, position)
        return True

    def shutdown(self) -> None:
        """Stop the worker threads (the module is being unloaded); cached arrays are dropped."""
        self.forget()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._io_executor.shutdown(wait=False, cancel_futures=True)

    def set_display_threshold(self, input_node, threshold: float) -> None:
        """Hide overlay voxels below the threshold: instant feedback while the slider is still moving."""
        outputs = nodes.find_output_nodes(input_node)
        if outputs is not None:
            nodes.set_display_threshold(outputs.anomaly_map, threshold)
