"""Does the scan look like a head or brain T1 in the template's sense? Checked before any model runs.

A model trained on healthy T1 brains returns a confident answer for anything it is given: noise, a T2, a full
head declared skull-stripped. This module measures, on the input and on its registration to the template:

- ``registration_correlation``: Pearson correlation of the registered scan with the template it was registered to
  (the IXI head for full heads, the MNI152 brain for skull-stripped scans), over the whole registration grid;
- ``brain_volume_ml``: the brain mask used, in ml on the input's grid;
- ``brain_coverage``: the fraction of the template brain that lies inside the scan's field of view;
- ``wm_gm_ratio`` and ``gm_csf_ratio``: median intensity of the registered scan in the template's white-matter,
  grey-matter and CSF regions (a 3-class k-means of the MNI152 T1 inside its brain mask); a T1 has
  WM > GM > CSF, a T2 the reverse, a FLAIR GM > WM;
- ``tissue_contrast``: the larger of the two ratios' distances from 1 (in log units): any brain MRI has some,
  noise, a phantom or a limb has none;
- ``background_fraction``: the fraction of the field of view darker than 10 % of the scan's 99th percentile.

Each measure has limits (:data:`LIMITS`) chosen on the healthy scans of ../shared/data (``uad check-inputs``
measures them all and writes the false-alarm rate to BENCHMARKS.md): outside the refusal limits the input is not
a brain MRI and is refused (one-line error, nothing written); outside the warning limits it runs, with a warning.

Skull stripping is detected, not assumed (:func:`decide_skull_stripping`): a stripped scan is a brain-sized
region of signal on an exactly constant background, with hardly any dark voxels inside it; a full head has a
head-sized region, with air, bone and noise in it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from uad.errors import UserInputError
from uad.io import Volume, load_volume

log = logging.getLogger(__name__)

# A background that is one exact value covering this much of the field of view is "stripped-looking".
CONSTANT_BACKGROUND_FRACTION = 0.3
# The region of signal of a skull-stripped scan is a brain (healthy stripped scans here: 1.1-1.6 l); a full head,
# even a small one, is well over 3 l. Between the two, at the geometric middle: 2.3 l.
STRIPPED_SUPPORT_MAX_ML = 2300.0
DARK_LEVEL = 0.1  # "background": darker than this fraction of the scan's 99th percentile
# Share of the region of signal darker than DARK_LEVEL: stripped T1 scans here <= 4 % (CSF), full heads >= 11 %.
STRIPPED_DARK_SIGNAL_MAX = 0.07


@dataclass(frozen=True)
class Limit:
    """Limits of one measure: outside ``refuse`` the input is not a brain T1, outside ``warn`` it is doubtful.
    ``None`` means no limit on that side (the contrast ratios never refuse: a T2 is a brain, only doubtful).
    Chosen on healthy data (see ``uad check-inputs``)."""

    unit: str
    warn_low: float | None = None
    warn_high: float | None = None
    refuse_low: float | None = None
    refuse_high: float | None = None

    def verdict(self, value: float) -> str:
        if (self.refuse_low is not None and value < self.refuse_low) or \
                (self.refuse_high is not None and value > self.refuse_high):
            return "refuse"
        if (self.warn_low is not None and value < self.warn_low) or \
                (self.warn_high is not None and value > self.warn_high):
            return "warn"
        return "ok"

    def margin(self, value: float) -> float:
        """Distance to the nearest warning limit (refusal limit for a measure that only refuses), negative when
        outside, in the measure's unit."""
        low, high = self.warn_low, self.warn_high
        if low is None and high is None:
            low, high = self.refuse_low, self.refuse_high
        distances = [value - low] if low is not None else []
        distances += [high - value] if high is not None else []
        return min(distances) if distances else float("inf")

    def allowed(self) -> str:
        """The range a healthy T1 gives: the warning limits, or the refusal limits for a measure that only refuses."""
        low, high = self.warn_low, self.warn_high
        if low is None and high is None:
            low, high = self.refuse_low, self.refuse_high
        if low is not None and high is not None:
            return f"{low:g}-{high:g}{self.unit}"
        return f">= {low:g}{self.unit}" if low is not None else f"<= {high:g}{self.unit}"


