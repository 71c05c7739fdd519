"""Static checks of the Slicer module that need no Slicer: the .ui matches the code, CMake lists every file.

A widget renamed in Qt Designer, a parameter without a widget, or a new file of the ``uad`` package that the
extension build would silently leave out all fail here instead of in a user's Slicer.
"""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "UADExtension"
MODULE_FILE = MODULE_DIR / "UADExtension.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "UADExtension.ui"
LIB_DIR = ROOT / "UADExtensionLib"
# Parameters the widget synchronises by hand (the model list and the threshold range are only known at run time).
UNBOUND_PARAMETERS = {"model", "threshold"}
QT_CLASSES = {
    "QWidget", "QLabel", "QComboBox", "QCheckBox", "QPushButton", "QProgressBar", "QDoubleSpinBox", "QSpinBox",
    "QPlainTextEdit",
}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text())


def ui_widgets() -> dict[str, ElementTree.Element]:
    return {w.get("name"): w for w in ElementTree.parse(UI_FILE).getroot().iter("widget")}


def cmake_list(cmake_file: Path, variable: str) -> list[str]:
    """Entries of ``set(variable ...)`` with ${MODULE_NAME} expanded."""
    text = cmake_file.read_text()
    module_name = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text).group(1)
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{cmake_file} has no set({variable} ...)"
    entries = [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()]
    return [e.replace("${MODULE_NAME}", module_name) for e in entries if e]


def files_under(folder: Path, relative_to: Path) -> set[str]:
    return {
        p.relative_to(relative_to).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = {
        node.attr
        for node in ast.walk(module_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "found no self.ui.<widget> in the module: did the parsing break?"
    missing = used - set(ui_widgets())
    assert not missing, f"UADExtension.py uses widgets that UADExtension.ui lacks: {sorted(missing)}"


def parameter_node_fields() -> set[str]:
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in UADExtension.py")


def test_every_parameter_is_bound_to_exactly_one_widget():
    bound = []
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.append(prop.find("string").text)
    fields = parameter_node_fields()
    assert len(bound) == len(set(bound)), f"a parameter is bound twice: {sorted(bound)}"
    assert set(bound) <= fields, f"the .ui binds unknown parameters: {sorted(set(bound) - fields)}"
    assert set(bound) == fields - UNBOUND_PARAMETERS, f"parameters without a widget: {sorted(fields - set(bound))}"


def test_ui_declares_every_custom_widget_it_uses():
    root = ElementTree.parse(UI_FILE).getroot()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert used - QT_CLASSES <= declared, f"undeclared custom widgets: {sorted(used - QT_CLASSES - declared)}"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_module_cmake_lists_every_script_and_resource():
    cmake = MODULE_DIR / "CMakeLists.txt"
    scripts = set(cmake_list(cmake, "MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_list(cmake, "MODULE_PYTHON_RESOURCES"))
    assert scripts == {p.name for p in MODULE_DIR.glob("*.py")}
    assert resources == files_under(MODULE_DIR / "Resources", MODULE_DIR)
    text = cmake.read_text()
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_library_cmake_installs_the_whole_uad_package():
    cmake = LIB_DIR / "CMakeLists.txt"
    listed = cmake_list(cmake, "UAD_PYTHON_SCRIPTS") + cmake_list(cmake, "UAD_PYTHON_RESOURCES")
    assert len(listed) == len(set(listed)), "a file is listed twice"
    on_disk = files_under(LIB_DIR / "uad", LIB_DIR)
    missing = sorted(on_disk - set(listed))
    stale = sorted(set(listed) - on_disk)
    assert not missing, "add to UADExtensionLib/CMakeLists.txt:\n  " + "\n  ".join(missing)
    assert not stale, "remove from UADExtensionLib/CMakeLists.txt (no such file):\n  " + "\n  ".join(stale)
    scripts = cmake_list(cmake, "UAD_PYTHON_SCRIPTS")
    assert all(s.endswith(".py") for s in scripts)
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", cmake.read_text(), re.S).group(1)
    assert "WITH_SUBDIR" not in call  # it would install into qt-scripted-modules/UADExtensionLib/uad/


def test_extension_cmake_has_the_metadata_and_both_directories():
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), f"EXTENSION_{key} is missing or empty"
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert text.index("add_subdirectory(UADExtensionLib)") < text.index("add_subdirectory(UADExtension)")
    assert "include(${Slicer_EXTENSION_CPACK})" in text


def test_resource_files_the_module_names_exist():
    """Every os.path.join(RESOURCES_DIR, ...) and self.resourcePath(...) in the module names an existing file."""
    paths = []
    for node in ast.walk(module_tree()):
        if not isinstance(node, ast.Call):
            continue
        from_resources = any(isinstance(a, ast.Name) and a.id == "RESOURCES_DIR" for a in node.args)
        is_resource_path = isinstance(node.func, ast.Attribute) and node.func.attr == "resourcePath"
        if from_resources or is_resource_path:
            parts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            paths.append(Path(*parts))
    assert len(paths) >= 4, f"found only {paths}: did the parsing break?"
    for path in paths:
        assert (MODULE_DIR / "Resources" / path).is_file(), f"UADExtension.py refers to missing Resources/{path}"


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "UADExtension.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_requirements_match_the_backend_and_spare_slicers_packages():
    from uad.mrml import dependencies

    requirements = dependencies.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    assert dependencies.protected_requirements(requirements) == []
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser, from the test extra
        import tomli as tomllib
    project = tomllib.loads((LIB_DIR / "pyproject.toml").read_text())["project"]
    needed = {dependencies.canonical_name(dependencies.requirement_name(r)) for r in project["dependencies"]}
    protected = {dependencies.canonical_name(p) for p in dependencies.PROTECTED_PACKAGES}
    listed = {dependencies.canonical_name(dependencies.requirement_name(r)) for r in requirements}
    assert listed | {dependencies.TORCH} == needed - protected


def test_help_links_to_the_projects_own_documentation():
    """Slicer's default documentation link points at a page Slicer's docs do not have for an extension."""
    source = MODULE_FILE.read_text()
    assert "getDefaultModuleDocumentationLink" not in source
    homepage = re.search(r'^HOMEPAGE = "([^"]+)"', source, re.M).group(1)
    assert f'set(EXTENSION_HOMEPAGE "{homepage}")' in (ROOT / "CMakeLists.txt").read_text()


def test_self_test_runs_a_detection_only_when_asked():
    """ctest runs runTest on the extension build machines: no torch installation, no detection there."""
    functions = {n.name: n for n in ast.walk(module_tree()) if isinstance(n, ast.FunctionDef)}

    def method_calls(tree) -> set[str]:
        return {c.func.attr for c in ast.walk(tree) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}

    run_test = functions["runTest"]
    guarded = set()
    for branch in ast.walk(run_test):
        if isinstance(branch, ast.If) and "FULL_SELF_TEST_VARIABLE" in ast.unparse(branch.test):
            guarded |= method_calls(branch)
    assert "test_PanelOnSampleScan" in method_calls(run_test)
    assert "test_DetectOnSampleScan" in guarded
    assert "ensureDependencies" not in method_calls(functions["test_PanelOnSampleScan"])
