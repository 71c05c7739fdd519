"""From a continuous anomaly map to a binary anomaly segmentation.

The steps follow Ano-swinMAE (Appendix A.1) plus what the field learned since (see EVALUATION.md):
3D median filter -> brain-mask erosion -> threshold -> connected components (drop small ones, keep the top K by
mean map value) -> dilation -> optional Atropos refinement of the boundaries.

:func:`median_filter` is the slow step and does not depend on the threshold, so the Slicer module runs it once
and calls :func:`segment_filtered` on the cached result every time the threshold slider moves; that call is
built to stay well under a second on a 256^3 volume by working only on the voxels above the threshold.

Arrays are 3D in voxel index order; ``spacing`` is the voxel size in mm per axis. Every size is given in mm and
turned into voxels per axis, so anisotropic volumes get ellipsoidal structuring elements.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from uad.errors import UserInputError
from uad.options import REFINE_METHODS

logger = logging.getLogger(__name__)


# 26-connectivity: lesions touching only at a corner are still one object, as in the Ano-swinMAE code.
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# Voxels per chunk when gathering neighbourhoods: bounds the temporary index arrays to a few tens of MB.
_CHUNK = 1 << 16

# Atropos refinement: the margin around each component gives Atropos enough surrounding tissue to find the
# classes; the neighbourhood is how far a component's boundary may move; a class must be this much more
# frequent inside a component than around it (as a fraction of voxels) to be part of the refined component.
_ATROPOS_CLASSES = 5
_ATROPOS_BOX_MARGIN_MM = 10.0
_REFINE_NEIGHBOURHOOD_MM = 3.0
_REFINE_MIN_ENRICHMENT = 0.1


@dataclass(frozen=True)
class PostprocessConfig:
    """Every post-processing parameter; stored next to the calibrated threshold in each checkpoint."""

    threshold: float  # voxels with map > threshold are candidates (higher = more anomalous); calibrated per model
    median_mm: float = 5.0  # width of the 3D median filter; 0 = off
    brain_erosion_mm: float = 4.0  # edge residuals are mostly registration error; 0 = off
    min_component_mm3: float = 50.0  # connected components smaller than this are dropped
    top_k: int = 10  # keep the K components with the highest mean map value; 0 = keep all
    dilation_mm: float = 1.0  # dilate the kept components; 0 = off
    refine: str = "none"  # "none" | "atropos"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise UserInputError(f"threshold must be a number, got {self.threshold!r}")
        if not math.isfinite(self.threshold):
            raise UserInputError(f"threshold must be a finite number, got {self.threshold}")
        for name in ("median_mm", "brain_erosion_mm", "min_component_mm3", "dilation_mm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(f"{name} must be a finite number, got {value!r}")
            if value < 0:
                raise UserInputError(f"{name} must be 0 (off) or positive, got {value}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserInputError(f"top_k must be a whole number >= 0 (0 keeps all components), got {self.top_k!r}")
        if self.refine not in REFINE_METHODS:
            raise UserInputError(f"refine must be one of {', '.join(REFINE_METHODS)}, got {self.refine!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PostprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserInputError(
                f"unknown post-processing setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "threshold" not in values:
            raise UserInputError("post-processing settings lack a threshold; calibrate the model or give one")
        return cls(**values)


def median_kernel(width_mm: float, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Per-axis median kernel in voxels: the odd number nearest to ``width_mm / spacing``, at least 1."""
    return tuple(max(1, 2 * math.floor(width_mm / s / 2) + 1) for s in spacing)  # type: ignore[return-value]