# Chosen on the 166 healthy scans of ../shared/data (150 IXI full heads, 15 skull-stripped MASS, 1 native 0.9 mm
# head; `uad check-inputs`, BENCHMARKS.md "input-check"): every warning limit lies beyond the lowest and highest
# healthy value, with a margin; refusal limits sit where only non-brains go (noise: correlation 0.39, contrast 0).
# Healthy ranges: correlation 0.79-0.96 (both templates), brain 982-1658 ml, coverage 1.0, WM/GM 1.11-1.42,
# GM/CSF 1.04-1.48, contrast >= 0.12, background >= 0.51.
LIMITS: dict[str, Limit] = {
    # Correlation depends on the template: a head against the IXI head, a brain against the MNI brain.
    "registration_correlation/ixi_head": Limit("", warn_low=0.75, refuse_low=0.50),
    "registration_correlation/mni_brain": Limit("", warn_low=0.75, refuse_low=0.50),
    "brain_volume_ml": Limit(" ml", warn_low=900.0, warn_high=2100.0, refuse_low=250.0, refuse_high=3500.0),
    "brain_coverage": Limit("", warn_low=0.95, refuse_low=0.30),
    "wm_gm_ratio": Limit("", warn_low=1.05),  # a FLAIR or T2 is below 1
    "gm_csf_ratio": Limit("", warn_low=1.0),  # the order itself; 2 mm partial volume keeps healthy T1s near 1.1
    "tissue_contrast": Limit("", refuse_low=0.02),
    "background_fraction": Limit("", warn_low=0.35, refuse_low=0.10),
}
# Why each measure can fail: the words of the warning (or refusal).
MEANING = {
    "registration_correlation": "the scan matches the template poorly after registration (not a head/brain T1, "
                                "or registration failed)",
    "brain_volume_ml": "the brain mask's volume is outside the adult range (a child, extreme atrophy, a cropped scan "
                       "or a wrong skull-stripping choice)",
    "brain_coverage": "part of the brain lies outside the field of view (cropped scan)",
    "wm_gm_ratio": "white matter is not brighter than grey matter, as it is on a T1 (a T2 or FLAIR?)",
    "gm_csf_ratio": "grey matter is not brighter than CSF, as it is on a T1 (a T2?)",
    "background_fraction": "little of the image is background (noise, or not a head image)",
    "tissue_contrast": "the brain region shows no tissue contrast (noise, a phantom, not a brain)",
}


@dataclass(frozen=True)
class SkullStripping:
    """Whether the scan was treated as skull-stripped, and why."""

    skull_stripped: bool  # what preprocessing used
    decided_by: str  # "auto", "--skull-stripped", "--full-head" or "brain mask"
    looks_stripped: bool  # what the image itself says
    signal_ml: float  # volume of the region of signal (not background)
    constant_background_fraction: float  # the field of view's fraction at exactly the background value
    dark_signal_fraction: float  # the region of signal's share darker than DARK_LEVEL
    reason: str

    @property
    def contradicted(self) -> bool:
        """An explicit flag that the image clearly disagrees with."""
        return self.decided_by.startswith("--") and self.skull_stripped != self.looks_stripped


@dataclass(frozen=True)
class Measure:
    name: str
    value: float
    verdict: str  # "ok", "warn" or "refuse"
    limit: Limit
    margin: float  # to the nearest warning limit; negative outside

    def to_dict(self) -> dict:
        return {"value": round(self.value, 4), "verdict": self.verdict, "margin": round(self.margin, 4),
                "limits": asdict(self.limit)}


@dataclass
class InputCheck:
    """What the input check measured and concluded; ``report.json`` holds :meth:`to_dict` as ``input_check``."""

    skull_stripping: SkullStripping
    measures: dict[str, Measure] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    refusal: str | None = None  # one line; the input is not processed

    @property
    def passed(self) -> bool:
        return self.refusal is None

    def to_dict(self) -> dict:
        return {
            "skull_stripping": asdict(self.skull_stripping),
            "measures": {name: m.to_dict() for name, m in self.measures.items()},
            "warnings": list(self.warnings),
            "refused": self.refusal,
        }

    def raise_if_refused(self) -> None:
        if self.refusal:
            raise UserInputError(self.refusal)


# --- skull stripping -------------------------------------------------------------------------------------------


def signal_region(volume: Volume) -> tuple[np.ndarray, float]:
    """(voxels that are not background, fraction of the field of view exactly at the background value).

    The background value is the minimum when it fills at least 5 % of the image (stripped and z-scored scans),
    else 0."""
    from uad.preprocessing import background_value

    data = volume.data
    background = background_value(data)
    at_background = data == background
    return ~at_background, float(at_background.mean())


