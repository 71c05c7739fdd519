"""Where the default model's false positives lie, and why a rule on CSF-like voxels cannot remove them.

    python tools/locate_false_positives.py --data ../shared/data > Resources/false-positive-sites.txt

Every scan is on the 2 mm working grid (MNI space), segmented with the bundled default model (its members' maps,
fused) at its calibrated threshold and default post-processing. For the clean IXI validation scans, the MASS scans
(another site) and the real T1 lesion cases (their masks resampled onto the grid; diagnostics only, nothing here
is chosen on them) it reports, per scan:

- flagged volume: false positives (all of it on the healthy scans) and, on lesion cases, true positives;
- of each, the CSF-like part (below 35 % of the brain's 99th percentile, the fusion's CSF anchor is 0.2);
- of the CSF-like false positives, how much lies where fewer than 2 % of the healthy training brains are CSF-like
  (CSF where healthy brains have tissue), and how much is thin (gone after opening the scan's CSF-like voxels with
  a 3x3x3 cube: sulci and cisterns rather than a cavity).

Then it scores, on the validation cases of tools/choose_fusion_weights.py, the one rule that could tell such CSF
spaces from lesions by shape: damping the fused map on thin CSF-like voxels. Lesion shapes there are painted
between 30 % and 100 % of the way to CSF, so the score shows what the rule costs on dark lesions.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

# One registration thread, as in `uad evaluate`: the lesion cases are registered here.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

from choose_fusion_weights import SPACING, member_maps, score, training_volumes, validation_cases

from uad.checkpoint import load_checkpoint
from uad.data import find_subjects, load_cached, prepare_cohort, split_subjects
from uad.inference import resolve_checkpoint_path
from uad.io import load_volume
from uad.models.dae import CSF_LIKE
from uad.models.fusion import fuse_maps
from uad.postprocessing import PostprocessConfig, segment_filtered
from uad.preprocessing import preprocess

RARE_CSF = 0.02  # fraction of healthy training brains CSF-like at a voxel, below which CSF there is unusual
LESION_CASES = ("lesion/mslub/patient26", "lesion/tcga/TCGA-DU-7294")  # T1 + lesion_mask, distributed stripped
ML_PER_VOXEL = float(np.prod(SPACING)) / 1000


def thin_csf(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """CSF-like brain voxels that a 3x3x3 opening removes: sheets and strands under ~6 mm thick."""
    csf = (image < CSF_LIKE) & brain
    return csf & ~ndimage.binary_opening(csf, structure=np.ones((3, 3, 3), bool))


def healthy_csf_frequency(volumes: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per voxel, the fraction of healthy brains (having brain there) in which it is CSF-like."""
    csf = ((volumes < CSF_LIKE) & masks).sum(0)
    return csf / np.maximum(masks.sum(0), 1)


def site_volumes(segmentation: np.ndarray, image: np.ndarray, brain: np.ndarray, truth: np.ndarray | None,
                 csf_frequency: np.ndarray) -> dict[str, float]:
    """The volumes (ml) the module docstring lists, for one segmented scan (and its Dice, where it has a lesion)."""
    truth = np.zeros_like(segmentation) if truth is None else truth
    false, true = segmentation & ~truth, segmentation & truth
    csf = (image < CSF_LIKE) & brain
    volumes = {"FP": false, "FP CSF-like": false & csf,
               "FP CSF-like, rare CSF there": false & csf & (csf_frequency < RARE_CSF),
               "FP CSF-like, thin": false & thin_csf(image, brain)}
    if not truth.any():
        return {name: float(voxels.sum() * ML_PER_VOXEL) for name, voxels in volumes.items()}
    volumes |= {"TP": true, "TP CSF-like": true & csf, "lesion": truth & brain, "lesion CSF-like": truth & csf}
    dice = float(2 * true.sum() / (segmentation.sum() + truth.sum()))
    return {name: float(voxels.sum() * ML_PER_VOXEL) for name, voxels in volumes.items()} | {"Dice on the grid": dice}


def lesion_case(folder: Path, preprocessing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, brain, lesion) of a stripped T1 case on the working grid; its mask follows the same transforms."""
    prepared = preprocess(load_volume(folder / "T1.nii.gz"), preprocessing, skull_stripped=True)
    try:
        on_grid = prepared.to_working_grid(load_volume(folder / "lesion_mask.nii.gz").data > 0) > 0.5
    finally:
        prepared.close()
    return prepared.image, prepared.brain_mask, on_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="fusion", help="a bundled fusion model")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "uad"))
    parser.add_argument("--predictions", default=None, help="members' predictions folder, as choose_fusion_weights")
    args = parser.parse_args()
    fusion = load_checkpoint(resolve_checkpoint_path(args.model))
    members = [load_checkpoint(resolve_checkpoint_path(name)) for name in fusion.model.config.members]
    post = PostprocessConfig(**fusion.calibration["postprocessing"])

    def fused(image, brain):
        return fuse_maps(member_maps(members, image, brain, args.predictions), brain, fusion.model.config, image)

    csf_frequency = healthy_csf_frequency(*training_volumes(args.data, args.cache, fusion.preprocessing))
    subjects = find_subjects(args.data / "healthy/ixi_t1")
    split = split_subjects([s.subject_id for s in subjects])
    ixi = prepare_cohort([s for s in subjects if s.subject_id in split.validation], fusion.preprocessing, args.cache)
    mass = prepare_cohort(find_subjects(args.data / "healthy/mass_t1"), fusion.preprocessing, args.cache,
                          skull_stripped=True)
    cohorts = {"IXI validation (healthy)": [(*load_cached(ixi[i]), None) for i in split.validation],
               "MASS (healthy, another site)": [(*load_cached(p), None) for _, p in sorted(mass.items())]}
    for case in LESION_CASES:
        cohorts[f"{case} T1"] = [lesion_case(args.data / case, fusion.preprocessing)]
    print(f"model {args.model} (threshold {post.threshold:.3f}); ml per scan, mean over the scans of each cohort")
    for name, scans in cohorts.items():
        rows = [site_volumes(segment_filtered(fused(image, brain), brain, SPACING, post).astype(bool), image, brain,
                             truth, csf_frequency) for image, brain, truth in scans]
        mean = {key: np.mean([row[key] for row in rows]) for key in rows[0]}
        print(f"{name} ({len(scans)}): " + ", ".join(f"{key} {value:.2f}" for key, value in mean.items()), flush=True)

    cases = [(kind, fused(image, brain), image, truth, brain) for kind, image, truth, brain in
             validation_cases(args.data, args.cache)]
    uncalibrated = replace(post, threshold=0.0)  # score() calibrates a threshold per rule on the clean cases
    for keep in (1.0, 0.5, 0.0):
        filtered = [(kind, np.where(thin_csf(image, brain), f * keep, f), truth, brain)
                    for kind, f, image, truth, brain in cases]
        result = score(filtered, uncalibrated, fusion.calibration["fpr"])
        print(f"validation, fused map x {keep:g} on thin CSF-like voxels: "
              + ", ".join(f"{key} {value:.4f}" for key, value in result.items()), flush=True)


if __name__ == "__main__":
    main()