def median_filter(
    anomaly_map: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float], width_mm: float
) -> np.ndarray:
    """3D median filter of the map inside the brain; float32, 0 outside the brain.

    The map is set to 0 outside the brain before filtering, so at the brain's edge the window sees "not
    anomalous" background and edge residuals are damped rather than smeared outwards. The median is exact and
    computed only at brain voxels (a selection over each voxel's window, in chunks), which is about three times
    faster than ``scipy.ndimage.median_filter`` on the brain's bounding box. ``width_mm == 0`` returns the
    masked map.
    """
    spacing = _check_geometry(anomaly_map, brain_mask, spacing)
    if width_mm < 0:
        raise UserInputError(f"median filter width must be 0 (off) or positive, got {width_mm} mm")
    brain = _as_bool(brain_mask)
    masked = np.where(brain, anomaly_map, 0).astype(np.float32)
    kernel = np.array(median_kernel(width_mm, spacing)) if width_mm > 0 else np.ones(3, int)
    bounds = _bounding_box(brain)
    if bounds is None or np.all(kernel == 1):
        return masked

    start, stop = bounds
    half = kernel // 2
    padded = _extract(masked, start - half, stop + half, fill=0)
    windows = sliding_window_view(padded, tuple(kernel))  # windows[i, j, k] is centred on box voxel (i, j, k)
    brain_in_box = brain[_slices(start, stop)]
    voxels = np.nonzero(brain_in_box)
    middle = int(np.prod(kernel)) // 2
    filtered = np.zeros(brain_in_box.shape, np.float32)
    for first in range(0, len(voxels[0]), _CHUNK):
        chunk = tuple(axis[first : first + _CHUNK] for axis in voxels)
        values = windows[chunk].reshape(len(chunk[0]), -1)
        filtered[chunk] = np.partition(values, middle, axis=1)[:, middle]
    result = np.zeros(masked.shape, np.float32)
    result[_slices(start, stop)] = filtered
    return result


