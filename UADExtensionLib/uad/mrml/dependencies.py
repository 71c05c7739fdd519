"""Which Python packages the backend still needs in Slicer's Python, and the guard rails for installing them.

Nothing is installed at import time. The module file asks the user once, installs torch through the PyTorch
extension (only light-the-torch picks the CUDA build matching the driver) and the rest with Slicer's pip helpers,
passing :func:`constraints_text` so pip can never replace a package Slicer itself ships and relies on.
The checks use ``importlib`` metadata and ``find_spec``, never an import: importing torch takes seconds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path

# Slicer's own builds of these (SimpleITK with Slicer's IO, VTK, the numpy Slicer was compiled against) must stay.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "vtk", "requests")
TORCH = "torch"
TORCH_REQUIREMENT = "torch>=2.2"
# Distribution name -> import name where they differ.
IMPORT_NAMES = {"antspyx": "ants", "scikit-image": "skimage", "pyyaml": "yaml"}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements.txt (comments, blank lines and pip options dropped)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_satisfied(requirement: str) -> bool:
    """Installed, importable, and (when ``packaging`` is there to tell) at an acceptable version."""
    name = requirement_name(requirement)
    import_name = IMPORT_NAMES.get(canonical_name(name), name.replace("-", "_"))
    if importlib.util.find_spec(import_name) is None:
        return False
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    specifier = requirement.split(";")[0].strip()[len(name) :].strip()
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True
    return SpecifierSet(specifier).contains(installed, prereleases=True)


def missing_requirements(requirements: list[str]) -> list[str]:
    importlib.invalidate_caches()  # a pip run in a subprocess may have just installed something
    return [requirement for requirement in requirements if not is_satisfied(requirement)]


def protected_requirements(requirements: list[str]) -> list[str]:
    """The requirements that name a package Slicer owns (must be empty for ours; tested)."""
    protected = {canonical_name(name) for name in PROTECTED_PACKAGES}
    return [r for r in requirements if canonical_name(requirement_name(r)) in protected]


def constraints_text(packages: tuple[str, ...] = (*PROTECTED_PACKAGES, TORCH)) -> str:
    """A pip constraints file pinning each installed package of ``packages`` to its installed version."""
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"
