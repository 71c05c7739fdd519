"""Rebuild the bundled registration templates (uad/resources/templates) from ../shared/data.

    python tools/build_templates.py --data ../shared/data

1. MNI152 2009a brain T1 and its brain mask (non-zero region) resampled to the 2 mm registration grid.
2. The IXI head template: training-split IXI heads (bias-corrected, brain-registered to (1), scaled by their
   brain's 99th percentile) averaged on the same grid, so full-head scans can be registered skull to skull.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ants
import numpy as np
from tqdm import tqdm

from uad import resources
from uad.data import find_subjects, split_subjects
from uad.io import load_volume
from uad.preprocessing import REGISTRATION_GRID, PreprocessConfig, normalise_intensity, preprocess


def build_mni(data: Path) -> None:
    reference = REGISTRATION_GRID.reference_image()
    mni = ants.image_read(str(data / "templates/mni152_2009a/t1.nii.gz"))
    brain = ants.resample_image_to_target(mni, reference, interp_type="linear")
    mask = ants.resample_image_to_target((mni > 0).astype("float32"), reference, interp_type="linear") > 0.5
    ants.image_write(brain * mask, str(resources.TEMPLATE_DIR / resources.TEMPLATES["mni_brain"]))
    ants.image_write(mask.astype("uint8"), str(resources.TEMPLATE_DIR / resources.TEMPLATES["mni_brainmask"]))


def build_ixi_head(data: Path, count: int) -> None:
    subjects = find_subjects(data / "healthy/ixi_t1")
    train_ids = set(split_subjects([s.subject_id for s in subjects]).train)
    chosen = [s for s in subjects if s.subject_id in train_ids][:count]
    registration_grid = PreprocessConfig(working_grid=REGISTRATION_GRID)
    total = np.zeros(REGISTRATION_GRID.shape, np.float64)
    for subject in tqdm(chosen, desc="IXI head template"):
        volume = load_volume(subject.image_path)
        prep = preprocess(volume, registration_grid, brain_mask=load_volume(subject.mask_path))
        # preprocess zeroes the skull; warp the whole bias-corrected head with the same transform instead.
        head = ants.apply_transforms(REGISTRATION_GRID.reference_image(), prep.input_reference, prep.transforms).numpy()
        _, scale = normalise_intensity(head, prep.brain_mask, registration_grid)
        total += np.clip(head / scale, 0, 1.5)
        prep.close()
    # Rounded to 1/1000: invisible to registration, and it compresses ten-fold.
    mean = REGISTRATION_GRID.reference_image().new_image_like(np.round(total / len(chosen), 3).astype(np.float32))
    ants.image_write(mean, str(resources.TEMPLATE_DIR / resources.TEMPLATES["ixi_head"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--count", type=int, default=20, help="IXI training subjects averaged into the head template")
    args = parser.parse_args()
    resources.TEMPLATE_DIR.mkdir(parents=True, exist_ok=True)
    build_mni(args.data)
    resources.template_image.cache_clear()
    build_ixi_head(args.data, args.count)


if __name__ == "__main__":
    main()
