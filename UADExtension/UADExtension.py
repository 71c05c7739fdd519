"""UADExtension: find anomalies in brain MRI with models trained on healthy scans only.

This file is the Slicer shell: module metadata, the panel (widget), the Slicer-only glue (dependency
installation, Segment Editor hand-off, sample data) and the self-test. Everything that touches the scene lives
in the Qt-free ``uad.mrml`` package, which is tested outside Slicer with slicer-core.
"""

import contextlib
import enum
import logging
import math
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import replace
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
RESOURCES_DIR = os.path.join(MODULE_DIR, "Resources")
TERMINOLOGY_FILE = os.path.join(RESOURCES_DIR, "SegmentationCategoryTypeModifier-UADExtension.term.json")
REQUIREMENTS_FILE = os.path.join(RESOURCES_DIR, "requirements.txt")
SAMPLE_THUMBNAIL = os.path.join(RESOURCES_DIR, "Icons", "UADSampleMSLesionT1.png")


def _uadPackageParent():
    """The folder holding the ``uad`` package: next to this file once installed, ``../UADExtensionLib`` in a
    source checkout (loaded through Application Settings -> Modules -> Additional module paths)."""
    for candidate in (MODULE_DIR, os.path.join(os.path.dirname(MODULE_DIR), "UADExtensionLib")):
        if os.path.isfile(os.path.join(candidate, "uad", "__init__.py")):
            return candidate
    raise ImportError(f"the uad package was not found next to {MODULE_DIR}; reinstall UADExtension")


# The oldest Slicer this module runs on. The backend needs Python 3.10 or newer (dataclass and zip keywords,
# its dependencies' wheels); Slicer 5.6 and 5.8 ship Python 3.9.10, Slicer 5.10 and 5.12 Python 3.12.10
# (Slicer_REQUIRED_PYTHON_VERSION in Slicer's CMakeLists.txt at those tags). This file itself stays Python 3.9
# (checked by Testing/test_python_versions.py), so an older Slicer shows this reason instead of a traceback.
MINIMUM_SLICER_VERSION = (5, 10)
HOMEPAGE = "https://github.com/UADExtension/UADExtension#readme"


def unsupportedSlicerReason():
    """Why this Slicer cannot run the extension, or "" when it can."""
    version = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if version >= MINIMUM_SLICER_VERSION and sys.version_info >= (3, 10):
        return ""
    return _(
        "Anomaly Detection (UAD) needs 3D Slicer {minimum} or newer; this is Slicer {version} with Python "
        "{python}. Install a current Slicer from https://download.slicer.org and the extension again."
    ).format(
        minimum="{}.{}".format(*MINIMUM_SLICER_VERSION),
        version=slicer.app.applicationVersion,
        python="{}.{}".format(*sys.version_info[:2]),
    )


UNSUPPORTED_REASON = unsupportedSlicerReason()
if UNSUPPORTED_REASON:
    logging.error(UNSUPPORTED_REASON)
else:
    UAD_PACKAGE_PARENT = _uadPackageParent()
    if UAD_PACKAGE_PARENT not in sys.path:
        sys.path.insert(0, UAD_PACKAGE_PARENT)

    from uad.errors import UserInputError
    from uad.mrml import dependencies, nodes, sample_data
    from uad.mrml.logic import DetectionError, DetectionLogic, DetectionRequest, PostprocessSettings
    from uad.mrml.process import State, describe_progress

# How often the panel reads the backend's progress, and how long a slider must rest before re-thresholding.
POLL_INTERVAL_MS = 100
POSTPROCESS_DELAY_MS = 30


#
# Module
#


class UADExtension(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Anomaly Detection (UAD)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["UADExtension developers"]
        self.parent.helpText = _(
            "Finds anomalies (lesions, tumours, anything unlike healthy tissue) in T1-weighted brain MRI with "
            "models trained on healthy scans only. Pick a volume and a model, press Detect, then tune the "
            "threshold: the labelmap and the segmentation follow the slider without running the model again."
        )
        self.parent.helpText += _(' <a href="{url}">Documentation</a>.').format(url=HOMEPAGE)
        if UNSUPPORTED_REASON:
            self.parent.helpText = UNSUPPORTED_REASON
            return
        self.parent.acknowledgementText = _(
            "Sample scan: MSLUB patient 26 (Lesjak et al., Neuroinformatics 2018, CC BY). "
            "Templates: MNI ICBM152 2009a (McConnell Brain Imaging Centre)."
        )
        slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted():
    registerSampleData()
    loadTerminology()


def registerSampleData():
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sample_data.sample_data_source(SAMPLE_THUMBNAIL))