def decide_skull_stripping(volume: Volume, requested: bool | None, brain_mask_given: bool = False) -> SkullStripping:
    """Auto-detect skull stripping; an explicit choice (``requested``) wins but is compared with the image.

    Raises :class:`UserInputError` when ``--skull-stripped`` is given for a scan whose region of signal is far too
    big for a brain: the brain mask would be the whole head (or the whole field of view)."""
    signal, constant_fraction = signal_region(volume)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    # Speckle in a full head's air is not part of the head: measure the largest connected region of signal.
    labels, count = ndimage.label(signal)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    region = labels == int(np.argmax(sizes)) if count else signal
    signal_ml = float(region.sum()) * voxel_ml
    dark = _relative_intensity(volume) < DARK_LEVEL
    dark_fraction = float(dark[region].mean()) if region.any() else 1.0
    looks_stripped = (constant_fraction >= CONSTANT_BACKGROUND_FRACTION and signal_ml <= STRIPPED_SUPPORT_MAX_ML
                      and dark_fraction <= STRIPPED_DARK_SIGNAL_MAX)
    if looks_stripped:
        reason = (f"{constant_fraction:.0%} of the field of view is one constant background value and the region of "
                  f"signal is brain-sized ({signal_ml:.0f} ml <= {STRIPPED_SUPPORT_MAX_ML:.0f}) with little dark "
                  f"inside ({dark_fraction:.1%})")
    elif constant_fraction < CONSTANT_BACKGROUND_FRACTION:
        reason = f"the background is not one constant value (only {constant_fraction:.0%} of the field of view is)"
    elif signal_ml > STRIPPED_SUPPORT_MAX_ML:
        reason = f"the region of signal is head-sized ({signal_ml:.0f} ml > {STRIPPED_SUPPORT_MAX_ML:.0f} for a brain)"
    else:
        reason = (f"the region of signal holds dark air, bone or noise ({dark_fraction:.0%} of it; a stripped brain "
                  f"<= {STRIPPED_DARK_SIGNAL_MAX:.0%})")
    measured = dict(looks_stripped=looks_stripped, signal_ml=round(signal_ml, 1),
                    constant_background_fraction=round(constant_fraction, 4),
                    dark_signal_fraction=round(dark_fraction, 4))

    if brain_mask_given:
        return SkullStripping(True, "brain mask", **measured,
                              reason="a brain mask was given: the brain is its non-zero region")
    if requested is None:
        return SkullStripping(looks_stripped, "auto", **measured, reason=reason)
    flag = "--skull-stripped" if requested else "--full-head"
    decision = SkullStripping(requested, flag, **measured, reason=reason)
    volume_limit = LIMITS["brain_volume_ml"]
    if requested and signal_ml > volume_limit.refuse_high:
        raise UserInputError(
            f"--skull-stripped was given, but the scan's region of signal is {signal_ml:.0f} ml, far more than any "
            f"brain (this looks like a full head): the brain mask would be the whole head; drop --skull-stripped")
    return decision


# --- measures after registration -------------------------------------------------------------------------------


