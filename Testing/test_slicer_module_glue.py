"""UADExtension.py outside Slicer: imported with stand-ins for Qt and the Slicer-app-only modules, so its
module-level code, the Slicer glue that needs no GUI (dependency installation, the child's environment) and the
panel's slots run here: the slots on a real scene (slicer-core) with stand-in widgets that record what they are
told. Layout and widget bindings are checked statically (test_slicer_module_static.py); the widgets themselves
need the Slicer application (the in-Slicer self-test).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import slicer
import slicer.util

from uad.errors import UserInputError
from uad.mrml import dependencies, nodes

MODULE_FILE = Path(__file__).resolve().parents[1] / "UADExtension" / "UADExtension.py"


def stub_modules(monkeypatch) -> None:
    """The app-only modules UADExtension.py imports, reduced to what its import and the tested code touch."""
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    wrapper.WithinRange = WithinRange

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (Base,), {}))

    class ScriptedLoadableModuleLogic(Base):
        def getParameterNode(self):
            return None

    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic

    for name, module in {
        "qt": types.ModuleType("qt"),
        "slicer.i18n": i18n,
        "slicer.parameterNodeWrapper": wrapper,
        "slicer.ScriptedLoadableModule": scripted,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    app = types.SimpleNamespace(slicerHome="/opt/Slicer", majorVersion=5, minorVersion=10, applicationVersion="5.10.0")
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: {"PATH": "/usr/bin", "PYTHONPATH": "/site"})


def load_module():
    spec = importlib.util.spec_from_file_location("UADExtension", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def module(monkeypatch):
    stub_modules(monkeypatch)
    return load_module()


def test_an_older_slicer_gets_a_reason_instead_of_a_traceback(monkeypatch, caplog):
    stub_modules(monkeypatch)
    monkeypatch.setattr(slicer.app, "minorVersion", 8)
    monkeypatch.setattr(slicer.app, "applicationVersion", "5.8.1")
    monkeypatch.setitem(sys.modules, "uad.mrml.logic", None)  # the backend must not even be imported
    old = load_module()
    assert "5.10 or newer" in old.UNSUPPORTED_REASON and "5.8.1" in old.UNSUPPORTED_REASON
    assert old.UNSUPPORTED_REASON in caplog.text
    assert not hasattr(old, "DetectionLogic")


def test_a_supported_slicer_loads_the_backend(module):
    assert module.UNSUPPORTED_REASON == ""
    assert module.DetectionLogic.__module__ == "uad.mrml.logic"


class Recorder:
    def __init__(self, answer=True):
        self.answer = answer
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.answer


@pytest.fixture
def installers(monkeypatch):
    """Missing: torch and monai (until "installed"); fake PyTorch extension and slicer.packaging."""
    state = {"installed": False}

    def missing(requirements):
        return [] if state["installed"] else [r for r in requirements if r.startswith(("torch", "monai"))]

    monkeypatch.setattr(dependencies, "missing_requirements", missing)
    confirm = Recorder(answer=True)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)

    torch_calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            torch_calls.append(kwargs)
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))

    pip_calls = []

    def pip_ensure(requirements, constraints=None, **kwargs):
        pip_calls.append((list(requirements), Path(constraints).read_text(), kwargs))
        state["installed"] = True

    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    return types.SimpleNamespace(confirm=confirm, torch=torch_calls, pip=pip_calls, state=state)


def test_one_confirmation_then_torch_through_the_extension_and_the_rest_constrained(module, installers):
    logic = module.UADExtensionLogic()
    assert logic.ensureDependencies(askConfirmation=True)

    assert len(installers.confirm.calls) == 1
    detail = installers.confirm.calls[0][1]["detailedText"]
    assert "torch>=2.2" in detail and "monai>=1.3" in detail
    assert installers.torch == [{"askConfirmation": False, "torchVersionRequirement": ">=2.2"}]
    [(requirements, constraints, options)] = installers.pip
    assert requirements == ["monai>=1.3"]
    assert "numpy==" in constraints and "vtk==" in constraints  # Slicer's own packages stay as they are
    assert options["prompt_install"] is False  # the one dialog above was the confirmation


def test_declining_installs_nothing(module, installers):
    installers.confirm.answer = False
    assert module.UADExtensionLogic().ensureDependencies(askConfirmation=True) is False
    assert installers.torch == [] and installers.pip == []


def test_missing_pytorch_extension_is_a_clear_message(module, installers, monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails as if the extension were absent
    with pytest.raises(UserInputError, match="PyTorch extension"):
        module.UADExtensionLogic().ensureDependencies(askConfirmation=True)
    assert installers.confirm.calls == []


def test_older_slicer_falls_back_to_pip_install_with_constraints(module, installers, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.delattr(slicer, "packaging")
    pip_args = []

    def pip_install(args):
        pip_args.append(list(args))
        installers.state["installed"] = True

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)

    class WaitCursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(slicer.util, "WaitCursor", WaitCursor, raising=False)
    assert module.UADExtensionLogic().ensureDependencies(askConfirmation=False)
    [args] = pip_args
    assert args[0] == "-c" and args[2:] == ["monai>=1.3"]


def test_nothing_to_do_when_everything_is_installed(module, installers):
    installers.state["installed"] = True
    assert module.UADExtensionLogic().ensureDependencies(askConfirmation=True)
    assert installers.confirm.calls == [] and installers.torch == [] and installers.pip == []


def test_backend_runs_through_pythonslicer_with_the_package_on_its_path(module):
    logic = module.UADExtensionLogic()
    command = logic.detection.backend_command
    assert command[1:] == ["-m", "uad"] and Path(command[0]).name.startswith("PythonSlicer")
    path = logic.detection.env["PYTHONPATH"].split(os.pathsep)
    assert path[0] == module.UAD_PACKAGE_PARENT and path[1] == "/site"
    assert Path(module.UAD_PACKAGE_PARENT, "uad", "__init__.py").is_file()
    assert "PYTHONPATH" not in os.environ or os.environ["PYTHONPATH"] != logic.detection.env["PYTHONPATH"]


def test_terminology_and_sample_thumbnail_are_found(module):
    logic = module.UADExtensionLogic()
    assert logic.detection.terminology.name == "Anomaly"
    assert Path(module.SAMPLE_THUMBNAIL).is_file()
    assert Path(module.REQUIREMENTS_FILE).is_file()


def test_choice_labels_are_what_the_panel_shows(module):
    assert [d.label() for d in module.Device] == ["Auto", "GPU (CUDA)", "CPU"]
    assert [m.label() for m in module.MaskSize] == ["32 mm", "64 mm"]
    assert [o.value for o in module.Overlay] == ["anomaly_map", "residual", "none"]


# --- the panel's slots, with a stand-in for the Qt widgets and a real scene ---------------------------------


class FakeWidget:
    """Any Qt widget or timer: properties set are kept, methods called are recorded."""

    def __init__(self):
        self.__dict__["calls"] = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def method(*args, **kwargs):
            self.calls.append((name, args))

        return method

    def called(self, name) -> list:
        return [args for called, args in self.calls if called == name]


class FakeParameterNode(types.SimpleNamespace):
    """The panel's parameter node: the fields the slots read, observable like the real wrapper."""

    __hash__ = object.__hash__

    def disconnectGui(self, tag):
        pass


