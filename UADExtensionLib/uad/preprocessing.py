"""From a scan as a clinician has it to the model's working grid, and back.

Steps (all antspyx, no downloads): resample to the working resolution in the scan's own space, N4 bias-field
correction, affine registration to a bundled template (the IXI head template for full-head scans, the MNI152
2009a brain for skull-stripped ones), brain mask (given, the non-zero region of a stripped scan, or the
template mask carried back), intensity normalisation inside the brain, resampling onto the working grid.
:meth:`Preprocessed.to_input_space` maps any working-grid array back onto the input's own voxel grid through
the inverse of the same transform, so outputs share the input's shape and affine exactly.

ANTs images live in LPS physical space; nibabel affines are RAS. :func:`to_ants` converts between the two
without resampling, so an ANTs array has the same voxel order as the NIfTI file.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from uad import resources
from uad.errors import UserInputError
from uad.io import Volume


class _LazyAnts:
    """``ants`` imported at first use: the configs here are needed by training from a cache, calibration and the
    checkpoint loader, which never touch antspyx (slow to import; not installable on every training machine)."""

    def __getattr__(self, name: str):
        import ants
        import ants.config  # noqa: F401  (the submodule _register uses)

        return getattr(ants, name)


ants = _LazyAnts()
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
REGISTRATION_SEED = 1


@dataclass(frozen=True)
class Grid:
    """A regular grid in MNI space (LPS millimetres, template orientation)."""

    shape: tuple[int, int, int]
    spacing: float
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

    def reference_image(self) -> ants.ANTsImage:
        return ants.from_numpy(
            np.zeros(self.shape, np.float32),
            origin=list(self.origin),
            spacing=[self.spacing] * 3,
            direction=np.reshape(self.direction, (3, 3)),
        )


def centred_grid(shape: tuple[int, int, int], spacing: float, centre_lps: tuple[float, float, float]) -> Grid:
    """The grid of ``shape`` voxels whose centre is ``centre_lps``, in the template's LPI orientation."""
    signs = np.array([-1.0, -1.0, 1.0])  # index axes run towards -x, -y, +z in LPS, as in the MNI file
    half = (np.array(shape) - 1) / 2.0 * spacing
    origin = np.array(centre_lps) - signs * half
    return Grid(tuple(int(s) for s in shape), float(spacing), tuple(float(o) for o in origin))


