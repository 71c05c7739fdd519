"""The bundled sample scan as a Sample Data source: a local file URI plus its SHA-256, no network needed.

Kept free of ``uad.resources`` (which imports ANTs) so the Sample Data module can list the scan before the
backend's dependencies are installed.
"""

from __future__ import annotations

from pathlib import Path

import uad

SAMPLE_NAME = "UADMSLesionT1"
SAMPLE_CATEGORY = "Anomaly detection"
SAMPLE_FILE = Path(uad.__file__).parent / "resources" / "sample" / "mslub_patient26_T1.nii.gz"
# SampleData re-verifies the cached copy against this; a test recomputes it from the file.
SAMPLE_SHA256 = "e813b2805017dcf886da9bb5e6c6c548dfa938c17d49ecd66ea1caabe3794b32"
SAMPLE_NODE_NAME = "MSLUB patient26 T1"


def sample_data_source(thumbnail: str | Path | None = None) -> dict:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``.

    The file type is left to Slicer to infer from ``.nii.gz`` (the argument's name changed between releases).
    """
    return {
        "category": SAMPLE_CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": [SAMPLE_FILE.resolve().as_uri()],
        "fileNames": [SAMPLE_FILE.name],
        "nodeNames": [SAMPLE_NODE_NAME],
        "checksums": [f"SHA256:{SAMPLE_SHA256}"],
        "thumbnailFileName": str(thumbnail) if thumbnail else None,
    }