class FakeUi:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        widget = FakeWidget()
        setattr(self, name, widget)
        return widget


@pytest.fixture
def panel(module, monkeypatch, tmp_path):
    """The module's widget on a real scene: volume A with detection results (two findings), volume B without."""
    from mrml.scene_helpers import INPUT_SHAPE, add_slice_views, add_volume
    from mrml.synthetic_outputs import THRESHOLD, write_out_dir

    from conftest import oblique_affine

    scene = slicer.mrmlScene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text), raising=False)

    affine = oblique_affine(origin=(-30.0, 45.0, -20.0))
    rng = np.random.default_rng(0)
    volume_a = add_volume(scene, rng.normal(100, 10, INPUT_SHAPE).astype(np.float32), affine, name="A")
    volume_b = add_volume(scene, rng.normal(100, 10, INPUT_SHAPE).astype(np.float32), affine, name="B")
    views = add_slice_views(scene)

    widget = module.UADExtensionWidget()
    widget.ui = FakeUi()
    widget.ui.thresholdSlider.value = THRESHOLD
    widget.logic = module.UADExtensionLogic()
    widget._pollTimer = FakeWidget()
    widget._postprocessTimer = FakeWidget()
    widget.parent = types.SimpleNamespace(isEntered=True)
    settings = module.PostprocessSettings(threshold=THRESHOLD, min_component_mm3=20.0)
    widget.logic.detection.load_outputs(volume_a, write_out_dir(tmp_path / "out", INPUT_SHAPE, affine), settings)
    parameters = FakeParameterNode(
        inputVolume=volume_a, model="fake-model", threshold=THRESHOLD, medianFilter=True, minComponentMm3=20.0,
        topK=10, atroposRefinement=False, overlay=module.Overlay.ANOMALY_MAP, overlayOpacity=0.6,
    )
    widget._parameterNode = parameters
    yield types.SimpleNamespace(widget=widget, p=parameters, a=volume_a, b=volume_b, views=views, errors=errors,
                                scene=scene)
    widget.logic.detection.shutdown()
    scene.Clear(1)