def segment_filtered(
    filtered_map: np.ndarray,
    brain_mask: np.ndarray,
    spacing: Sequence[float],
    config: PostprocessConfig,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """Binary segmentation (uint8 0/1, same shape) of an already median-filtered map.

    Erosion of the brain mask -> ``map > threshold`` -> 26-connected components of at least
    ``min_component_mm3`` -> the ``top_k`` with the highest mean map value -> dilation (kept inside the brain)
    -> optional Atropos refinement on ``image`` (see :func:`refine_with_atropos`).

    Everything after the threshold works on the voxels above it, within their bounding box: the erosion is
    tested only at those voxels and the dilation is scattered from the kept ones, so the cost follows the
    number of candidates rather than the volume size.
    """
    spacing = _check_geometry(filtered_map, brain_mask, spacing)
    if config.refine == "atropos":
        if image is None:
            raise UserInputError("Atropos refinement needs the input image; pass it or set refine to 'none'")
        _check_geometry(image, brain_mask, spacing)

    brain = _as_bool(brain_mask)
    above = np.flatnonzero((filtered_map > config.threshold) & brain)
    segmentation = np.zeros(filtered_map.shape, np.uint8)
    if above.size == 0:
        return segmentation

    erosion = ellipsoid_offsets(config.brain_erosion_mm, spacing)
    dilation = ellipsoid_offsets(config.dilation_mm, spacing)
    margin = np.maximum(np.abs(erosion).max(axis=0), np.abs(dilation).max(axis=0)) + 1
    coords = np.array(np.unravel_index(above, filtered_map.shape))
    start, stop = coords.min(axis=1) - margin, coords.max(axis=1) + 1 + margin
    box_brain = _extract(brain, start, stop, fill=False)  # outside the volume counts as outside the brain
    box_shape = box_brain.shape
    candidates = np.ravel_multi_index(tuple(coords - start[:, None]), box_shape)
    values = filtered_map.ravel()[above]

    inside = _all_true_at(box_brain.ravel(), candidates, _flat_offsets(erosion, box_shape))
    candidates, values = candidates[inside], values[inside]
    kept = _select_components(candidates, values, box_shape, config, float(np.prod(spacing)))
    if kept.size == 0:
        return segmentation

    box_segmentation = np.zeros(box_shape, bool)
    _set_true_at(box_segmentation.ravel(), kept, _flat_offsets(dilation, box_shape))
    box_segmentation &= box_brain
    _insert(segmentation, start, box_segmentation)
    if config.refine == "atropos":
        # On the whole volume: Atropos needs tissue around each component, beyond the candidates' box.
        segmentation = refine_with_atropos(segmentation, image, brain, spacing).astype(np.uint8)
    return segmentation


@dataclass(frozen=True)
class Finding:
    """One connected component of a final segmentation: where it is, how big, how anomalous.

    Voxel coordinates are array indices (for NIfTI files and the CLI: i, j, k); ``bbox_voxel`` is
    (first, last) index per axis, both inclusive, as ``(min0, min1, min2, max0, max1, max2)``.
    """

    volume_ml: float
    peak_score: float  # highest anomaly-map value in the component
    mean_score: float
    centroid_ras: tuple[float, float, float]  # mm, through ``voxel_to_ras``
    centroid_voxel: tuple[float, float, float]
    bbox_voxel: tuple[int, int, int, int, int, int]
    voxels: int

    def to_dict(self) -> dict:
        return asdict(self)


FINDING_COLUMNS = tuple(f.name for f in fields(Finding))


def find_components(segmentation: np.ndarray, anomaly_map: np.ndarray, voxel_to_ras: np.ndarray) -> list[Finding]:
    """The 26-connected components of ``segmentation`` (the same connectivity the segmentation was made with),
    most anomalous first (by peak score, then mean score); their volumes add up to the segmentation's.

    ``voxel_to_ras`` maps array indices (in ``segmentation``'s axis order) to RAS mm; scores are read from
    ``anomaly_map`` (same shape). Works within the segmentation's bounding box, so a slider step on a 256^3
    volume costs milliseconds.
    """
    if segmentation.shape != anomaly_map.shape:
        raise UserInputError(f"segmentation shape {segmentation.shape} differs from the map's {anomaly_map.shape}")
    voxel_to_ras = np.asarray(voxel_to_ras, float)
    bounds = _bounding_box(_as_bool(segmentation))
    if bounds is None:
        return []
    start, stop = bounds
    box = _slices(start, stop)
    labels, count = ndimage.label(_as_bool(segmentation[box]), structure=_CONNECTIVITY)
    voxel_mm3 = abs(float(np.linalg.det(voxel_to_ras[:3, :3])))
    scores = anomaly_map[box].astype(np.float64)
    found = []
    for label, component_box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[component_box] == label
        coords = np.argwhere(inside) + [s.start for s in component_box] + start
        values = scores[component_box][inside]
        centroid = coords.mean(axis=0)
        found.append(
            Finding(
                volume_ml=len(coords) * voxel_mm3 / 1000.0,
                peak_score=float(values.max()),
                mean_score=float(values.mean()),
                centroid_ras=tuple(float(x) for x in (voxel_to_ras @ [*centroid, 1.0])[:3]),
                centroid_voxel=tuple(float(x) for x in centroid),
                bbox_voxel=tuple(int(x) for x in (*coords.min(axis=0), *coords.max(axis=0))),
                voxels=len(coords),
            )
        )
    return sorted(found, key=lambda f: (-f.peak_score, -f.mean_score))


def erode_brain_mask(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """The whole eroded brain: the voxels where :func:`segment_filtered` may flag anything (it tests the same
    erosion only at candidate voxels, for speed)."""
    if radius_mm <= 0:
        return mask.astype(bool)
    return ndimage.binary_erosion(mask, structure=ellipsoid_element(radius_mm, spacing), border_value=0)


def segment_anomalies(
    anomaly_map: np.ndarray,
    brain_mask: np.ndarray,
    spacing: Sequence[float],
    config: PostprocessConfig,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`median_filter` then :func:`segment_filtered`: the whole post-processing in one call."""
    filtered = median_filter(anomaly_map, brain_mask, spacing, config.median_mm)
    return segment_filtered(filtered, brain_mask, spacing, config, image)


def refine_with_atropos(
    segmentation: np.ndarray, image: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Move each component's boundary onto a tissue-class boundary found by Atropos (bool, same shape).

    Per 26-connected component, Atropos (k-means initialisation, 5 classes, mild MRF smoothing) runs inside
    the brain within the component's bounding box plus 10 mm of surrounding tissue: one small run per
    component, because Atropos time grows with the image size (about 2 s for a 40^3 box, 25 s for 90^3 on this
    project's 2-core machine) and the classes adapt to the local contrast.

    Rule: the neighbourhood is the component dilated by 3 mm (inside the brain). The chosen classes are those
    over-represented in the component compared with the rest of the neighbourhood (the ring around it) by at
    least 10 percentage points, and the component becomes the voxels of those classes within the neighbourhood,
    keeping only the parts connected to the original component. Over-representation rather than the majority
    class, because median-filtered maps make components larger than the lesion: a component that is 40 %
    lesion and 60 % white matter would otherwise be turned into its white matter (on the MSLUB case, with the
    blurred lesion mask as a stand-in map, the majority rule took Dice from 0.65 to 0.12 on T1, this rule to
    0.52; on FLAIR both raised it to 0.75). Possibly several classes, because with 5 classes a lesion is often
    split in two. Refinement only helps on an image where the lesion has its own contrast.
    When no class qualifies (a component inside uniform tissue) or Atropos fails (too few distinct
    intensities), the component is kept as it is.
    """
    spacing = tuple(float(s) for s in spacing)
    brain = _as_bool(brain_mask)
    labels, _ = ndimage.label(segmentation, structure=_CONNECTIVITY)
    margin = np.ceil(_ATROPOS_BOX_MARGIN_MM / np.array(spacing)).astype(int)
    neighbourhood_element = ellipsoid_element(_REFINE_NEIGHBOURHOOD_MM, spacing)
    refined = np.zeros(segmentation.shape, bool)
    for label, bounds in enumerate(ndimage.find_objects(labels), start=1):
        lo = np.maximum([s.start for s in bounds] - margin, 0)
        hi = np.minimum([s.stop for s in bounds] + margin, labels.shape)
        box = _slices(lo, hi)
        component = labels[box] == label
        try:
            classes = _atropos_classes(image[box], brain[box], spacing)
        # antspyx raises a bare Exception when Atropos exits with an error, e.g. an empty class.
        except Exception as error:
            logger.warning("Atropos failed on a component (%s); it is kept unrefined", error)
            refined[box] |= component
            continue
        refined[box] |= _refine_component(component, classes, neighbourhood_element)
    return refined


def _atropos_classes(image: np.ndarray, brain: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Atropos class (1..5, ordered by intensity) of every brain voxel; 0 outside the brain."""
    import ants  # antspyx is slow to import and only this optional step needs it

    result = ants.atropos(
        a=ants.from_numpy(np.ascontiguousarray(image, np.float32), spacing=spacing),
        x=ants.from_numpy(brain.astype(np.float32), spacing=spacing),
        i=f"kmeans[{_ATROPOS_CLASSES}]",
        m="[0.1,1x1x1]",
        c="[5,0]",
    )
    return result["segmentation"].numpy().astype(np.int16) * brain


def _refine_component(component: np.ndarray, classes: np.ndarray, neighbourhood_element: np.ndarray) -> np.ndarray:
    """The rule of :func:`refine_with_atropos` for one component (bool, the shape of ``component``)."""
    neighbourhood = ndimage.binary_dilation(component, neighbourhood_element) & (classes > 0)
    ring = neighbourhood & ~component
    inside = np.bincount(classes[component & (classes > 0)], minlength=_ATROPOS_CLASSES + 1)[1:]
    around = np.bincount(classes[ring], minlength=_ATROPOS_CLASSES + 1)[1:]
    if inside.sum() == 0:
        return component
    enrichment = inside / inside.sum() - around / max(around.sum(), 1)
    chosen = np.flatnonzero(enrichment >= _REFINE_MIN_ENRICHMENT) + 1
    if chosen.size == 0:
        return component
    same_class = neighbourhood & np.isin(classes, chosen)
    parts, _ = ndimage.label(same_class, structure=_CONNECTIVITY)
    touching = np.unique(parts[component & same_class])
    return np.isin(parts, touching[touching > 0])


def ellipsoid_offsets(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Voxel offsets (n, 3) within ``radius_mm`` of the centre in physical distance; just the centre if 0.

    A radius smaller than the voxel size along an axis does not reach past the centre along that axis, so a
    1 mm dilation does nothing on a 2 mm grid.
    """
    spacing = np.asarray(spacing, float)
    if radius_mm <= 0:
        return np.zeros((1, 3), int)
    reach = np.floor(radius_mm / spacing + 1e-9).astype(int)
    grid = np.indices(2 * reach + 1).reshape(3, -1).T - reach
    inside = (((grid * spacing) / radius_mm) ** 2).sum(axis=1) <= 1 + 1e-9
    return grid[inside]


def ellipsoid_element(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """The same ellipsoid as :func:`ellipsoid_offsets`, as a boolean structuring element."""
    offsets = ellipsoid_offsets(radius_mm, spacing)
    reach = np.abs(offsets).max(axis=0)
    element = np.zeros(2 * reach + 1, bool)
    element[tuple((offsets + reach).T)] = True
    return element


def _select_components(
    voxels: np.ndarray, values: np.ndarray, shape: tuple[int, ...], config: PostprocessConfig, voxel_mm3: float
) -> np.ndarray:
    """Flat indices (into ``shape``) of the voxels in the components that pass the size and top-K rules."""
    if voxels.size == 0:
        return voxels
    mask = np.zeros(shape, bool)
    mask.ravel()[voxels] = True
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    voxel_labels = labels.ravel()[voxels]
    sizes = np.bincount(voxel_labels, minlength=count + 1)
    means = np.bincount(voxel_labels, weights=values, minlength=count + 1) / np.maximum(sizes, 1)
    # Compare in voxels with a small tolerance, so that a component of exactly the minimum volume is kept.
    big_enough = sizes >= config.min_component_mm3 / voxel_mm3 - 1e-6
    big_enough[0] = False  # background
    survivors = np.flatnonzero(big_enough)
    if config.top_k and survivors.size > config.top_k:
        survivors = survivors[np.argsort(-means[survivors], kind="stable")[: config.top_k]]
    keep = np.zeros(count + 1, bool)
    keep[survivors] = True
    return voxels[keep[voxel_labels]]


def _all_true_at(flat_mask: np.ndarray, voxels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each voxel, whether ``flat_mask`` is true at every offset from it (a binary erosion at those voxels)."""
    result = np.ones(voxels.size, bool)
    for offset in offsets:
        if offset:
            result &= flat_mask[voxels + offset]
    return result


def _set_true_at(flat_mask: np.ndarray, voxels: np.ndarray, offsets: np.ndarray) -> None:
    """Set ``flat_mask`` at every offset from every voxel (a binary dilation of those voxels), in place."""
    for offset in offsets:
        flat_mask[voxels + offset] = True


def _flat_offsets(offsets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Offsets as steps in a C-ordered flat array of ``shape``; valid wherever the box margin covers them."""
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    return offsets @ strides


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, stop) of the true voxels, or None when there are none."""
    starts, stops = [], []
    for axis in range(mask.ndim):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        starts.append(present[0])
        stops.append(present[-1] + 1)
    return np.array(starts), np.array(stops)


def _extract(volume: np.ndarray, start: np.ndarray, stop: np.ndarray, fill: float | bool) -> np.ndarray:
    """``volume[start:stop]`` where the box may reach past the volume; those voxels get ``fill``."""
    box = np.full(tuple(stop - start), fill, dtype=volume.dtype)
    lo, hi = np.maximum(start, 0), np.minimum(stop, volume.shape)
    box[_slices(lo - start, hi - start)] = volume[_slices(lo, hi)]
    return box


def _insert(volume: np.ndarray, start: np.ndarray, box: np.ndarray) -> None:
    """Write the part of ``box`` (placed at ``start``) that lies inside ``volume``."""
    stop = start + np.array(box.shape)
    lo, hi = np.maximum(start, 0), np.minimum(stop, volume.shape)
    volume[_slices(lo, hi)] = box[_slices(lo - start, hi - start)]


def _slices(start: np.ndarray, stop: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def _as_bool(mask: np.ndarray) -> np.ndarray:
    return mask if mask.dtype == bool else mask != 0


def _check_geometry(array: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if array.ndim != 3:
        raise UserInputError(f"expected a 3D volume, got shape {array.shape}")
    if array.shape != brain_mask.shape:
        raise UserInputError(
            f"volume shape {array.shape} differs from the brain mask's {brain_mask.shape}; resample one onto the other"
        )
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UserInputError(f"voxel spacing must be three positive sizes in mm, got {spacing}; check the image header")
    return spacing