# The model's grid: the MNI152 brain's bounding box (145 x 181 x 155 mm) with a few mm of margin, at 2 mm
# (the resolution of the IXI training scans). 80 x 96 is divisible by 16 for 4-level encoders.
WORKING_GRID = centred_grid((80, 96, 80), 2.0, (0.0, 17.0, 5.0))
# Registration runs on a larger grid that covers the whole head, so full-head scans align skull to skull.
REGISTRATION_GRID = centred_grid((96, 120, 104), 2.0, (0.0, 12.0, -5.0))


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns a raw scan into model input; stored in every checkpoint."""

    working_grid: Grid = WORKING_GRID
    resample_spacing_mm: float = 2.0
    n4_shrink_factor: int = 4
    n4_iterations: tuple[int, ...] = (20, 20, 20)
    registration: str = "AffineFast"  # full "Affine" costs 4x the time for no visible gain at 2 mm
    normalisation_percentile: float = 99.0
    max_intensity: float = 1.5  # after normalisation; caps hyperintense outliers (e.g. fat, vessels)

    def mask_size_px(self, mask_size_mm: float) -> int:
        """A mask side in mm (the papers' pixels at 1 mm) -> working-grid pixels."""
        return int(round(mask_size_mm / self.working_grid.spacing))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessConfig:
        values = dict(values)
        grid = values.pop("working_grid", None)
        config = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        if grid is not None:
            grid = Grid(tuple(grid["shape"]), grid["spacing"], tuple(grid["origin"]), tuple(grid["direction"]))
            config = cls(**{**asdict(config), "working_grid": grid})
        return config


@dataclass
class Preprocessed:
    """A scan on the working grid, with what is needed to go back to the input's grid."""

    image: np.ndarray  # (X, Y, Z) float32 on the working grid, normalised, 0 outside the brain
    brain_mask: np.ndarray  # (X, Y, Z) bool on the working grid
    input_brain_mask: Volume  # uint8 on the input's grid
    intensity_scale: float  # input units per normalised unit
    intensity_offset: float = field(default=0.0, kw_only=True)  # input units at normalised 0 (z-scored inputs)
    input_reference: ants.ANTsImage = field(repr=False)
    transforms: list[str] = field(repr=False)  # input -> template, ANTs convention
    workdir: tempfile.TemporaryDirectory = field(repr=False)
    grid: Grid = WORKING_GRID
    seconds: dict[str, float] = field(default_factory=dict)  # time per step: "preprocessing", "registration"
    # The registered scan on the registration template's grid, and that template's name: what the input check
    # (uad.input_check) compares with the template.
    registered: np.ndarray | None = field(default=None, repr=False)
    template: str = ""

    def to_input_space(self, array: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Resample a working-grid array onto the input's voxel grid (float32; 0 outside the grid)."""
        moving = self.grid.reference_image().new_image_like(np.asarray(array, np.float32))
        resampled = ants.apply_transforms(
            fixed=self.input_reference,
            moving=moving,
            transformlist=self.transforms,
            whichtoinvert=[True] * len(self.transforms),
            interpolator=interpolation,
            defaultvalue=0,
        )
        return resampled.numpy().astype(np.float32)

    def to_working_grid(self, array: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Resample an array on the input's voxel grid (a label, a field of view) onto the working grid (float32; 0
        outside the input)."""
        moving = self.input_reference.new_image_like(np.asarray(array, np.float32))
        resampled = ants.apply_transforms(self.grid.reference_image(), moving, self.transforms,
                                          interpolator=interpolation, defaultvalue=0)
        return resampled.numpy().astype(np.float32)

    def close(self) -> None:
        self.workdir.cleanup()


def to_ants(volume: Volume) -> ants.ANTsImage:
    """The same voxels as an ANTs image (LPS), no resampling."""
    lps = _RAS_TO_LPS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(
        np.ascontiguousarray(volume.data, dtype=np.float32),
        origin=[float(v) for v in lps[:3, 3]],
        spacing=[float(s) for s in spacing],
        direction=direction,
    )


def ants_affine(image: ants.ANTsImage) -> np.ndarray:
    """The RAS voxel-to-world affine of an ANTs image."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.direction) * np.asarray(image.spacing)
    lps[:3, 3] = image.origin
    return _RAS_TO_LPS @ lps


def normalise_intensity(image: np.ndarray, mask: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, float]:
    """Scale so the given percentile of brain intensities is 1; 0 outside the brain. Returns (image, scale)."""
    brain = image[mask]
    scale = float(np.percentile(brain, config.normalisation_percentile)) if brain.size else 0.0
    if scale <= 0:
        raise UserInputError("the brain region of the input has no signal; check the scan or the brain mask")
    normalised = np.clip(image / scale, 0.0, config.max_intensity) * mask
    return normalised.astype(np.float32), scale


def reference_intensity_field(image: np.ndarray, mask: np.ndarray, reference: np.ndarray, degree: int,
                              smoothing_voxels: float = 2.0) -> np.ndarray:
    """Smooth multiplicative field by which ``image`` departs from a healthy ``reference`` on the same grid.

    N4 leaves some scans (older or other sites' sequences) with a brain that darkens from top to bottom, and the
    99th-percentile scaling then puts the whole brain off the healthy level; a model comparing intensities with
    healthy scans flags all of it. The log ratio of the two (both lightly smoothed) over tissue is fitted by a
    polynomial of ``degree`` in the voxel coordinates, robustly: voxels far off the fit (a lesion, a misregistered
    edge) are dropped and the fit repeated, so a focal lesion does not bend the field. ``image / field`` is then on
    the reference's intensity level everywhere. Returns ones when there is too little tissue to fit.
    """
    weights = mask.astype(np.float32)
    support = np.maximum(ndimage.gaussian_filter(weights, smoothing_voxels), 1e-3)
    smoothed_image = ndimage.gaussian_filter(image * weights, smoothing_voxels) / support
    smoothed_reference = ndimage.gaussian_filter(reference * weights, smoothing_voxels) / support
    # Tissue away from the brain's edge and out of CSF, where the ratio is a bias and not a partial volume.
    tissue = (ndimage.binary_erosion(mask, iterations=2) & (smoothed_reference > 0.35) & (smoothed_image > 0.05))
    tissue[::2] = False  # every other plane is plenty for 20 coefficients, and halves the fit's time
    if tissue.sum() < 1000:
        return np.ones(image.shape, np.float32)
    log_ratio = np.log(smoothed_image[tissue] / smoothed_reference[tissue])
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in image.shape]
    powers = [(a, b, c) for a in range(degree + 1) for b in range(degree + 1) for c in range(degree + 1)
              if a + b + c <= degree]

    def design(where: np.ndarray) -> np.ndarray:
        x, y, z = (axes[axis][index] for axis, index in enumerate(np.nonzero(where)))
        return np.stack([x ** a * y ** b * z ** c for a, b, c in powers], axis=1)

    terms = design(tissue)
    kept = np.ones(log_ratio.shape, bool)
    for _ in range(4):
        coefficients = np.linalg.lstsq(terms[kept], log_ratio[kept], rcond=None)[0]
        deviation = log_ratio - terms @ coefficients
        spread = 1.4826 * np.median(np.abs(deviation[kept] - np.median(deviation[kept])))
        kept = np.abs(deviation) < 2.5 * max(spread, 1e-6)
    field = np.exp(design(np.ones(image.shape, bool)) @ coefficients).reshape(image.shape)
    return field.astype(np.float32)


def background_value(data: np.ndarray) -> float:
    """What fills the background: the minimum if it covers at least 5 % of the volume (a z-scored scan's
    background is negative), else 0 (scattered negative values are interpolation noise, not background)."""
    low = float(data.min())
    return low if np.count_nonzero(data == low) >= 0.05 * data.size else 0.0


OUTLIER_CEILING = 10.0  # x the 99.9th percentile of the signal; real scans (fat, vessels) stay below 3x


def clip_outliers(volume: Volume) -> Volume:
    """Hot pixels far above the rest of the scan (e.g. 1e15 in a 1e9 image) squash registration's intensity
    histogram into one bin; clip them (a copy: the input is never modified). Ordinary scans are unchanged."""
    data = volume.data
    signal = data[data > 0]
    if not signal.size:
        return volume
    ceiling = OUTLIER_CEILING * float(np.percentile(signal, 99.9))
    if ceiling <= 0 or float(data.max()) <= ceiling:
        return volume
    return Volume(np.minimum(data, ceiling), volume.affine, volume.header_codes)


def preprocess(
    volume: Volume,
    config: PreprocessConfig,
    brain_mask: Volume | None = None,
    skull_stripped: bool = False,
) -> Preprocessed:
    """Bring ``volume`` onto ``config.working_grid``; see the module docstring for the steps."""
    if brain_mask is not None and brain_mask.shape != volume.shape:
        raise UserInputError(
            f"brain mask shape {brain_mask.shape} differs from the input's {volume.shape}; "
            "give the mask made for this scan"
        )
    started = time.perf_counter()
    # Z-scored scans (e.g. BraTS) have a negative background, which N4 and the percentile scaling cannot take:
    # shift them so the background is 0 (a copy: the input is never modified); the reconstruction is shifted back.
    offset = min(background_value(volume.data), 0.0)
    if offset < 0:
        volume = Volume(volume.data - offset, volume.affine)
    volume = clip_outliers(volume)
    workdir = tempfile.TemporaryDirectory(prefix="uad-")
    native = to_ants(volume)
    coarse = _resample_to_spacing(native, config.resample_spacing_mm)
    corrected = ants.n4_bias_field_correction(
        coarse,
        shrink_factor=config.n4_shrink_factor,
        convergence={"iters": list(config.n4_iterations), "tol": 1e-4},
    )

    if brain_mask is not None or skull_stripped:
        if brain_mask is not None:
            native_mask = to_ants(Volume((brain_mask.data > 0).astype(np.float32), volume.affine))
        else:
            # Stripped scans can hold exact zeros inside the brain (dark CSF after N4); they are brain, not holes.
            stripped = ndimage.binary_fill_holes(volume.data > 0)
            native_mask = native.new_image_like(stripped.astype(np.float32))
        coarse_mask = ants.resample_image_to_target(native_mask, coarse, interp_type="linear") > 0.5
        moving = corrected * coarse_mask
        template = "mni_brain"
    else:
        moving, template, native_mask = corrected, "ixi_head", None
    fixed = resources.template_image(template)

    registration_started = time.perf_counter()
    transforms = _register(fixed, moving, config.registration, Path(workdir.name))
    registration_seconds = time.perf_counter() - registration_started
    grid_reference = config.working_grid.reference_image()
    warped = ants.apply_transforms(grid_reference, corrected, transforms, interpolator="linear").numpy()
    if native_mask is not None:
        grid_mask = ants.apply_transforms(grid_reference, native_mask, transforms, interpolator="linear").numpy() > 0.5
    else:
        template_mask = resources.template_image("mni_brainmask")
        grid_mask = ants.resample_image_to_target(template_mask, grid_reference).numpy() > 0.5

    image, scale = normalise_intensity(warped, grid_mask, config)
    prep = Preprocessed(
        image=image,
        brain_mask=grid_mask,
        input_brain_mask=Volume(np.zeros(volume.shape, np.uint8), volume.affine),
        intensity_scale=scale,
        intensity_offset=offset,
        input_reference=native,
        transforms=transforms,
        workdir=workdir,
        grid=config.working_grid,
        registered=ants.apply_transforms(fixed, moving, transforms, interpolator="linear").numpy(),
        template=template,
    )
    if native_mask is not None:
        prep.input_brain_mask.data = (native_mask.numpy() > 0.5).astype(np.uint8)
    else:
        prep.input_brain_mask.data = (prep.to_input_space(grid_mask.astype(np.float32)) > 0.5).astype(np.uint8)
    total = time.perf_counter() - started
    prep.seconds = {"preprocessing": round(total - registration_seconds, 3),
                    "registration": round(registration_seconds, 3)}
    return prep


def _resample_to_spacing(image: ants.ANTsImage, spacing_mm: float) -> ants.ANTsImage:
    """Resample to isotropic ``spacing_mm`` (never finer than the input) in the image's own space."""
    target = [max(spacing_mm, s) for s in image.spacing]
    if np.allclose(target, image.spacing):
        return image.clone()
    return ants.resample_image(image, target, use_voxels=False, interp_type=0)


def _register(fixed: ants.ANTsImage, moving: ants.ANTsImage, kind: str, workdir: Path) -> list[str]:
    # antspyx takes the metric-sampling seed from its global config only (a ``random_seed`` argument is ignored).
    # With it, repeated runs differ 15x less (matrix entries by ~0.005); bit-identical runs also need one ITK thread
    # (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 before start-up), as multi-threaded metric sums vary in order.
    ants.config.set_ants_deterministic(on=False, seed_value=REGISTRATION_SEED)
    result = ants.registration(fixed=fixed, moving=moving, type_of_transform=kind, outprefix=str(workdir / "reg_"))
    return result["fwdtransforms"]