def loadTerminology():
    """Make the "Anomaly" type known to the terminology selector (Segment Editor, Data module)."""
    terminologies = slicer.modules.terminologies.logic()
    if not terminologies.LoadTerminologyFromFile(TERMINOLOGY_FILE):
        logging.warning(f"UADExtension: could not load terminology {TERMINOLOGY_FILE}")


#
# Parameter node
#


class Device(enum.Enum):
    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self):
        return {"auto": _("Auto"), "cuda": _("GPU (CUDA)"), "cpu": _("CPU")}[self.value]


class MaskSize(enum.Enum):
    MM32 = 32
    MM64 = 64

    def label(self):
        return f"{self.value} mm"


class Overlay(enum.Enum):
    ANOMALY_MAP = "anomaly_map"
    RESIDUAL = "residual"
    NONE = "none"

    def label(self):
        return {"anomaly_map": _("Anomaly map"), "residual": _("Residual"), "none": _("None")}[self.value]


@parameterNodeWrapper
class UADExtensionParameterNode:
    """Panel state, saved with the scene. ``model`` and ``threshold`` are synchronised by hand: the model list
    comes from the registry at run time and the threshold slider's range from the anomaly map."""

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    maskSize: MaskSize = MaskSize.MM32
    device: Device = Device.AUTO
    skullStripped: bool = False
    threshold: float = 0.0
    minComponentMm3: Annotated[float, WithinRange(0.0, 100000.0)] = 50.0
    topK: Annotated[int, WithinRange(0, 1000)] = 10
    medianFilter: bool = True
    atroposRefinement: bool = False
    overlay: Overlay = Overlay.ANOMALY_MAP
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6


#
# Widget
#


class UADExtensionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._models = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        if UNSUPPORTED_REASON:
            label = qt.QLabel(UNSUPPORTED_REASON)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UADExtension.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.progressBar.hide()

        self.logic = UADExtensionLogic()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._pollJob)
        self._postprocessTimer = qt.QTimer()
        self._postprocessTimer.setSingleShot(True)
        self._postprocessTimer.setInterval(POSTPROCESS_DELAY_MS)
        self._postprocessTimer.connect("timeout()", self._applyPostprocessing)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.minComponentSpinBox.connect("valueChanged(double)", self._schedulePostprocessing)
        self.ui.topKSpinBox.connect("valueChanged(int)", self._schedulePostprocessing)
        self.ui.medianFilterCheckBox.connect("toggled(bool)", self._schedulePostprocessing)
        self.ui.atroposCheckBox.connect("toggled(bool)", self.onAtroposToggled)
        # Deferred: these slots read the parameter node, which the GUI binding updates after them. "activated" is
        # the user's choice only: the parameter node filling the combo box on entry must not rewrite the views.
        self.ui.overlayComboBox.connect("activated(int)", lambda: qt.QTimer.singleShot(0, self._showOverlay))
        self.ui.overlayOpacitySlider.connect(
            "valueChanged(double)", lambda: qt.QTimer.singleShot(0, self._setOverlayOpacity)
        )
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.findingsTableView.setMRMLScene(slicer.mrmlScene)
        self.ui.findingsTableView.connect("clicked(QModelIndex)", self.onFindingClicked)

        self._populateModels()
        self.initializeParameterNode()

    def cleanup(self):
        if UNSUPPORTED_REASON:
            return
        self._cancelJob()
        self._pollTimer.stop()
        self._postprocessTimer.stop()
        self.removeObservers()
        self.setParameterNode(None)
        self.logic.detection.shutdown()

    def enter(self):
        if not UNSUPPORTED_REASON:
            self.initializeParameterNode()

    def exit(self):
        if not UNSUPPORTED_REASON:
            self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self._cancelJob()
        self.setParameterNode(None)
        self.logic.detection.forget()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node -----------------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if self._parameterNode.model not in self._models and self._models:
            self._selectModel(self.logic.defaultModelName(self._models))
        self._updateThresholdRange()  # a parameter node from a saved scene brings its threshold, not the range
        self._updateGUI()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._updateGUI()

    def _updateGUI(self, caller=None, event=None):
        p = self._parameterNode
        running = self._job is not None
        hasInput = bool(p and p.inputVolume)
        info = self._models.get(p.model) if p else None
        # Without a model list (packages missing), Detect is what installs them.
        self.ui.detectButton.enabled = running or (hasInput and (info is not None or not self._models))
        self.ui.detectButton.text = _("Cancel") if running else _("Detect anomalies")
        for widget in (self.ui.inputsCollapsibleButton, self.ui.postprocessingCollapsibleButton):
            widget.enabled = not running
        self.ui.maskSizeComboBox.enabled = bool(info and info.uses_mask_size)
        if p:
            index = self.ui.modelComboBox.findData(p.model)
            if index != self.ui.modelComboBox.currentIndex:
                wasBlocked = self.ui.modelComboBox.blockSignals(True)
                self.ui.modelComboBox.currentIndex = index
                self.ui.modelComboBox.blockSignals(wasBlocked)
            if abs(self.ui.thresholdSlider.value - p.threshold) > 1e-9:
                wasBlocked = self.ui.thresholdSlider.blockSignals(True)
                self.ui.thresholdSlider.value = p.threshold
                self.ui.thresholdSlider.blockSignals(wasBlocked)
            # Atropos takes seconds: update when the slider is released instead of while it moves.
            self.ui.thresholdSlider.tracking = not p.atroposRefinement
        self.ui.modelDescriptionLabel.text = self._describeModel(info)
        self._updateOutputsSection()

    def _updateOutputsSection(self):
        p = self._parameterNode
        outputs = nodes.find_output_nodes(p.inputVolume) if p and p.inputVolume else None
        self.ui.editInSegmentEditorButton.enabled = outputs is not None and self._job is None
        self.ui.show3DButton.enabled = outputs is not None
        self.ui.show3DButton.setSegmentationNode(outputs.segmentation if outputs else None)
        self.ui.findingsTableView.setMRMLTableNode(outputs.findings if outputs else None)
        self._showSummary(self.logic.detection.summary(p.inputVolume) if outputs else None)
        if outputs is None:
            self.ui.outputsLabel.text = _("No results for this volume yet.")
            self.ui.provenanceLabel.text = ""
            self.ui.deviceUsedLabel.text = ""
            return
        self.ui.outputsLabel.text = _("Results: {names}").format(names=", ".join(n.GetName() for n in outputs.all()))
        provenance = nodes.Provenance.from_attributes(outputs.anomaly_map)
        if provenance:
            self.ui.deviceUsedLabel.text = provenance.device
            self.ui.provenanceLabel.text = _(
                "Made by {model} v{version} (weights SHA-256 {sha}...) on {device}, {date}; threshold {threshold:.4g}."
            ).format(
                model=provenance.model,
                version=provenance.model_version,
                sha=provenance.weights_sha256[:12],
                device=provenance.device,
                date=provenance.date,
                threshold=provenance.threshold,
            )
            if provenance.warnings:  # doubts about the input: shown where the results are described
                self.ui.provenanceLabel.text += "\n" + _("Warning: {warnings}").format(
                    warnings="\n".join(provenance.warnings))

    # --- models -------------------------------------------------------------------------------------------

    def _populateModels(self):
        self._models = self.logic.listModels()
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for name, info in self._models.items():
            self.ui.modelComboBox.addItem(name, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, info.description, qt.Qt.ToolTipRole)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        if not self._models:
            self.ui.modelDescriptionLabel.text = self.logic.modelsUnavailableReason

    def _describeModel(self, info):
        if info is None:
            return self.logic.modelsUnavailableReason if not self._models else ""
        text = f"{info.description} ({info.family})"
        if info.expected_seconds_cpu:
            text += " " + _("Expected time: about {minutes:.0f} min on CPU, much less on a GPU.").format(
                minutes=max(1.0, info.expected_seconds_cpu / 60.0)
            )
        return text

    def _selectModel(self, name):
        """Choosing a model resets the threshold to that model's calibrated value."""
        info = self._models.get(name)
        if info is None or not self._parameterNode:
            return
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.model = name
            self._parameterNode.threshold = float(info.threshold)
            self._updateThresholdRange()
        self._followThreshold()  # results on screen take the new threshold too: slider and segment agree

    def onModelChanged(self, index):
        if index >= 0:
            self._selectModel(self.ui.modelComboBox.itemData(index))

    def onInputChanged(self, node):
        """A volume with results brings back the model and threshold its segmentation was made with."""
        if node is None or not self._parameterNode or not self.logic.detection.has_results(node):
            return
        provenance = nodes.Provenance.from_attributes(nodes.find_output_nodes(node).anomaly_map)
        if provenance:
            if provenance.model in self._models:
                self._selectModel(provenance.model)
            self._parameterNode.threshold = provenance.threshold
        self._updateThresholdRange(node)

    def _updateThresholdRange(self, inputVolume=None):
        """From 0 to the anomaly map's maximum when the input has results, else to 3x the model's threshold."""
        p = self._parameterNode
        inputVolume = inputVolume or (p.inputVolume if p else None)
        info = self._models.get(p.model) if p else None
        low, high = 0.0, max(3.0 * info.threshold, 1e-3) if info else 1.0
        if inputVolume is not None and self.logic.detection.has_results(inputVolume):
            try:
                low, high = self.logic.detection.threshold_range(inputVolume)
            except Exception:  # a map emptied or replaced by hand: keep the model's range
                logging.exception("UADExtension: could not read the anomaly map")
        self._setThresholdRange(low, max(high, p.threshold if p else high))

    def _setThresholdRange(self, low, high):
        """Maps differ in scale between models (0.02 or 150): about a thousand steps over the range, with as
        many decimals as that needs, so the calibrated threshold is not rounded away."""
        decimals = min(6, max(0, 3 - math.floor(math.log10(max(high - low, 1e-6)))))
        wasBlocked = self.ui.thresholdSlider.blockSignals(True)
        self.ui.thresholdSlider.decimals = decimals
        self.ui.thresholdSlider.singleStep = 10.0**-decimals
        self.ui.thresholdSlider.setRange(low, high)
        self.ui.thresholdSlider.blockSignals(wasBlocked)

    # --- detection ----------------------------------------------------------------------------------------

    def onDetectButton(self):
        if self._job is not None:
            self._cancelJob()
            return
        p = self._parameterNode
        try:
            if not self.logic.ensureDependencies(askConfirmation=True):
                return
            if not self._models:
                # The model list could not be read before the packages were there: let the user choose now.
                self._populateModels()
                self.initializeParameterNode()
                self.ui.statusLabel.text = _("Python packages are installed. Choose a model and press Detect.")
                return
            info = self._models.get(p.model)
            if info is None:
                raise UserInputError(_("select a model"))
            request = DetectionRequest(
                model=p.model,
                device=p.device.value,
                mask_size=p.maskSize.value if info.uses_mask_size else None,
                skull_stripped=p.skullStripped,
            )
            self.ui.logTextEdit.clear()
            self._job = self.logic.detection.start(
                p.inputVolume, request, self._postprocessSettings(), on_progress=self._onProgress, on_log=self._log
            )
        except UserInputError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("Anomaly detection"))
            return
        except Exception as exc:
            self._showUnexpectedError(_("Could not start the detection"), exc)
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Starting...")
        self._pollTimer.start()
        self._updateGUI()

    def _onProgress(self, progress):
        self.ui.progressBar.value = int(progress.fraction * self.ui.progressBar.maximum)

    def _log(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def _pollJob(self):
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        state = job.poll()
        if state is State.RUNNING:
            process = job.process
            if process.finished:
                self.ui.statusLabel.text = _("Loading the results...")
            elif process.last_progress:
                self.ui.statusLabel.text = describe_progress(
                    process.last_progress, process.elapsed_seconds, process.seconds_since_progress
                )
            return
        self._pollTimer.stop()
        self._job = None
        self.ui.progressBar.hide()
        try:
            if state is State.CANCELLED:
                self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
            elif state is State.FAILED:
                self.ui.statusLabel.text = _("Failed: {reason}").format(reason=job.process.error_message)
                slicer.util.errorDisplay(
                    job.process.error_message,
                    windowTitle=_("Anomaly detection failed"),
                    detailedText="\n".join(job.process.stderr_tail),
                )
            else:
                with slicer.util.WaitCursor():
                    self.logic.detection.finish(job)
                self.ui.statusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=job.process.elapsed_seconds)
                warnings = job.outputs().report.get("warnings", [])
                if warnings:
                    self.ui.statusLabel.text += " " + _("With {count} warning(s) about the input: {first}").format(
                        count=len(warnings), first=warnings[0])
                self._showNewResults(slicer.mrmlScene.GetNodeByID(job.input_node_id))
        except DetectionError as exc:
            self.ui.statusLabel.text = _("Failed: {reason}").format(reason=exc)
            slicer.util.errorDisplay(str(exc), windowTitle=_("Anomaly detection failed"))
        except Exception as exc:
            self._showUnexpectedError(_("Could not load the results"), exc)
        finally:
            job.cleanup()
            self._updateGUI()

    def _cancelJob(self):
        if self._job is not None:
            self._job.cancel()
            self._pollJob()

    def _showNewResults(self, inputVolume):
        """Show a finished detection, also when it finished while the user was in another module (the panel
        then has no parameter node of its own)."""
        p = self._parameterNode or self.logic.getParameterNode()
        self.logic.detection.show_results(inputVolume, p.overlay.value, p.overlayOpacity)
        if self._parameterNode:
            self._updateThresholdRange()
            self._updateOutputsSection()

    # --- post-processing ----------------------------------------------------------------------------------

    def _postprocessSettings(self):
        p = self._parameterNode
        return PostprocessSettings(
            threshold=float(p.threshold),
            median_filter=p.medianFilter,
            min_component_mm3=float(p.minComponentMm3),
            top_k=int(p.topK),
            refine="atropos" if p.atroposRefinement else "none",
        )

    def onThresholdChanged(self, value):
        if not self._parameterNode:
            return
        self._parameterNode.threshold = value
        self._followThreshold()

    def _followThreshold(self):
        """The overlay follows the threshold at once; the labelmap, segment and findings a moment later."""
        p = self._parameterNode
        if p and p.inputVolume and self.logic.detection.has_results(p.inputVolume):
            self.logic.detection.set_display_threshold(p.inputVolume, p.threshold)
            self._schedulePostprocessing()

    def onAtroposToggled(self, checked):
        try:
            ready = not checked or self.logic.ensureDependencies(askConfirmation=True)
        except Exception as exc:  # a missing extension or a failed installation: say so, keep refinement off
            self.ui.atroposCheckBox.checked = False
            message = str(exc) if isinstance(exc, UserInputError) else _("Could not install Atropos: {reason}").format(
                reason=exc
            )
            slicer.util.errorDisplay(message, windowTitle=_("Anomaly detection"))
            return
        if not ready:
            self.ui.atroposCheckBox.checked = False
            return
        self._schedulePostprocessing()

    def _schedulePostprocessing(self, *unused):
        # Throttle, not debounce: while a slider moves, recompute at most every POSTPROCESS_DELAY_MS.
        if not self._postprocessTimer.isActive():
            self._postprocessTimer.start()

    def _applyPostprocessing(self):
        p = self._parameterNode
        if self._job is not None or not p or not self.logic.detection.has_results(p.inputVolume):
            return
        settings = self._postprocessSettings()
        quick = self.logic.detection.postprocessing_is_quick(p.inputVolume, settings)
        try:
            # A wait cursor on every slider step would flicker; show it only when the update will take a while.
            with contextlib.nullcontext() if quick else slicer.util.WaitCursor():
                summary = self.logic.detection.update_postprocessing(p.inputVolume, settings)
        except UserInputError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("Anomaly detection"))
            return
        except Exception as exc:
            self._showUnexpectedError(_("Could not update the segmentation"), exc)
            return
        self._updateOutputsSection()
        self._showSummary(summary)

    def _showSummary(self, summary):
        if summary is None:
            self.ui.resultSummaryLabel.text = ""
            return
        text = _("{findings} findings, {voxels} voxels flagged ({ml:.2f} ml) at threshold {threshold:.4g}.").format(
            findings=summary.findings, voxels=summary.voxels, ml=summary.volume_ml, threshold=summary.threshold
        )
        if summary.seconds is not None:
            text += " " + _("Updated in {ms:.0f} ms.").format(ms=summary.seconds * 1000)
        self.ui.resultSummaryLabel.text = text

    # --- outputs ------------------------------------------------------------------------------------------

    def _showOverlay(self):
        p = self._parameterNode
        if p and p.inputVolume and self.logic.detection.has_results(p.inputVolume):
            self.logic.detection.show_results(p.inputVolume, p.overlay.value, p.overlayOpacity)

    def _setOverlayOpacity(self):
        p = self._parameterNode
        if p and p.inputVolume:
            self.logic.detection.set_overlay_opacity(p.inputVolume, p.overlayOpacity)

    def onFindingClicked(self, index):
        p = self._parameterNode
        if p and p.inputVolume:
            self.logic.detection.centre_on_finding(p.inputVolume, index.row())

    def onEditInSegmentEditor(self):
        p = self._parameterNode
        outputs = nodes.find_output_nodes(p.inputVolume) if p and p.inputVolume else None
        if outputs is None:
            return
        openInSegmentEditor(outputs.segmentation, p.inputVolume)

    def _showUnexpectedError(self, message, exc):
        logging.error(traceback.format_exc())
        slicer.util.errorDisplay(
            f"{message}: {exc}", windowTitle=_("Anomaly detection"), detailedText=traceback.format_exc()
        )


