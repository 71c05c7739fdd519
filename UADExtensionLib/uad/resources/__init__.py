"""Files that ship inside the package: templates, bundled weights and the sample scan (see NOTICE files)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

RESOURCE_DIR = Path(__file__).parent
TEMPLATE_DIR = RESOURCE_DIR / "templates"
WEIGHTS_DIR = RESOURCE_DIR / "weights"
SAMPLE_DIR = RESOURCE_DIR / "sample"

# name -> file; all on preprocessing.REGISTRATION_GRID (2 mm, MNI152 2009a space)
TEMPLATES = {
    "mni_brain": "mni152_2009a_brain_2mm.nii.gz",
    "mni_brainmask": "mni152_2009a_brainmask_2mm.nii.gz",
    "ixi_head": "ixi_head_2mm.nii.gz",
}


@cache
def template_image(name: str):
    """A bundled template as an ANTs image (cached: callers must not modify it)."""
    import ants  # here, not at the top: the Slicer panel reads the catalog before antspyx is installed

    return ants.image_read(str(TEMPLATE_DIR / TEMPLATES[name]))


def sample_scan() -> Path:
    return SAMPLE_DIR / "mslub_patient26_T1.nii.gz"


def sample_lesion_mask() -> Path:
    return SAMPLE_DIR / "mslub_patient26_lesion_mask.nii.gz"