def test_switching_to_a_volume_without_results_clears_the_outputs_section(panel):
    ui = panel.widget.ui
    panel.widget._updateOutputsSection()
    assert ui.deviceUsedLabel.text == "cpu"
    assert ui.resultSummaryLabel.text.startswith("2 findings")
    panel.p.inputVolume = panel.b
    panel.widget._updateOutputsSection()
    assert ui.deviceUsedLabel.text == "" and ui.resultSummaryLabel.text == "" and ui.provenanceLabel.text == ""
    assert ui.findingsTableView.called("setMRMLTableNode")[-1] == (None,)


def test_a_finished_detection_is_shown_with_its_summary_even_from_another_module(panel, monkeypatch):
    parameters, panel.widget._parameterNode = panel.p, None  # the user is in another module
    monkeypatch.setattr(panel.widget.logic, "getParameterNode", lambda: parameters)
    panel.widget._showNewResults(panel.a)
    outputs = nodes_of(panel.a)
    for view in panel.views:
        assert view.GetBackgroundVolumeID() == panel.a.GetID()
        assert view.GetForegroundVolumeID() == outputs.anomaly_map.GetID()
    panel.widget._parameterNode = parameters  # back in the module
    panel.widget._showNewResults(panel.a)
    assert panel.widget.ui.resultSummaryLabel.text.startswith("2 findings")


def test_choosing_another_model_rethresholds_what_is_shown(panel, monkeypatch):
    info = types.SimpleNamespace(threshold=0.7, name="other", uses_mask_size=False)
    panel.widget._models = {"fake-model": info, "other": info}
    monkeypatch.setattr(slicer.util, "NodeModify", lambda node: contextlib.nullcontext(), raising=False)
    panel.widget._selectModel("other")
    assert panel.p.threshold == 0.7
    assert panel.widget._postprocessTimer.called("start"), "the segmentation was not scheduled to follow the slider"
    panel.widget._applyPostprocessing()  # what the timer does
    outputs = nodes_of(panel.a)
    assert outputs.anomaly_map.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.7)
    assert nodes.Provenance.from_attributes(outputs.segmentation).threshold == pytest.approx(0.7)
    assert panel.widget.ui.resultSummaryLabel.text.startswith("1 findings")


def test_overlay_opacity_leaves_the_users_other_views_alone(panel):
    panel.widget.logic.detection.show_results(panel.a, "anomaly_map", 0.6)
    users_view = panel.views[2]
    users_view.SetForegroundVolumeID(panel.b.GetID())
    users_view.SetForegroundOpacity(0.25)
    panel.p.overlayOpacity = 0.9
    panel.widget._setOverlayOpacity()
    assert [v.GetForegroundOpacity() for v in panel.views] == [0.9, 0.9, 0.25]


def test_entering_the_module_does_not_reshow_the_overlay():
    """The parameter node fills the overlay combo box on entry: only the user's choice ("activated") may show."""
    import ast

    tree = ast.parse(MODULE_FILE.read_text())
    signals = [
        call.args[0].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "connect"
        and isinstance(call.func.value, ast.Attribute) and call.func.value.attr == "overlayComboBox"
    ]
    assert signals == ["activated(int)"]


def test_an_atropos_installation_error_is_a_message_not_a_traceback(panel, monkeypatch):
    def fail(askConfirmation=True):
        raise RuntimeError("pip failed")

    monkeypatch.setattr(panel.widget.logic, "ensureDependencies", fail)
    panel.widget.onAtroposToggled(True)
    assert panel.widget.ui.atroposCheckBox.checked is False
    assert panel.errors and "pip failed" in panel.errors[0]


def test_clicking_a_finding_centres_the_views_on_it(panel):
    red = panel.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetOrientationToAxial()
    table = nodes_of(panel.a).findings.GetTable()
    panel.widget.onFindingClicked(types.SimpleNamespace(row=lambda: 1))
    expected = [table.GetValueByName(1, name).ToDouble() for name in ("r", "a", "s")]
    assert slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())[:3, 3] == pytest.approx(expected, abs=1e-3)


def test_closing_the_module_stops_its_timers_and_threads(panel):
    import threading

    panel.widget.cleanup()
    assert panel.widget._pollTimer.called("stop") and panel.widget._postprocessTimer.called("stop")
    deadline = time.perf_counter() + 10
    while any(t.name.startswith("uad-") for t in threading.enumerate()) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("uad-")]