@cache
def _tissue_regions() -> dict[str, np.ndarray]:
    """CSF, GM and WM regions of the MNI152 T1 on the registration grid (3-class k-means inside its brain mask,
    eroded by one voxel so the brain's edge, which registration blurs, is not counted)."""
    from uad import resources

    template = resources.template_image("mni_brain").numpy()
    brain = ndimage.binary_erosion(resources.template_image("mni_brainmask").numpy() > 0.5)
    values = template[brain]
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(50):  # 1-D k-means (Lloyd), deterministic from the percentile start
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array([values[labels == k].mean() for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = updated
    order = np.argsort(centres)  # CSF darkest, WM brightest on a T1
    regions = {}
    for name, k in zip(("csf", "gm", "wm"), order):
        region = np.zeros(template.shape, bool)
        region[brain] = labels == k
        regions[name] = region
    return regions


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, each image clipped at its 99.5th percentile so a few hot voxels cannot dominate."""
    a = np.minimum(a.ravel().astype(np.float64), np.percentile(a, 99.5))
    b = np.minimum(b.ravel().astype(np.float64), np.percentile(b, 99.5))
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _relative_intensity(volume: Volume) -> np.ndarray:
    """Intensity above the background value, in units of the signal's 99th percentile above it."""
    from uad.preprocessing import background_value

    data = volume.data
    background = background_value(data)
    signal = data[data != background]
    top = float(np.percentile(signal, 99)) - background if signal.size else 0.0
    return (data - background) / top if top > 0 else np.zeros_like(data)


def background_fraction(volume: Volume) -> float:
    """The field of view's fraction darker than ``DARK_LEVEL`` of the signal's 99th percentile (above background)."""
    return float(np.mean(_relative_intensity(volume) < DARK_LEVEL))


def measure(volume: Volume, prep, skull_stripping: SkullStripping) -> InputCheck:
    """Every measure of the module docstring, from a scan and its :class:`~uad.preprocessing.Preprocessed`."""
    return judge(measure_values(volume, prep), skull_stripping)


def measure_values(volume: Volume, prep) -> dict[str, float]:
    """The raw measures, keyed as in :data:`LIMITS` (the correlation's key names the template)."""
    from uad import resources

    values: dict[str, float] = {}
    template = resources.template_image(prep.template).numpy()
    values[f"registration_correlation/{prep.template}"] = _correlation(prep.registered, template)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    values["brain_volume_ml"] = float(np.count_nonzero(prep.input_brain_mask.data)) * voxel_ml
    values["brain_coverage"] = _brain_coverage(prep)
    medians = {name: float(np.median(prep.registered[region])) for name, region in _tissue_regions().items()}
    values["wm_gm_ratio"] = medians["wm"] / medians["gm"] if medians["gm"] > 0 else 0.0
    values["gm_csf_ratio"] = medians["gm"] / medians["csf"] if medians["csf"] > 0 else 99.0 * (medians["gm"] > 0)
    ratios = [values["wm_gm_ratio"], values["gm_csf_ratio"]]
    values["tissue_contrast"] = max(abs(float(np.log(r))) for r in ratios) if min(ratios) > 0 else 99.0
    values["background_fraction"] = background_fraction(volume)
    return values


def judge(values: dict[str, float], skull_stripping: SkullStripping) -> InputCheck:
    """Measures against :data:`LIMITS`: the warnings, or the one-line refusal."""
    check = InputCheck(skull_stripping)
    for key, value in values.items():
        limit = LIMITS[key]
        name = key.split("/")[0]
        check.measures[name] = Measure(name, value, limit.verdict(value), limit, limit.margin(value))

    doubtful = [m for m in check.measures.values() if m.verdict != "ok"]
    refused = [m for m in doubtful if m.verdict == "refuse"]
    if skull_stripping.contradicted and check.measures["brain_volume_ml"].verdict != "ok":
        # A flag the image disagrees with, and the mask it gives is implausible: the flag is wrong.
        flag = skull_stripping.decided_by
        looks = "skull-stripped" if skull_stripping.looks_stripped else "like a full head"
        check.refusal = (f"{flag} was given, but the image looks {looks} ({skull_stripping.reason}) and the brain "
                         f"mask would be "
                         f"{values['brain_volume_ml']:.0f} ml (adult range "
                         f"{LIMITS['brain_volume_ml'].allowed()}); drop {flag} to let uad decide")
        return check
    if refused:
        details = "; ".join(f"{MEANING[m.name]}: {m.name} {m.value:.3g}, a brain T1 gives {m.limit.allowed()}"
                            for m in refused)
        check.refusal = (f"the input does not look like a brain MRI ({details}); check that this is the T1 of a head "
                         f"or brain")
        return check
    if skull_stripping.contradicted:
        check.warnings.append(
            f"{skull_stripping.decided_by} was given, but the image looks "
            f"{'skull-stripped' if skull_stripping.looks_stripped else 'like a full head'} ({skull_stripping.reason})")
    for m in doubtful:
        check.warnings.append(f"{MEANING[m.name]}: {m.name} {m.value:.3g}, healthy T1 scans give {m.limit.allowed()}; "
                              f"flagged regions may not be trustworthy")
    return check


def _brain_coverage(prep) -> float:
    """Fraction of the working grid's brain mask that the scan's field of view covers."""
    covered = prep.to_working_grid(np.ones(prep.input_reference.shape, np.float32)) > 0.5
    brain = _template_brain_on(prep.grid)
    return float(covered[brain].mean()) if brain.any() else 0.0


@cache
def _template_brain_on(grid) -> np.ndarray:
    import ants

    from uad import resources

    mask = resources.template_image("mni_brainmask")
    return ants.resample_image_to_target(mask, grid.reference_image()).numpy() > 0.5


def check_input(path: str | Path, skull_stripped: bool | None = None, brain_mask: str | Path | None = None,
                config=None) -> InputCheck:
    """Load, decide skull stripping, preprocess and measure one scan (what ``uad detect`` does before the model).

    Never raises for a refused input (see :attr:`InputCheck.refusal`); raises :class:`UserInputError` for a file
    that cannot be read at all."""
    from uad.preprocessing import PreprocessConfig, preprocess

    volume = load_volume(path)
    mask = load_volume(brain_mask, what="brain mask") if brain_mask else None
    try:
        stripping = decide_skull_stripping(volume, skull_stripped, mask is not None)
    except UserInputError as exc:
        return InputCheck(SkullStripping(True, "--skull-stripped", False, 0.0, 0.0, 1.0, str(exc)), refusal=str(exc))
    prep = preprocess(volume, config or PreprocessConfig(), brain_mask=mask, skull_stripped=stripping.skull_stripped)
    try:
        return measure(volume, prep, stripping)
    finally:
        prep.close()