def openInSegmentEditor(segmentationNode, sourceVolumeNode):
    """Switch to Segment Editor with the anomaly segmentation selected and the input as source volume."""
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.SegmentEditorWidget.editor
    editor.setSegmentationNode(segmentationNode)
    # setSourceVolumeNode replaced setMasterVolumeNode in Slicer 5.4.
    setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
    setSource(sourceVolumeNode)
    editor.setCurrentSegmentID(nodes.ANOMALY_SEGMENT_ID)


#
# Logic
#


def pythonSlicerExecutable():
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    return shutil.which(name) or os.path.join(slicer.app.slicerHome, "bin", name)


def backendEnvironment():
    """Slicer's startup environment plus the ``uad`` package on PYTHONPATH, for the child process only."""
    env = dict(slicer.util.startupEnvironment())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [UAD_PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env


class UADExtensionLogic(ScriptedLoadableModuleLogic):
    """Slicer glue around :class:`uad.mrml.logic.DetectionLogic` (``self.detection``): parameter node,
    model registry, dependency installation."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.detection = DetectionLogic(
            slicer.mrmlScene,
            backend_command=[pythonSlicerExecutable(), "-m", "uad"],
            env=backendEnvironment(),
            terminology=nodes.load_segment_terminology(TERMINOLOGY_FILE),
        )
        self.modelsUnavailableReason = ""

    def getParameterNode(self):
        return UADExtensionParameterNode(super().getParameterNode())

    def listModels(self):
        """name -> ModelInfo from the bundled registry; empty (with a reason) when it cannot be read yet."""
        try:
            from uad import catalog

            models = {info.name: info for info in catalog.list_models()}
        except ImportError as exc:
            self.modelsUnavailableReason = _(
                "The model list needs Python packages that are not installed yet ({name}); "
                "press Detect to install them."
            ).format(name=exc.name)
            return {}
        except Exception as exc:  # a damaged manifest must not stop the module from loading
            logging.exception("UADExtension: could not read the model registry")
            self.modelsUnavailableReason = _("The model registry could not be read: {reason}").format(reason=exc)
            return {}
        self.modelsUnavailableReason = "" if models else _("No bundled models found; reinstall the extension.")
        return models

    @staticmethod
    def defaultModelName(models):
        from uad import catalog

        try:
            name = catalog.default_model_name()
        except UserInputError:
            name = None
        return name if name in models else next(iter(models))

    def ensureDependencies(self, askConfirmation=True):
        """Install what the backend needs, after one confirmation listing every missing package.

        torch comes through the PyTorch extension (it picks the CUDA build for the GPU driver); the rest through
        Slicer's pip helpers with a constraints file that pins numpy, SimpleITK, vtk, requests and torch to the
        installed versions. Returns False when the user declines.
        """
        requirements = [dependencies.TORCH_REQUIREMENT, *dependencies.read_requirements(REQUIREMENTS_FILE)]
        missing = dependencies.missing_requirements(requirements)
        if not missing:
            return True
        torchMissing = [r for r in missing if dependencies.requirement_name(r) == dependencies.TORCH]
        others = [r for r in missing if r not in torchMissing]
        if torchMissing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError as exc:
                raise UserInputError(
                    _("Anomaly detection needs the PyTorch extension: install it from the Extensions Manager, "
                      "restart Slicer and press Detect again.")
                ) from exc
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("Anomaly detection needs Python packages that are not installed yet. Install them now?\n\n"
              "This downloads up to a few GB (PyTorch) and can take several minutes. "
              "Slicer's own numpy, SimpleITK, VTK and requests are not changed."),
            windowTitle=_("Anomaly detection - install Python packages"),
            detailedText="\n".join(missing),
        ):
            return False
        if torchMissing:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=torchMissing[0][len(dependencies.TORCH) :]
            )
            if torch is None:
                raise RuntimeError(_("PyTorch could not be installed; see the Python console for details"))
        if others:
            with tempfile.TemporaryDirectory() as folder:
                constraints = os.path.join(folder, "constraints.txt")
                with open(constraints, "w") as file:
                    file.write(dependencies.constraints_text())
                try:
                    import slicer.packaging as packaging  # Slicer >= 5.11
                except ImportError:
                    packaging = None
                if packaging is not None:
                    packaging.pip_ensure(others, constraints=constraints, prompt_install=False,
                                         requester="UADExtension", skip_in_testing=False)
                else:
                    with slicer.util.WaitCursor():
                        slicer.util.pip_install(["-c", constraints, *others])
        stillMissing = dependencies.missing_requirements(requirements)
        if stillMissing:
            raise RuntimeError(_("still missing after installation: {names}").format(names=", ".join(stillMissing)))
        return True


#
# Test
#


# Set to 1 to add a real detection to the self-test: it installs the Python packages without asking (PyTorch is
# GBs) and runs the default model (minutes on a CPU). Off by default, as in the peers' self-tests, so that the
# extension build machines (ctest py_UADExtension) run only the fast panel test.
FULL_SELF_TEST_VARIABLE = "UADEXTENSION_FULL_SELF_TEST"


class UADExtensionTest(ScriptedLoadableModuleTest):
    """The panel on the bundled sample scan with a stand-in anomaly map made from the sample's lesion mask (no
    torch, no model; seconds), then, with UADEXTENSION_FULL_SELF_TEST=1, a real detection."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if UNSUPPORTED_REASON:
            self.skipTest(UNSUPPORTED_REASON)
        self.setUp()
        self.test_PanelOnSampleScan()
        if os.environ.get(FULL_SELF_TEST_VARIABLE) == "1":
            self.setUp()
            self.test_DetectOnSampleScan()

    def test_PanelOnSampleScan(self):
        import time

        import numpy as np
        from scipy import ndimage  # shipped with Slicer

        from uad.mrml.logic import BackendOutputs

        self.delayDisplay("Loading the sample scan and its lesion mask (bundled, no download)")
        registerSampleData()
        import SampleData

        inputVolume = SampleData.downloadSample(sample_data.SAMPLE_NAME)
        lesionFile = os.path.join(os.path.dirname(str(sample_data.SAMPLE_FILE)), "mslub_patient26_lesion_mask.nii.gz")
        lesionNode = slicer.util.loadLabelVolume(lesionFile, {"show": False})
        lesion = slicer.util.arrayFromVolume(lesionNode) > 0
        slicer.mrmlScene.RemoveNode(lesionNode)
        image = slicer.util.arrayFromVolume(inputVolume).astype(np.float32)
        brain = image > 0  # the sample is skull-stripped
        # A stand-in for a model's map: the lesions, blurred, scaled so the bigger ones peak near 1.
        anomaly = (ndimage.gaussian_filter(lesion.astype(np.float32), 1.0) * brain).astype(np.float32)
        threshold = 0.3
        config = {"threshold": threshold, "median_mm": 0.0, "brain_erosion_mm": 0.0, "min_component_mm3": 0.0,
                  "top_k": 0, "dilation_mm": 0.0, "refine": "none"}
        arrays = {"reconstruction": image, "residual": anomaly, "anomaly_map": anomaly,
                  "brain_mask": brain.astype(np.uint8), "segmentation": (anomaly > threshold).astype(np.uint8)}
        report = {"model": "stand-in", "threshold": threshold, "device": "none", "postprocessing": config}

        self.delayDisplay("Opening the panel")
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        viewsBefore = [(c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()) for c in composites]
        slicer.util.selectModule("UADExtension")
        widget = slicer.modules.UADExtensionWidget
        self.assertEqual([(c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()) for c in composites], viewsBefore)
        widget._parameterNode.inputVolume = inputVolume
        widget._parameterNode.medianFilter = False
        widget._parameterNode.minComponentMm3 = 0.0
        widget._parameterNode.topK = 0
        widget._parameterNode.threshold = threshold

        self.delayDisplay("Loading stand-in results as a finished detection would")
        settings = widget._postprocessSettings()
        outputs = widget.logic.detection.apply_outputs(inputVolume, BackendOutputs(arrays, report), settings)
        widget._showNewResults(inputVolume)
        for composite in composites:
            self.assertEqual(composite.GetForegroundVolumeID(), outputs.anomaly_map.GetID())
        rows = outputs.findings.GetNumberOfRows()
        flagged = int(np.count_nonzero(slicer.util.arrayFromVolume(outputs.labelmap)))
        self.assertGreater(rows, 1, "the sample has several lesions")
        self.assertIn(f"{rows} findings", widget.ui.resultSummaryLabel.text)

        self.delayDisplay("Moving the threshold slider")
        widget.ui.thresholdSlider.value = 0.6
        for _unused in range(50):
            slicer.app.processEvents()
            if nodes.Provenance.from_attributes(outputs.segmentation).threshold == 0.6:
                break
            time.sleep(0.02)
        self.assertAlmostEqual(nodes.Provenance.from_attributes(outputs.segmentation).threshold, 0.6)
        self.assertLess(int(np.count_nonzero(slicer.util.arrayFromVolume(outputs.labelmap))), flagged)
        self.assertLessEqual(outputs.findings.GetNumberOfRows(), rows)

        self.delayDisplay("Centring the views on the first finding")
        self.assertTrue(widget.logic.detection.centre_on_finding(inputVolume, 0))
        table = outputs.findings.GetTable()
        expected = [table.GetValueByName(0, name).ToDouble() for name in ("r", "a", "s")]
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        centre = [red.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
        for a, b in zip(centre, expected):
            self.assertAlmostEqual(a, b, places=3)

        self.delayDisplay("Opening the result in Segment Editor")
        openInSegmentEditor(outputs.segmentation, inputVolume)
        self.assertEqual(slicer.modules.SegmentEditorWidget.editor.segmentationNode(), outputs.segmentation)
        self.delayDisplay("Panel test passed")

    def test_DetectOnSampleScan(self):
        import time

        import numpy as np


        self.delayDisplay("Loading the sample scan through Sample Data")
        registerSampleData()
        import SampleData

        inputVolume = SampleData.downloadSample(sample_data.SAMPLE_NAME)
        self.assertIsNotNone(inputVolume)

        self.delayDisplay("Checking Python packages")
        logic = UADExtensionLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        models = logic.listModels()
        self.assertTrue(models, logic.modelsUnavailableReason)
        info = models[logic.defaultModelName(models)]

        self.delayDisplay(f"Detecting with {info.name} (this takes minutes on a CPU)")
        request = DetectionRequest(
            model=info.name, mask_size=32 if info.uses_mask_size else None, skull_stripped=True
        )
        settings = PostprocessSettings(threshold=info.threshold)
        progress = []
        outputs = logic.detection.run(inputVolume, request, settings, on_progress=progress.append, timeout=3 * 3600)
        nodesAfterRun = slicer.mrmlScene.GetNumberOfNodes()
        self.assertTrue(progress and progress[-1].fraction > 0.5)
        for node in outputs.all()[:-1]:
            self.assertTrue(nodes.same_geometry(node, inputVolume), node.GetName())
        provenance = nodes.Provenance.from_attributes(outputs.segmentation)
        self.assertEqual(provenance.model, info.name)
        self.assertAlmostEqual(provenance.threshold, info.threshold)
        flagged = int(np.count_nonzero(slicer.util.arrayFromVolume(outputs.labelmap)))
        self.assertGreater(flagged, 0, "the MS sample has lesions: something should be flagged")

        self.delayDisplay("Re-thresholding from the cached map")
        logic.detection.update_postprocessing(inputVolume, settings)  # waits for the median filter once
        started = time.perf_counter()
        summary = logic.detection.update_postprocessing(inputVolume, replace(settings, threshold=2 * info.threshold))
        logging.info(f"UADExtension self-test: re-threshold took {time.perf_counter() - started:.3f} s")
        self.assertLessEqual(summary.voxels, flagged)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesAfterRun)

        self.delayDisplay("Opening the result in Segment Editor")
        openInSegmentEditor(outputs.segmentation, inputVolume)
        self.assertEqual(slicer.modules.SegmentEditorWidget.editor.segmentationNode(), outputs.segmentation)
        self.delayDisplay("Test passed")