def nodes_of(volume):
    return nodes.find_output_nodes(volume)


@pytest.mark.parametrize("atropos", [True, False])
def test_the_panels_controls_become_the_backends_settings(module, atropos):
    """The widget's slot that reads the panel (the parameter node) into post-processing settings: every control,
    the Atropos checkbox included, reaches the settings and the ``uad detect`` arguments."""
    from uad.mrml.logic import DetectionRequest, detect_arguments

    widget = module.UADExtensionWidget.__new__(module.UADExtensionWidget)
    widget._parameterNode = types.SimpleNamespace(threshold=1.75, medianFilter=False, minComponentMm3=120.0, topK=3,
                                                  atroposRefinement=atropos)
    settings = widget._postprocessSettings()
    assert settings.threshold == 1.75 and settings.median_filter is False
    assert settings.min_component_mm3 == 120.0 and settings.top_k == 3
    assert settings.refine == ("atropos" if atropos else "none")
    args = detect_arguments(DetectionRequest(model="intensity", device="cpu"), settings, "in.nii.gz", "out")
    assert args[args.index("--refine") + 1] == settings.refine
    assert args[args.index("--threshold") + 1] == "1.75" and args[args.index("--median-mm") + 1] == "0"


class Timer:
    """qt.QTimer, reduced to what the throttle uses."""

    def __init__(self):
        self.starts = 0

    def isActive(self):
        return False

    def start(self):
        self.starts += 1


def bare_widget(module, **parameters):
    widget = module.UADExtensionWidget.__new__(module.UADExtensionWidget)
    widget._parameterNode = types.SimpleNamespace(**{"threshold": 1.0, "medianFilter": True, "minComponentMm3": 50.0,
                                                     "topK": 10, "atroposRefinement": False, "inputVolume": None,
                                                     **parameters})
    widget._postprocessTimer = Timer()
    widget._job = None
    return widget


@pytest.mark.parametrize("installed", [True, False])
def test_ticking_atropos_needs_its_dependencies_or_unticks_itself(module, installed):
    widget = bare_widget(module)
    asked = Recorder(answer=installed)
    widget.logic = types.SimpleNamespace(ensureDependencies=asked)
    widget.ui = types.SimpleNamespace(atroposCheckBox=types.SimpleNamespace(checked=True))
    widget.onAtroposToggled(True)
    assert asked.calls == [((), {"askConfirmation": True})]
    assert widget.ui.atroposCheckBox.checked is installed
    assert widget._postprocessTimer.starts == (1 if installed else 0)
    widget.onAtroposToggled(False)  # unticking asks nothing and recomputes
    assert len(asked.calls) == 1 and widget._postprocessTimer.starts == (2 if installed else 1)


def test_moving_the_threshold_updates_the_overlay_at_once_and_the_segmentation_soon(module):
    volume = object()
    widget = bare_widget(module, inputVolume=volume)
    shown = []
    widget.logic = types.SimpleNamespace(detection=types.SimpleNamespace(
        has_results=lambda node: node is volume, set_display_threshold=lambda node, value: shown.append((node, value))))
    widget.onThresholdChanged(2.5)
    assert widget._parameterNode.threshold == 2.5 and shown == [(volume, 2.5)]
    assert widget._postprocessTimer.starts == 1


def test_applying_postprocessing_sends_the_panels_settings_to_the_logic(module, monkeypatch):
    volume = object()
    widget = bare_widget(module, inputVolume=volume, threshold=0.8, topK=2, atroposRefinement=True)
    updates = []
    summary = types.SimpleNamespace(findings=3, voxels=12, volume_ml=0.096, threshold=0.8, seconds=0.05)
    widget.logic = types.SimpleNamespace(detection=types.SimpleNamespace(
        has_results=lambda node: node is volume,
        postprocessing_is_quick=lambda node, settings: True,
        update_postprocessing=lambda node, settings: updates.append(settings) or summary))
    widget.ui = types.SimpleNamespace(resultSummaryLabel=types.SimpleNamespace(text=""))
    monkeypatch.setattr(widget, "_updateOutputsSection", lambda: None)
    widget._applyPostprocessing()
    [settings] = updates
    assert (settings.threshold, settings.top_k, settings.refine) == (0.8, 2, "atropos")
    assert widget.ui.resultSummaryLabel.text == ("3 findings, 12 voxels flagged (0.10 ml) at threshold 0.8. "
                                                 "Updated in 50 ms.")
    widget._job = object()  # while a detection runs, nothing is recomputed
    widget._applyPostprocessing()
    assert len(updates) == 1
