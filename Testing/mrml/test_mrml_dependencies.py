"""What the first Detect would install, and the guard rails that keep Slicer's own packages untouched."""

from __future__ import annotations

import hashlib
import importlib.metadata

import numpy as np

from uad.mrml import dependencies, sample_data


def test_requirements_file_is_read_without_comments_and_options(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n\nmonai>=1.3  # why\n-c constraints.txt\nscikit-image>=0.22; python_version>'3'\n")
    assert dependencies.read_requirements(path) == ["monai>=1.3", "scikit-image>=0.22; python_version>'3'"]


def test_satisfied_means_installed_importable_and_recent_enough():
    numpy_version = importlib.metadata.version("numpy")
    assert dependencies.is_satisfied("numpy")
    assert dependencies.is_satisfied(f"numpy>={numpy_version}")
    assert not dependencies.is_satisfied("numpy>=999")
    assert dependencies.is_satisfied("scikit-image>=0.1")  # import name skimage
    assert not dependencies.is_satisfied("surely-not-an-installed-package-uad>=1")
    assert dependencies.missing_requirements(["numpy>=1", "numpy>=999"]) == ["numpy>=999"]


def test_constraints_pin_slicers_packages_to_what_is_installed():
    lines = dependencies.constraints_text().splitlines()
    assert f"numpy=={np.__version__}" in lines
    assert f"vtk=={importlib.metadata.version('vtk')}" in lines
    assert all(line.split("==")[0] in (*dependencies.PROTECTED_PACKAGES, "torch") for line in lines)
    assert dependencies.protected_requirements(["NumPy>=2", "monai", "simpleitk"]) == ["NumPy>=2", "simpleitk"]


def test_sample_scan_matches_its_registered_checksum():
    source = sample_data.sample_data_source()
    assert source["uris"][0].startswith("file://")
    assert sample_data.SAMPLE_FILE.is_file()
    digest = hashlib.sha256(sample_data.SAMPLE_FILE.read_bytes()).hexdigest()
    assert source["checksums"] == [f"SHA256:{digest}"]
    from uad import resources  # the backend's own idea of where the sample lives

    assert resources.sample_scan().resolve() == sample_data.SAMPLE_FILE.resolve()
