"""The Python every file needs, against the Slicer versions the README promises (a static check, no Slicer).

Slicer 5.6 and 5.8 ship Python 3.9.10, Slicer 5.10 and 5.12 Python 3.12.10. The backend (``uad``, run inside
Slicer by PythonSlicer and installed by pip elsewhere) needs Python 3.10, which the oldest supported Slicer
(``MINIMUM_SLICER_VERSION`` in UADExtension.py, 5.10) exceeds. The module file itself must still load on Python
3.9, so that an older Slicer shows its one-line reason instead of a traceback. vermin reads every construct
and standard-library call (``zip(strict=)``, ``dataclasses.field(kw_only=)``...) and names the version each needs.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "UADExtension" / "UADExtension.py"
BACKEND = ROOT / "UADExtensionLib" / "uad"
VERMIN = Path(sys.executable).with_name("vermin")


def vermin(target: str, *paths: Path) -> subprocess.CompletedProcess:
    if not VERMIN.exists():
        pytest.fail("vermin is missing: install the test extra (pip install './UADExtensionLib[test]')")
    command = [str(VERMIN), f"--target={target}-", "--violations", "--no-tips", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def minimum_slicer_version() -> tuple[int, int]:
    for node in ast.walk(ast.parse(MODULE_FILE.read_text())):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MINIMUM_SLICER_VERSION":
            return ast.literal_eval(node.value)
    raise AssertionError("UADExtension.py defines no MINIMUM_SLICER_VERSION")


def test_the_backend_runs_on_python_3_10():
    result = vermin("3.10", BACKEND)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_module_file_loads_on_the_python_of_older_slicers():
    result = vermin("3.9", MODULE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    ast.parse(MODULE_FILE.read_text(), feature_version=(3, 9))


def test_the_check_catches_what_it_is_for(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("pairs = list(zip([1], [2], strict=True))\n")
    assert vermin("3.9", newer).returncode != 0


def test_readme_and_module_name_the_same_oldest_slicer():
    major, minor = minimum_slicer_version()
    readme = (ROOT / "README.md").read_text()
    promised = re.findall(r"3D Slicer (\d+)\.(\d+) or newer", readme)
    assert promised, "the README names no oldest Slicer"
    assert {(int(a), int(b)) for a, b in promised} == {(major, minor)}
