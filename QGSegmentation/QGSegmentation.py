"""QGSegmentation: quality-guided semi-supervised segmentation inside 3D Slicer.

Qt glue only. The substance lives in the backend package `QGSegmentationLib`, shipped next to
this file: `QGSegmentationLib.slicer` (scene I/O, job folders, worker runner, review model, panel
state machine, dependency checks; Qt-free and unit-tested without Slicer) and the `qgseg` worker
that trains and segments in a child process (PythonSlicer), so the GUI never freezes and torch is
never imported into Slicer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
from typing import Callable, List, Optional

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def backend_parent(module_dir: str) -> str:
    """The folder holding the backend package QGSegmentationLib: this file's own folder in a built
    extension (CMake ships the package next to it), the checkout's root when Slicer loads the
    module from a source checkout (`<checkout>/QGSegmentation` as an additional module path)."""
    for folder in (module_dir, os.path.dirname(module_dir)):
        if os.path.isdir(os.path.join(folder, "QGSegmentationLib")):
            return folder
    return module_dir


MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_PARENT = backend_parent(MODULE_DIR)
if LIBRARY_PARENT not in sys.path:
    sys.path.insert(0, LIBRARY_PARENT)

from QGSegmentationLib.slicer import elsewhere, environment, jobs, pipeline, scene_io  # noqa: E402
from QGSegmentationLib.slicer.review import (FILTERS, ORDERS, ReviewModel, ReviewRow, Thresholds,  # noqa: E402
                                             read_scores_and_second_opinions)
from QGSegmentationLib.slicer.runner import (DEFAULT_GRACE_S, SHUTDOWN_GRACE_S, WorkerRunner,  # noqa: E402
                                             python_slicer_executable, worker_command,
                                             worker_environment)
from QGSegmentationLib.slicer.signal import Signal  # noqa: E402
from QGSegmentationLib.slicer.state import PanelInputs, PanelStateMachine, RunState  # noqa: E402

POLL_INTERVAL_MS = 500
UNRESPONSIVE_AFTER_S = 120.0
LOG_MAX_LINES = 500
OUTPUT_FOLDER_SETTING = "QGSegmentation/OutputFolder"  # a user preference, not scene state
ROLE_CHOICES = ("labeled", "unlabeled", "ignore")
CASE_COLUMNS = ("Use", "Volume", "Role", "Reference segmentation")
PREPARE_TOOLTIP = ("Write this Train job's folder without starting it, to run on another machine (a GPU "
                   "server) with `qgseg job run FOLDER`; then Import finished run")
REVIEW_COLUMNS = ("Case", "Quality", "2nd opinion", "Status", "Comment")


#
# Module
#
class QGSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "QG Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["QGSegmentation developers"]
        self.parent.helpText = (
            "Train a segmentation model from a few labeled volumes plus many unlabeled ones, "
            "guided by a quality predictor that estimates the Dice of every predicted "
            "segmentation. Then review the results worst-first: approve, flag or edit them. "
            "Training and inference run in a separate process; the run folder keeps inputs, "
            "events, checkpoints, predictions and scores. "
            "See <a href='https://github.com/QGSegmentation/SlicerQGSegmentation'>the documentation</a>.")
        self.parent.acknowledgementText = (
            "Built on 3D Slicer, PyTorch (through the SlicerPyTorch extension) and MONAI. "
            "Patterns from SlicerMONAIAuto3DSeg, SlicerNNUnet and SlicerTotalSegmentator.")


#
# Parameter node (saved with the scene; widgets bind through their SlicerParameterName)
#
@parameterNodeWrapper
class QGSegmentationParameterNode:
    architecture: str = "unet"
    sslMethod: str = "mt"
    guidanceQAR: bool = True
    guidanceQW: bool = True
    mode: str = "3d"
    device: str = "auto"
    targetSpacing: float = 0.0  # 0: auto
    iterations: int = 2000
    batchSize: int = 2
    patchSize: int = 0  # 0: auto
    seed: int = 0
    mirror: bool = True
    trainSecondOpinion: bool = False
    qualitySeeds: int = 1
    segmenterSeeds: int = 1
    lowThreshold: float = 0.7
    highThreshold: float = 0.85


def training_options_from(parameters) -> jobs.TrainingOptions:
    return jobs.TrainingOptions(
        architecture=parameters.architecture, ssl_method=parameters.sslMethod,
        guidance_qar=parameters.guidanceQAR, guidance_qw=parameters.guidanceQW,
        mode=parameters.mode, target_spacing=parameters.targetSpacing,
        iterations=parameters.iterations, batch_size=parameters.batchSize,
        patch_size=parameters.patchSize, seed=parameters.seed, device=parameters.device,
        mirror=parameters.mirror, train_second_opinion=parameters.trainSecondOpinion,
        quality_seeds=parameters.qualitySeeds, segmenter_seeds=parameters.segmenterSeeds)


def handler(message: str, wait_cursor: bool = False) -> Callable:
    """Wrap a widget slot in slicer.util.tryWithErrorDisplay: a failing handler shows one error
    box (with the exception text) instead of a silent traceback in the Python console."""
    def decorate(function):
        @functools.wraps(function)
        def wrapped(self, *args, **kwargs):
            with slicer.util.tryWithErrorDisplay(message, waitCursor=wait_cursor):
                return function(self, *args, **kwargs)
        return wrapped
    return decorate


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


#
# Widget
#
class QGSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Cases, Training, Run, Review, Models, Environment (top to bottom)."""

    def __init__(self, parent=None, logic=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic  # tests inject a logic with a fake runner factory
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._refreshTimer = None
        self._askedUnresponsive = False
        self._currentReviewCase = None
        self._stageLine = pipeline.StageLine()
        self._deviceInfo = None
        self._shortcuts = []

    # --- setup -----------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/QGSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = QGSegmentationLogic()

        self._fillChoices()
        self._setupTables()
        self.ui.logTextEdit.setMaximumBlockCount(LOG_MAX_LINES)
        self.ui.advancedCollapsibleButton.collapsed = True
        self.ui.environmentCollapsibleButton.collapsed = True

        self.ui.selectAllButton.connect("clicked(bool)", self.onSelectAll)
        self.ui.selectNoneButton.connect("clicked(bool)", self.onSelectNone)
        self.ui.refreshCasesButton.connect("clicked(bool)", self.onRefreshCases)
        self.ui.casesTable.connect("itemChanged(QTableWidgetItem*)", self.onCaseItemChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onPrimaryButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentSelected)
        self.ui.openRunFolderButton.connect("clicked(bool)", self.onOpenRunFolder)
        self.ui.prepareElsewhereButton.connect("clicked(bool)", self.onPrepareElsewhere)
        self.ui.importRunButton.connect("clicked(bool)", self.onImportRun)
        self.ui.reviewTable.connect("itemSelectionChanged()", self.onReviewSelectionChanged)
        self.ui.reviewFilterComboBox.connect("currentIndexChanged(int)", self.onReviewFilterChanged)
        self.ui.reviewOrderComboBox.connect("currentIndexChanged(int)", self.onReviewOrderChanged)
        self.ui.approveButton.connect("clicked(bool)", self.onApprove)
        self.ui.flagButton.connect("clicked(bool)", self.onFlag)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.nextUnreviewedButton.connect("clicked(bool)", self.onNextUnreviewed)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.useApprovedButton.connect("clicked(bool)", self.onUseApproved)
        self.ui.lowThresholdSpinBox.connect("valueChanged(double)", self.onThresholdsChanged)
        self.ui.highThresholdSpinBox.connect("valueChanged(double)", self.onThresholdsChanged)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.checkEnvironmentButton.connect("clicked(bool)", self.onCheckEnvironment)
        self.ui.copyDiagnosticsButton.connect("clicked(bool)", self.onCopyDiagnostics)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onReinstallDependencies)
        self.ui.outputFolderPathLineEdit.currentPath = qt.QSettings().value(OUTPUT_FOLDER_SETTING, "")
        self.ui.outputFolderPathLineEdit.connect("currentPathChanged(QString)", self.onOutputFolderChanged)

        for key, slot in (("A", self.onApprove), ("F", self.onFlag), ("E", self.onEdit),
                          ("N", self.onNextUnreviewed)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), self.ui.reviewCollapsibleButton)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setSingleShot(True)
        self._refreshTimer.setInterval(300)
        self._refreshTimer.connect("timeout()", self.refreshCases)

        self.logic.state.changed.connect(self._onStateChanged)
        self.logic.runEvent.connect(self._onRunEvent)
        self.logic.message.connect(self._appendLog)
        self.logic.review.changed.connect(self._onReviewChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)

        self.initializeParameterNode()
        self.refreshCases()
        self.logic.loadReviewFromScene(slicer.mrmlScene)
        self._showEnvironment(probe=False)
        self.updateControls()

    def _fillChoices(self):
        self.ui.architectureComboBox.addItems(list(jobs.ARCHITECTURES))
        self.ui.sslMethodComboBox.addItems(list(jobs.SSL_METHODS))
        self.ui.modeComboBox.addItems(list(jobs.MODES))
        self.ui.deviceComboBox.addItems(list(jobs.DEVICES))
        self.ui.reviewFilterComboBox.addItems(list(FILTERS))
        self.ui.reviewOrderComboBox.addItems(list(ORDERS))

    def _setupTables(self):
        table = self.ui.casesTable
        table.setColumnCount(len(CASE_COLUMNS))
        table.setHorizontalHeaderLabels(list(CASE_COLUMNS))
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().setVisible(False)
        review = self.ui.reviewTable
        review.setColumnCount(len(REVIEW_COLUMNS))
        review.setHorizontalHeaderLabels(list(REVIEW_COLUMNS))
        review.horizontalHeader().setStretchLastSection(True)
        review.verticalHeader().setVisible(False)
        review.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        review.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        review.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)

    def cleanup(self):
        self.removeObservers()
        if self._pollTimer:
            self._pollTimer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.logic.detachFromScene()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.logic.review.replace_rows([])
        self.refreshCases()

    @handler("Failed to read the review table of the loaded scene.")
    def onSceneEndImport(self, caller, event):
        """A scene (.mrb/.mrml) was loaded or added while the module is open: its review table
        (saved with it) fills the Review section, its volumes the Cases table."""
        self.logic.loadReviewFromScene(slicer.mrmlScene)
        self.refreshCases()

    def onSceneNodesChanged(self, caller, event):
        self._refreshTimer.start()  # debounce: loading a scene adds many nodes at once

    # --- parameter node ----------------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updatePlanHint)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updatePlanHint)
            self.updatePlanHint()

    # --- Cases section -------------------------------------------------------------------------------
    def refreshCases(self):
        """Rebuild the Cases table from the scene's single-component scalar volumes, keeping each
        row's choices."""
        table = self.ui.casesTable
        previous = {row["volume_id"]: row for row in self._caseRows()}
        volumes = scene_io.case_volumes(slicer.mrmlScene)  # single-component scalar volumes only
        table.blockSignals(True)
        table.setRowCount(len(volumes))
        for row, volume in enumerate(volumes):
            old = previous.get(volume.GetID(), {})
            use = qt.QTableWidgetItem()
            use.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            use.setCheckState(qt.Qt.Checked if old.get("use", True) else qt.Qt.Unchecked)
            table.setItem(row, 0, use)
            name = qt.QTableWidgetItem(volume.GetName())
            name.setData(qt.Qt.UserRole, volume.GetID())
            name.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            table.setItem(row, 1, name)
            role = qt.QComboBox()
            role.addItems(list(ROLE_CHOICES))
            reference = slicer.qMRMLNodeComboBox()
            reference.nodeTypes = ["vtkMRMLSegmentationNode"]
            reference.noneEnabled = True
            reference.addEnabled = False
            reference.removeEnabled = False
            reference.setMRMLScene(slicer.mrmlScene)
            guess = old.get("segmentation_id") or self.logic.guessReference(volume)
            reference.setCurrentNodeID(guess or "")
            role.setCurrentText(old.get("role") or ("labeled" if guess else "unlabeled"))
            role.connect("currentIndexChanged(int)", self.updateControls)
            reference.connect("currentNodeChanged(vtkMRMLNode*)", self.updateControls)
            table.setCellWidget(row, 2, role)
            table.setCellWidget(row, 3, reference)
        table.blockSignals(False)
        table.resizeColumnsToContents()
        self.updateControls()

    def _caseRows(self) -> List[dict]:
        table = self.ui.casesTable
        rows = []
        for row in range(table.rowCount):
            name = table.item(row, 1)
            if name is None:
                continue
            role = table.cellWidget(row, 2)
            reference = table.cellWidget(row, 3)
            rows.append({
                "use": table.item(row, 0).checkState() == qt.Qt.Checked,
                "volume_id": name.data(qt.Qt.UserRole),
                "volume_name": name.text(),
                "role": role.currentText if role else "unlabeled",
                "segmentation_id": reference.currentNodeID if reference and reference.currentNodeID else "",
            })
        return rows

    def selectedCases(self) -> List[jobs.CaseEntry]:
        rows = [r for r in self._caseRows() if r["use"] and r["role"] != "ignore"]
        ids = jobs.make_case_ids([r["volume_name"] for r in rows])
        return [jobs.CaseEntry(case=i, volume_id=r["volume_id"], volume_name=r["volume_name"],
                               role=r["role"], segmentation_id=r["segmentation_id"] if r["role"] == "labeled" else "")
                for i, r in zip(ids, rows)]

    @handler("Failed to update the selection.")
    def onSelectAll(self, _=None):
        self._setAllChecked(qt.Qt.Checked)

    @handler("Failed to update the selection.")
    def onSelectNone(self, _=None):
        self._setAllChecked(qt.Qt.Unchecked)

    def _setAllChecked(self, state):
        table = self.ui.casesTable
        for row in range(table.rowCount):
            table.item(row, 0).setCheckState(state)
        self.updateControls()

    @handler("Failed to refresh the cases.")
    def onRefreshCases(self, _=None):
        self.refreshCases()

    def onOutputFolderChanged(self, path):
        qt.QSettings().setValue(OUTPUT_FOLDER_SETTING, path)
        self.updateControls()

    def onCaseItemChanged(self, item):
        self.updateControls()

    def panelInputs(self) -> PanelInputs:
        cases = self.selectedCases()
        labeled = [c for c in cases if c.role == "labeled"]
        dependencies_ok, message = self.logic.dependencySummary()
        return PanelInputs(
            n_labeled=len(labeled),
            n_labeled_without_reference=sum(1 for c in labeled if not c.segmentation_id),
            n_unlabeled=sum(1 for c in cases if c.role == "unlabeled"),
            n_selected=len(cases), has_model=self.logic.checkpoint is not None,
            output_folder=self.ui.outputFolderPathLineEdit.currentPath,
            dependencies_ok=dependencies_ok, dependencies_message=message)

    # --- controls from the state machine -------------------------------------------------------------
    def updateControls(self, *_):
        if not hasattr(self, "ui") or self.logic is None:
            return
        inputs = self.panelInputs()
        controls = self.logic.state.controls(inputs)
        self.ui.trainButton.text = controls.primary_text
        self.ui.trainButton.enabled = controls.primary_enabled
        self.ui.trainButton.toolTip = controls.primary_tooltip
        self.ui.segmentButton.enabled = controls.segment_enabled
        self.ui.segmentButton.toolTip = controls.segment_tooltip
        for section in (self.ui.casesCollapsibleButton, self.ui.trainingCollapsibleButton,
                        self.ui.modelsCollapsibleButton, self.ui.environmentCollapsibleButton):
            section.enabled = controls.inputs_enabled
        for button in (self.ui.approveButton, self.ui.flagButton, self.ui.editButton,
                       self.ui.nextUnreviewedButton):
            button.enabled = controls.review_enabled and self._currentReviewCase is not None
        self.ui.exportCsvButton.enabled = len(self.logic.review) > 0
        self.updatePlanHint()
        self.ui.useApprovedButton.enabled = controls.inputs_enabled and bool(self.logic.review.approved_references())
        self.ui.statusLabel.text = controls.state_label
        self.ui.progressBar.visible = controls.progress_visible
        self.ui.openRunFolderButton.enabled = self.logic.job is not None
        self.ui.prepareElsewhereButton.enabled = controls.inputs_enabled and controls.primary_enabled
        self.ui.prepareElsewhereButton.toolTip = (PREPARE_TOOLTIP if controls.primary_enabled
                                                  else controls.primary_tooltip)
        self.ui.importRunButton.enabled = controls.inputs_enabled
        self.ui.casesCountLabel.text = (f"{inputs.n_labeled} labeled, {inputs.n_unlabeled} unlabeled, "
                                        f"{inputs.n_selected} selected")
        self.ui.modelLabel.text = (f"Model: {self.logic.checkpoint}" if self.logic.checkpoint
                                   else "No model yet")

    def _onStateChanged(self, old, new):
        if new in (RunState.PREPARING, RunState.TRAINING, RunState.PREDICTING, RunState.CANCELLING):
            if not self._pollTimer.isActive():
                self._pollTimer.start()
        if new in (RunState.IDLE, RunState.FAILED):
            self._pollTimer.stop()
            self._askedUnresponsive = False
            if new is RunState.FAILED and self.logic.state.failure_message:
                self._appendLog("ERROR: " + self.logic.state.failure_message)
        self.updateControls()

    # --- Run section -----------------------------------------------------------------------------------
    @handler("Failed to start or cancel the run.", wait_cursor=True)
    def onPrimaryButton(self, _=None):
        if self.logic.running:
            if self.confirmCancel():  # one click too many must not end hours of training
                self.logic.cancel()
            return
        if not self.ensureDependencies():
            return
        self.ui.logTextEdit.clear()
        options = training_options_from(self._parameterNode)
        options.second_opinion = self.ui.secondOpinionPathLineEdit.currentPath
        self.logic.startTraining(slicer.mrmlScene, self.selectedCases(), options,
                                 self.ui.outputFolderPathLineEdit.currentPath)

    @handler("Failed to start segmenting.", wait_cursor=True)
    def onSegmentSelected(self, _=None):
        if not self.ensureDependencies():
            return
        self.ui.logTextEdit.clear()
        cases = [jobs.CaseEntry(c.case, c.volume_id, c.volume_name, "unlabeled")
                 for c in self.selectedCases()]
        self.logic.startSegmenting(slicer.mrmlScene, cases, self._parameterNode.device,
                                   self.ui.outputFolderPathLineEdit.currentPath,
                                   mirror=self._parameterNode.mirror,
                                   second_opinion=self.ui.secondOpinionPathLineEdit.currentPath)

    def confirmCancel(self) -> bool:
        """Asks before the primary button cancels (the in-Slicer tests replace this)."""
        return slicer.util.confirmOkCancelDisplay(
            "Cancel this run? The worker stops after its current step; nothing from the run is "
            "imported, and the current model stays as it was.", windowTitle="Cancel the run")

    def onPollTimer(self):
        with slicer.util.tryWithErrorDisplay("Failed while following the run."):
            try:
                self.logic.poll(slicer.mrmlScene)
            except Exception:
                self._pollTimer.stop()
                raise
            if self.logic.isUnresponsive(UNRESPONSIVE_AFTER_S) and not self._askedUnresponsive:
                self._askedUnresponsive = True
                self._pollTimer.stop()
                kill = slicer.util.confirmYesNoDisplay(
                    f"The worker has reported nothing for {UNRESPONSIVE_AFTER_S:.0f} seconds.\n\n"
                    "Kill it (Yes) or keep waiting (No)?", windowTitle="Worker unresponsive")
                if kill:
                    runner = self.logic.runner
                    self.logic.poll(slicer.mrmlScene)  # it may have finished while the question was open
                    if self.logic.runner is runner and self.logic.running:  # not the next stage's worker
                        self.logic.kill()
                else:
                    self.logic.keepWaiting()
                    self._askedUnresponsive = False
                if self.logic.running:
                    self._pollTimer.start()

    def _onRunEvent(self, event):
        kind = event["event"]
        line = self._stageLine.update(event)  # "Stage k/n: <stage> - <the worker's step>"
        if line is not None:
            self.ui.stageLabel.text = line
        if kind == "stage":
            self._appendLog(line or self._stageLine.text)
        elif kind == "progress":
            total = max(int(event["total"]), 1)
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = min(int(event["step"]), total)
            epoch = f"epoch {event['epoch']}  " if event.get("epoch") is not None else ""
            eta = format_eta(event.get("eta_s"))
            self.ui.etaLabel.text = epoch + (f"ETA {eta}" if eta else "")
        elif kind == "metric":
            split = f"{event['split']} " if event.get("split") else ""
            self.ui.metricLabel.text = f"{split}{event['name']}: {float(event['value']):.4f}"
            if event.get("split") == "validation":
                self._appendLog(f"{split}{event['name']} = {float(event['value']):.4f}")
        elif kind == "case_done":
            self._appendLog(f"done: {event['case']}")
        elif kind == "note":
            self._appendLog(event["message"])
        elif kind == "warning":
            self._appendLog("WARNING: " + event["message"])
        elif kind == "error":
            self._appendLog(f"ERROR ({event['kind']}): {event['message']}")
        elif kind == "start":
            self._appendLog(f"worker started (pid {event.get('pid')})")

    def updatePlanHint(self, *_):
        """Advanced section: what auto spacing / patch size become for the labeled volumes."""
        if not hasattr(self, "ui") or self._parameterNode is None:
            return
        labeled = [case.volume_id for case in self.selectedCases() if case.role == "labeled"]
        fingerprint = scene_io.volumes_fingerprint(slicer.mrmlScene, labeled)
        gpu = self._deviceInfo.cuda_available if self._deviceInfo is not None else None
        self.ui.planHintLabel.text = jobs.plan_hint(training_options_from(self._parameterNode), fingerprint, gpu)

    def _appendLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    @handler("Failed to open the run folder.")
    def onOpenRunFolder(self, _=None):
        if self.logic.job is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.logic.job.root)))

    @handler("Failed to prepare the job folder.", wait_cursor=True)
    def onPrepareElsewhere(self, _=None):
        self.ui.logTextEdit.clear()
        options = training_options_from(self._parameterNode)
        options.second_opinion = self.ui.secondOpinionPathLineEdit.currentPath
        self.logic.prepareTraining(slicer.mrmlScene, self.selectedCases(), options,
                                   self.ui.outputFolderPathLineEdit.currentPath)
        self.updateControls()

    @handler("Failed to import the run.", wait_cursor=True)
    def onImportRun(self, _=None):
        folder = qt.QFileDialog.getExistingDirectory(self.parent, "Finished run folder",
                                                     self.ui.outputFolderPathLineEdit.currentPath or "")
        if folder:
            self.logic.importFinishedRun(slicer.mrmlScene, folder)
            self.updateControls()

    # --- Review section ----------------------------------------------------------------------------------
    def _onReviewChanged(self, case=None):
        self.refreshReviewTable()

    def refreshReviewTable(self):
        model = self.logic.review
        shown = self.ui.reviewFilterComboBox.currentText or "all"
        rows = model.rows(shown)
        if self._currentReviewCase is not None and model.listed(self._currentReviewCase, shown) is None:
            self._currentReviewCase = None  # its row is gone or filtered out: nothing to act on
            self.ui.commentLineEdit.text = ""
        table = self.ui.reviewTable
        table.blockSignals(True)
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            quality, agreement = row.quality, row.agreement
            cells = [row.case, "" if quality is None else f"{quality:.3f}",
                     "" if agreement is None else f"{agreement:.3f}", row.status, row.comment]
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row.case)
                if column == 1:
                    r, g, b = model.thresholds.color(quality)
                    item.setBackground(qt.QBrush(qt.QColor(r, g, b)))
                    tip = "; ".join(f"{name}: {value:.3f}" for name, value in row.scores.items())
                    item.setToolTip(f"Predicted quality (estimated Dice) per segment: {tip}")
                if column == 2 and row.second_opinion:
                    tip = "; ".join(f"{name}: {value:.3f}" for name, value in row.second_opinion.items())
                    item.setToolTip(f"Dice against the second-opinion model's segmentation: {tip}")
                table.setItem(index, column, item)
            if row.case == self._currentReviewCase:
                table.selectRow(index)
        table.blockSignals(False)
        self.ui.reviewProgressLabel.text = model.progress_text()
        self.updateControls()

    @handler("Failed to filter the review table.")
    def onReviewFilterChanged(self, _=None):
        self.refreshReviewTable()

    @handler("Failed to order the review table.")
    def onReviewOrderChanged(self, _=None):
        self.logic.review.order = self.ui.reviewOrderComboBox.currentText or ORDERS[0]
        self.refreshReviewTable()

    @handler("Failed to apply the thresholds.")
    def onThresholdsChanged(self, _=None):
        low = self.ui.lowThresholdSpinBox.value
        high = self.ui.highThresholdSpinBox.value
        if low <= high:
            self.logic.setThresholds(Thresholds(low, high))
            self.refreshReviewTable()

    @handler("Failed to show the case.")
    def onReviewSelectionChanged(self):
        items = self.ui.reviewTable.selectedItems()
        if not items:
            return
        case = items[0].data(qt.Qt.UserRole)
        self._currentReviewCase = case
        self.ui.commentLineEdit.text = self.logic.review.row(case).comment  # Approve/Flag keep it
        self.logic.showCase(slicer.mrmlScene, case)
        self.updateControls()

    def _selectCase(self, case):
        self._currentReviewCase = case
        self.ui.commentLineEdit.text = self.logic.review.row(case).comment if case is not None else ""
        self.refreshReviewTable()
        if case is not None:
            self.logic.showCase(slicer.mrmlScene, case)

    @handler("Failed to approve the case.")
    def onApprove(self, _=None):
        self._decide("approved")

    @handler("Failed to flag the case.")
    def onFlag(self, _=None):
        self._decide("flagged")

    def _decide(self, status):
        case = self._currentReviewCase
        if case:
            self.logic.setReviewStatus(slicer.mrmlScene, case, status, self.ui.commentLineEdit.text)
            self._selectNextUnreviewed(case)  # after this case, even if the filter now hides it

    @handler("Failed to open the Segment Editor.")
    def onEdit(self, _=None):
        if not self._currentReviewCase:
            return
        row = self.logic.review.row(self._currentReviewCase)
        segmentation = slicer.mrmlScene.GetNodeByID(row.segmentation_id)
        volume = slicer.mrmlScene.GetNodeByID(row.volume_id)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):  # Slicer >= 5.4
            editor.setSourceVolumeNode(volume)
        else:
            editor.setMasterVolumeNode(volume)

    @handler("Failed to go to the next case.")
    def onNextUnreviewed(self, _=None):
        self._selectNextUnreviewed(self._currentReviewCase)

    def _selectNextUnreviewed(self, after):
        row = self.logic.review.next_unreviewed(after)
        if row is None:
            self._appendLog("Every case is reviewed.")
            self._selectCase(None)
            return
        self._selectCase(row.case)

    @handler("Failed to export the review table.")
    def onExportCsv(self, _=None):
        default = os.path.join(self.ui.outputFolderPathLineEdit.currentPath or "", "review.csv")
        path = qt.QFileDialog.getSaveFileName(self.parent, "Export review", default, "CSV (*.csv)")
        if path:
            self.logic.review.export_csv(path)
            self._appendLog(f"review exported to {path}")

    @handler("Failed to add the approved cases to the labeled ones.")
    def onUseApproved(self, _=None):
        references = self.logic.review.approved_references()
        changed = self._makeLabeled(references)
        self._appendLog(f"{changed} approved case(s) are now labeled, each with its reviewed segmentation "
                        "as reference: Train to learn from them.")
        self.updateControls()

    def _makeLabeled(self, references: dict) -> int:
        """Set the Cases rows of the volumes in {volume ID: segmentation ID} to used, labeled, with
        that reference; returns how many rows changed."""
        table = self.ui.casesTable
        changed = 0
        for row in range(table.rowCount):
            name = table.item(row, 1)
            volume_id = name.data(qt.Qt.UserRole) if name is not None else None
            if volume_id not in references:
                continue
            table.item(row, 0).setCheckState(qt.Qt.Checked)
            table.cellWidget(row, 2).setCurrentText("labeled")
            table.cellWidget(row, 3).setCurrentNodeID(references[volume_id])
            changed += 1
        return changed

    # --- Models section ------------------------------------------------------------------------------------
    @handler("Failed to save the model.", wait_cursor=True)
    def onSaveModel(self, _=None):
        folder = self.ui.modelFolderPathLineEdit.currentPath
        self.logic.saveModel(folder)
        self._appendLog(f"model saved to {folder}")

    @handler("Failed to load the model.", wait_cursor=True)
    def onLoadModel(self, _=None):
        self.logic.loadModel(self.ui.modelFolderPathLineEdit.currentPath)
        self.updateControls()

    # --- Environment section ---------------------------------------------------------------------------------
    def _showEnvironment(self, probe: bool):
        if probe:
            self._deviceInfo = environment.probe_torch(self.logic.pythonExecutable())
            self.ui.deviceInfoLabel.text = self._deviceInfo.summary
            self.updatePlanHint()
        statuses = self.logic.requirementStatuses()
        self.ui.environmentTextEdit.setPlainText(environment.diagnostics_text(
            statuses, self._deviceInfo, {"Slicer": slicer.app.applicationVersion,
                                         "worker python": self.logic.pythonExecutable()}))

    @handler("Failed to check the environment.", wait_cursor=True)
    def onCheckEnvironment(self, _=None):
        self._showEnvironment(probe=True)

    @handler("Failed to copy the diagnostics.")
    def onCopyDiagnostics(self, _=None):
        qt.QApplication.clipboard().setText(self.ui.environmentTextEdit.toPlainText())

    @handler("Failed to install dependencies.", wait_cursor=True)
    def onReinstallDependencies(self, _=None):
        self.ensureDependencies(force=True)
        self._showEnvironment(probe=True)

    def ensureDependencies(self, force: bool = False) -> bool:
        """At first use: one confirmation listing what is missing, torch through PyTorchUtils
        (with a minimum version), the rest through pip. Runs in the GUI thread, never a worker
        thread. Never installs Slicer's own numpy/vtk/SimpleITK/scipy. Whether torch is there and
        new enough comes from its metadata (environment.install_plan): never imported here."""
        plan = environment.install_plan(self.logic.requirementStatuses(), environment.torch_status(), force)
        if plan.broken:
            slicer.util.errorDisplay("This Slicer lacks packages it normally provides:\n"
                                     + "\n".join(plan.broken) + "\nPlease use a newer Slicer release.")
            return False
        if plan.nothing_to_install:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                "QGSegmentation needs these Python packages:\n\n  " + "\n  ".join(plan.listing())
                + "\n\nInstall them now? This can take several minutes.",
                windowTitle="Install dependencies"):
            return False
        if plan.torch:  # missing or older than TORCH_REQUIREMENT: installed or upgraded
            try:
                import PyTorchUtils  # provided by the SlicerPyTorch extension (EXTENSION_DEPENDS)
            except ImportError:
                slicer.util.errorDisplay("The PyTorch extension is required: install 'PyTorch' "
                                         "from the Extensions Manager and restart Slicer.")
                return False
            # not torchInstalled(): it imports torch, and is true for a torch too old for the worker
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=environment.TORCH_REQUIREMENT) is None:
                slicer.util.errorDisplay("PyTorch could not be installed; see the Python console.")
                return False
        if plan.pip:
            self._pipInstall(list(plan.pip), force)
        self.logic.invalidateRequirementCache()
        self.updateControls()
        return True

    @staticmethod
    def _pipInstall(requirements: List[str], force: bool):
        pydeps = getattr(slicer, "pydeps", None) or getattr(slicer, "packaging", None)
        if pydeps is not None and hasattr(pydeps, "pip_ensure") and not force:
            from packaging.requirements import Requirement
            pydeps.pip_ensure([Requirement(r) for r in requirements], requester="QGSegmentation")
        else:
            slicer.util.pip_install(requirements + (["--force-reinstall", "--no-deps"] if force else []))


#
# Logic (thin; never opens a dialog)
#
class QGSegmentationLogic(ScriptedLoadableModuleLogic):
    """Runs the pipeline panel -> job folder -> worker(s) -> scene, one step per `poll()`.

    `runner_factory(command, run_dir, events_path, env)` builds the worker runner; the widget
    tests pass a fake that replays a recorded events.jsonl."""

    def __init__(self, runner_factory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner_factory = runner_factory or (
            lambda command, run_dir, events, env: WorkerRunner(command, run_dir, events, env=env))
        self.state = PanelStateMachine()
        self.review = ReviewModel()
        self.runEvent = Signal("run event")
        self.message = Signal("log message")
        self.job: Optional[jobs.JobFolder] = None
        self.spec: Optional[jobs.JobSpec] = None
        self.runner = None
        self.checkpoint: Optional[str] = None         # segmenter
        self.qualityCheckpoint: Optional[str] = None  # quality predictor g
        self.secondOpinion: Optional[str] = None      # another segmenter, for each result's 2nd opinion
        self.modelRecords = jobs.ModelRecords()       # the job.json / manifest.json Save model copies with it
        self.modelLabelNames: List[str] = []          # the current model's segment names
        self.detached = False  # the scene the run started from was closed: its results are not imported
        self.pipeline: Optional[pipeline.RunPipeline] = None
        self.options = jobs.TrainingOptions()
        self.cancelGraceS = DEFAULT_GRACE_S
        self._requirements = None

    def getParameterNode(self):
        return QGSegmentationParameterNode(super().getParameterNode())

    @property
    def running(self) -> bool:
        return self.state.running

    # environment --------------------------------------------------------------------------------
    def pythonExecutable(self) -> str:
        candidate = python_slicer_executable(os.path.join(slicer.app.slicerHome, "bin"))
        return candidate if os.path.exists(candidate) else (shutil.which("PythonSlicer") or sys.executable)

    def requirementStatuses(self):
        if self._requirements is None:
            self._requirements = environment.check_requirements()
        return self._requirements

    def invalidateRequirementCache(self):
        self._requirements = None

    def dependencySummary(self):
        """(ok, why not). Missing pip-installable packages do not block Train: its first click
        offers to install them. Only packages Slicer itself must provide do."""
        broken = environment.slicer_provided_problems(self.requirementStatuses())
        if broken:
            return False, "This Slicer lacks " + ", ".join(broken) + ": use a newer Slicer release."
        return True, ""

    # cases ------------------------------------------------------------------------------------------
    @staticmethod
    def guessReference(volume) -> Optional[str]:
        """A segmentation whose reference geometry is `volume` and that we did not create."""
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if node.GetAttribute(scene_io.ATTR_RUN_ID):
                continue
            role = node.GetReferenceImageGeometryReferenceRole()
            if node.GetNodeReferenceID(role) == volume.GetID():
                return node.GetID()
        return None

    # runs -------------------------------------------------------------------------------------------
    # A Train click runs its workers one after the other (stage k/n, order in pipeline.py): the
    # quality predictor g, the segmenter (guided by g), optionally a second-opinion segmenter, then
    # segmenting + scoring the unlabeled volumes. A Segment click runs the last stage only.
    def startTraining(self, scene, cases: List[jobs.CaseEntry], options: jobs.TrainingOptions,
                      output_folder: str):
        options.validate()
        secondOpinion = self._secondOpinionCheckpoint(options.second_opinion)
        self.state.transition(RunState.PREPARING)
        self.detached = False
        try:
            self.options = options
            self.job, self.spec = self._writeTrainingJob(scene, cases, options, output_folder)
            self.message.emit(f"run folder: {self.job.root}")
            self.pipeline = pipeline.RunPipeline.for_training(
                self.job, options, segment=any(c.role == "unlabeled" for c in cases),
                second_opinion=secondOpinion)
            self._startStage(self.pipeline.start())
            self.state.transition(RunState.TRAINING)
        except Exception as exc:
            self.state.transition(RunState.FAILED, str(exc))
            raise

    def _writeTrainingJob(self, scene, cases: List[jobs.CaseEntry], options: jobs.TrainingOptions,
                          output_folder: str):
        """(JobFolder, JobSpec) of a new Train job: exported volumes and labels, dataset.json, job.json."""
        folder = jobs.create_job_folder(output_folder)
        _, label_names = scene_io.export_dataset(scene, cases, folder, on_case=self._caseDone("exported"))
        spec = jobs.JobSpec(kind="train", run_id=folder.run_id, cases=list(cases), options=vars(options).copy(),
                            label_names=label_names, versions=self._versions())
        jobs.write_job_spec(folder, spec)
        return folder, spec

    # Another machine (a GPU server): the job folder is written here, run there with
    # `qgseg job run FOLDER`, copied back and imported (QGSegmentationLib/slicer/elsewhere.py).
    def prepareTraining(self, scene, cases: List[jobs.CaseEntry], options: jobs.TrainingOptions,
                        output_folder: str) -> jobs.JobFolder:
        """Write a Train job folder without starting anything; returns it."""
        if self.running:
            raise ValueError("a run is in progress: wait for it or cancel it first")
        options = dataclasses.replace(options, device="auto").validate()  # the other machine's GPU if it has one
        self._secondOpinionCheckpoint(options.second_opinion)  # a bad model folder is reported now
        folder, spec = self._writeTrainingJob(scene, cases, options, output_folder)
        if options.second_opinion:  # travels with the job: the other machine lacks the model folder
            spec.options["second_opinion"] = elsewhere.bundle_second_opinion(folder, options.second_opinion)
            jobs.write_job_spec(folder, spec)
        self.message.emit(f"prepared {folder.root}\nCopy this folder to a machine with the backend installed "
                          "(from a checkout of QGSegmentation: pip install torch==2.13.0 && pip install .), "
                          f"run there:\n    qgseg job run <where you copied it>/{folder.run_id}\n"
                          "(it uses that machine's GPU when it has one; add --device cuda to insist on one), "
                          "then copy it back and choose it in 'Import finished run'.")
        return folder

    def importFinishedRun(self, scene, root: str) -> None:
        """Results of a Train job run elsewhere -> segmentations, scores, review; its models become
        the current model (Segment selected, Save model)."""
        if self.running:
            raise ValueError("a run is in progress: wait for it or cancel it first")
        run = elsewhere.finished_run(root)
        self.job, self.spec, self.pipeline = run.folder, run.spec, None
        self.checkpoint = run.checkpoint
        self.qualityCheckpoint = run.quality_checkpoint or None
        self.secondOpinion = run.second_opinion or None
        self.modelRecords = jobs.run_model_records(run.folder)
        self.modelLabelNames = list(run.spec.label_names)
        self.importResults(scene)
        self.message.emit(f"imported {run.folder.root}: {len(self.review)} case(s) to review")

    def startSegmenting(self, scene, cases: List[jobs.CaseEntry], device: str, output_folder: str,
                        mirror: bool = True, second_opinion: str = ""):
        if self.checkpoint is None:
            raise ValueError("no model: train one or load a model folder first")
        # the chosen folder's segmenter, else the model's own second opinion (trained or loaded)
        secondOpinion = self._secondOpinionCheckpoint(second_opinion) or self.secondOpinion
        self.state.transition(RunState.PREPARING)
        self.detached = False
        try:
            label_names = list(self.modelLabelNames)
            self.job = jobs.create_job_folder(output_folder, prefix="segment")
            exported = self._caseDone("exported")
            for index, case in enumerate(cases, 1):
                scene_io.write_volume(scene.GetNodeByID(case.volume_id), self.job.image_path(case.case))
                exported(index, len(cases), case.case)
            self.spec = jobs.JobSpec(kind="predict", run_id=self.job.run_id, cases=list(cases),
                                     label_names=label_names, checkpoint=self.checkpoint,
                                     quality_checkpoint=self.qualityCheckpoint or "",
                                     second_opinion_checkpoint=secondOpinion or "",
                                     options={"device": device, "mirror": mirror,
                                              "second_opinion": second_opinion or ""},
                                     versions=self._versions())
            jobs.write_job_spec(self.job, self.spec)
            self.options = jobs.TrainingOptions(device=device, mirror=mirror)
            self.pipeline = pipeline.RunPipeline.for_segmenting(
                self.job, self.options, self.checkpoint, self.qualityCheckpoint, secondOpinion)
            self._startStage(self.pipeline.start())
            self.state.transition(RunState.PREDICTING)
        except Exception as exc:
            self.state.transition(RunState.FAILED, str(exc))
            raise

    def _casesToSegment(self):
        if self.spec.kind == "predict":
            return list(self.spec.cases)
        return [c for c in self.spec.cases if c.role == "unlabeled"]

    def _startStage(self, stage: pipeline.Stage):
        self.runEvent.emit({"event": pipeline.RUN_STAGE_EVENT, "name": stage.name, "index": stage.index,
                            "total": stage.total})
        command = worker_command(self.pythonExecutable(), stage.arguments)
        env = worker_environment(os.environ, LIBRARY_PARENT)
        self.runner = self.runner_factory(command, stage.run_dir, stage.events, env)
        self.runner.start()
        self.message.emit("$ " + " ".join(command))

    def poll(self, scene):
        """One timer tick: forward new events; when a worker ends, start the next stage."""
        if self.runner is None:
            return
        update = self.runner.poll()
        for event in update.events:  # the worker's `stage` events name the steps of this stage
            self.runEvent.emit(event)
        for warning in update.warnings:
            self.message.emit(f"warning: {warning}")
        if not update.finished:
            return
        result = update.result
        self.runner = None
        if self.state.state is RunState.CANCELLING or result.status == "cancelled":
            self.message.emit("cancelled: nothing from this run was imported")
            self.state.worker_cancelled()
            return
        if not result.ok:
            self.state.transition(RunState.FAILED, result.error.advice if result.error else "failed")
            return
        try:
            self._afterStage(scene, result)
        except Exception as exc:
            if self.state.state is not RunState.FAILED:
                self.state.transition(RunState.FAILED, str(exc))
            raise

    def _afterStage(self, scene, result):
        finished = self.pipeline.current
        following = self.pipeline.finish(result.outputs)
        run = self.pipeline
        self.spec.quality_checkpoint = run.quality_checkpoint or ""
        self.spec.checkpoint = run.checkpoint or ""
        self.spec.second_opinion_checkpoint = run.second_opinion or ""
        jobs.write_job_spec(self.job, self.spec)
        if finished != pipeline.SEGMENT and run.trained:  # this run's whole model is now the current one
            self.checkpoint, self.qualityCheckpoint = run.checkpoint, run.quality_checkpoint
            self.secondOpinion = run.second_opinion
            self.modelRecords = jobs.run_model_records(self.job)
            self.modelLabelNames = list(self.spec.label_names)
        if following is not None:
            self._startStage(following)
            if following.name == pipeline.SEGMENT:
                self.state.transition(RunState.PREDICTING)
        elif finished == pipeline.SEGMENT:
            self.state.transition(RunState.IMPORTING)
            if self.detached:  # node IDs restarted in this scene: they would name other volumes
                self.message.emit("finished, but the scene it was started from was closed: nothing was imported. "
                                  + self._reimportAdvice())
            else:
                self.importResults(scene)
            self.state.transition(RunState.IDLE)
        else:
            self.message.emit("trained; no unlabeled volume to segment")
            self.state.transition(RunState.IDLE)

    def detachFromScene(self):
        """The scene the run started from is being closed: node IDs start again in the next one,
        so the run's results must not be imported there (the run itself goes on)."""
        if self.running and not self.detached:
            self.detached = True
            self.message.emit("the scene was closed during the run: the run goes on, but its results will not be "
                              "imported into another scene. " + self._reimportAdvice())

    def _reimportAdvice(self) -> str:
        if self.job is None:
            return ""
        if self.spec is not None and self.spec.kind == "predict":  # Import finished run takes Train runs
            return (f"Its segmentations and scores are in {self.job.predictions_dir}; load that scene again "
                    "and Segment selected to have them in the Review table.")
        return (f"Once it has finished, load that scene again and choose {self.job.root} in "
                "'Import finished run'.")

    def cancel(self):
        if self.runner is not None and self.state.request_cancel():
            self.runner.cancel(self.cancelGraceS)
            self.message.emit("cancel requested; the worker stops after its current step")

    def shutdown(self):
        """The panel goes away (Slicer closing, the module reloaded): no signal reaches its widgets
        any more, and a running worker is asked to stop, given a few seconds to save a checkpoint,
        then killed with its children. Nothing of the run is imported; rerunning resumes it."""
        for signal in (self.state.changed, self.runEvent, self.message, self.review.changed):
            signal.disconnect()
        if self.runner is not None:
            self.runner.stop(SHUTDOWN_GRACE_S)
            self.runner = None

    def kill(self):
        if self.runner is not None:
            if self.state.state is not RunState.CANCELLING:
                self.state.request_cancel()
            self.runner.kill()

    def keepWaiting(self):
        if self.runner is not None:
            self.runner.keep_waiting()

    def isUnresponsive(self, timeout_s: float) -> bool:
        return self.runner is not None and self.runner.is_unresponsive(timeout_s)

    def runToCompletion(self, scene, timeout_s: float = 600.0, interval_s: float = 0.2):
        """Blocking loop for scripts and the module self-test (the GUI polls from a timer)."""
        import time
        end = time.monotonic() + timeout_s
        while self.runner is not None:
            self.poll(scene)
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"run still going after {timeout_s:.0f} s")
            time.sleep(interval_s)

    # results ------------------------------------------------------------------------------------------
    def importResults(self, scene):
        """Predictions + scores of a finished ok run -> segmentation nodes, statuses, table."""
        scores, seconds = (read_scores_and_second_opinions(self.job.scores_csv)
                           if self.job.scores_csv.exists() else ({}, {}))
        if not scores and not seconds:
            self.message.emit(f"warning: no scores in {self.job.scores_csv}")
        cases = self._casesToSegment()
        imported, progress = 0, self._caseDone("imported")
        try:
            for index, case in enumerate(cases, 1):
                why = self._importCase(scene, case, scores.get(case.case, {}), seconds.get(case.case, {}))
                if why:  # one case that cannot be imported does not stop the others
                    self.message.emit(f"warning: {case.case} not imported: {why}")
                else:
                    imported += 1
                    progress(index, len(cases), case.case)
        finally:
            scene_io.write_review_table(scene, self.review.rows())
            self.review.changed.emit(None)
        self.message.emit(f"imported {imported} of {len(cases)} case(s)"
                          + ("" if imported == len(cases) else ": see the warnings above"))

    def _caseDone(self, verb: str) -> Callable[[int, int, str], None]:
        """A per-case progress callback for work done in the GUI thread (exporting volumes,
        importing results): says which case is done and lets Slicer repaint between cases."""
        def done(index: int, total: int, case: str) -> None:
            self.message.emit(f"{verb} {case} ({index}/{total})")
            slicer.app.processEvents()
        return done

    def _importCase(self, scene, case, case_scores, second_opinion) -> str:
        """One case's prediction and scores into the scene and the review list; why not, or ""."""
        path = self.job.prediction_path(case.case)
        if not path.exists():
            return f"no prediction ({path})"
        volume, why = scene_io.case_volume(scene, case)  # by node ID and name: IDs restart in a new scene
        if volume is None:
            return why
        try:
            segmentation = scene_io.import_prediction(scene, path, volume, self.spec.label_names or None,
                                                      case=case.case, run_id=self.spec.run_id)
        except scene_io.SceneIOError as exc:
            return str(exc)
        scene_io.apply_quality(segmentation, case_scores, self.review.thresholds, self.spec.run_id)
        self.review.add(ReviewRow(case=case.case, volume=volume.GetName(), volume_id=volume.GetID(),
                                  segmentation=segmentation.GetName(),
                                  segmentation_id=segmentation.GetID(), scores=case_scores,
                                  run_id=self.spec.run_id, second_opinion=second_opinion),
                        notify=False)
        return ""

    def loadReviewFromScene(self, scene):
        """The review list saved with the scene. A table that cannot be read (edited by hand in the
        Tables module) leaves the list empty with a warning, not a panel that fails to open."""
        table = scene_io.find_review_table(scene)
        if table is None:
            return
        try:
            self.review.replace_rows(scene_io.read_review_table(table))
        except ValueError as exc:  # SceneIOError, or a row ReviewRow refuses
            self.message.emit(f"warning: the review list was not restored: {exc}")

    def setThresholds(self, thresholds: Thresholds):
        self.review.thresholds = thresholds

    def setReviewStatus(self, scene, case: str, status: str, comment: str = ""):
        row = self.review.set_status(case, status, comment)
        segmentation = scene.GetNodeByID(row.segmentation_id)
        if segmentation is not None:
            scene_io.apply_review_status(segmentation, status, comment)
        scene_io.write_review_table(scene, self.review.rows())

    def showCase(self, scene, case: str):
        """Show the case's volume with only its segmentation, centred on it."""
        row = self.review.row(case)
        volume = scene.GetNodeByID(row.volume_id)
        segmentation = scene.GetNodeByID(row.segmentation_id)
        if volume is None or segmentation is None:
            raise ValueError(f"case {case}: its volume or segmentation is no longer in the scene")
        slicer.util.setSliceViewerLayers(background=volume, foreground=None, label=None, fit=True)
        scene_io.show_only_segmentation(scene, segmentation)
        center = scene_io.segmentation_center_ras(segmentation)
        if center is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *center, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    # models -------------------------------------------------------------------------------------------
    @staticmethod
    def _secondOpinionCheckpoint(folder: str) -> Optional[str]:
        """The segmenter of the second-opinion model folder (None when none is chosen)."""
        return str(jobs.model_segmenter(folder, "second-opinion model folder")) if folder else None

    def saveModel(self, folder: str):
        """Copy the segmenter, its quality predictor and second opinion, the job spec and the
        training manifest into `folder`."""
        if not self.checkpoint:
            raise ValueError("no model to save: train one first")
        # the records of the run that trained the current model, or of the folder it was loaded from
        jobs.save_model_folder(folder, self.checkpoint, self.qualityCheckpoint, self.secondOpinion,
                               *self.modelRecords.existing())

    def loadModel(self, folder: str):
        if self.running:
            raise ValueError("a run is in progress: wait for it or cancel it first")
        model = jobs.read_model_folder(folder)
        spec = model.spec()  # before changing anything: a broken job.json leaves the current model
        self.checkpoint = str(model.segmenter)
        self.qualityCheckpoint = str(model.quality) if model.quality else None
        self.secondOpinion = str(model.second_opinion) if model.second_opinion else None
        self.modelRecords = model.records
        self.modelLabelNames = list(spec.label_names)
        self.job, self.spec, self.pipeline = None, spec, None  # an earlier run's are not this model's
        if self.qualityCheckpoint is None:
            self.message.emit(f"{folder} has no {jobs.MODEL_QUALITY_FILE}: segmentations will have no quality scores")

    @staticmethod
    def _versions():
        import QGSegmentationLib
        out = {"QGSegmentationLib": QGSegmentationLib.__version__}
        try:
            out["Slicer"] = slicer.app.applicationVersion
        except AttributeError:
            pass
        for status in environment.check_requirements() + [environment.torch_status()]:
            out[status.name] = status.installed or "missing"
        return out


#
# Test (runs inside Slicer: Slicer --testing / Reload and Test)
#
class QGSegmentationTest(ScriptedLoadableModuleTest):
    """Builds a tiny scene and runs a tiny CPU training through the logic (real worker)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_tiny_training_run()
        self.setUp()
        self.test_run_prepared_for_another_machine_is_imported()

    @staticmethod
    def _tinyPhantomCases() -> List[jobs.CaseEntry]:
        """Two labeled phantom volumes with reference segmentations and one unlabeled volume."""
        from QGSegmentationLib.data.phantom import make_phantom_case
        cases = []
        for index in range(3):
            image, label = make_phantom_case((32, 32, 32), n_classes=2, seed=index)
            volume = slicer.util.addVolumeFromArray(image, name=f"phantom {index}")
            volume.SetSpacing(1.2, 1.0, 1.5)
            volume.SetOrigin(-10.0 * index, 5.0, 2.0)
            role = "labeled" if index < 2 else "unlabeled"
            segmentation_id = ""
            if role == "labeled":
                labelmap = slicer.util.addVolumeFromArray(label, name=f"phantom {index} label",
                                                          nodeClassName="vtkMRMLLabelMapVolumeNode")
                labelmap.CopyOrientation(volume)
                segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
                slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
                segmentation.GetSegmentation().GetNthSegment(0).SetName("organ")
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
                slicer.mrmlScene.RemoveNode(labelmap)
                segmentation_id = segmentation.GetID()
            cases.append(jobs.CaseEntry(f"phantom_{index}", volume.GetID(), volume.GetName(), role,
                                        segmentation_id))
        return cases

    def test_tiny_training_run(self):
        import tempfile
        self.delayDisplay("Building a tiny phantom scene")
        logic = QGSegmentationLogic()
        cases = self._tinyPhantomCases()

        self.delayDisplay("Training for a few iterations on the CPU")
        options = jobs.TrainingOptions(architecture="unet", ssl_method="mt", iterations=4,
                                       batch_size=1, patch_size=32, device="cpu", quality_epochs=1,
                                       quality_seeds=2)
        output = tempfile.mkdtemp(prefix="qgseg-selftest-")
        logic.startTraining(slicer.mrmlScene, cases, options, output)
        logic.runToCompletion(slicer.mrmlScene, timeout_s=600)
        self.assertEqual(logic.state.state, RunState.IDLE, logic.state.failure_message)
        self.assertEqual(len(logic.review), 1)
        row = logic.review.rows()[0]
        segmentation = slicer.mrmlScene.GetNodeByID(row.segmentation_id)
        self.assertIsNotNone(segmentation)
        self.assertEqual(segmentation.GetAttribute(scene_io.ATTR_RUN_ID), logic.spec.run_id)
        self.assertIsNotNone(scene_io.find_review_table(slicer.mrmlScene))
        array = slicer.util.arrayFromSegmentBinaryLabelmap(
            segmentation, segmentation.GetSegmentation().GetNthSegmentID(0),
            slicer.mrmlScene.GetNodeByID(row.volume_id))
        self.assertEqual(array.shape, (32, 32, 32))
        self.assertIsNotNone(row.quality, "scores.csv gave no quality for the unlabeled case")
        self.assertTrue(0.0 <= row.quality <= 1.0)
        self.delayDisplay("Tiny training run passed")

    def test_run_prepared_for_another_machine_is_imported(self):
        """Prepare -> copy -> `qgseg job run` there (a child process) -> copy back -> import."""
        import subprocess
        import tempfile
        logic = QGSegmentationLogic()
        cases = self._tinyPhantomCases()
        options = jobs.TrainingOptions(architecture="unet", ssl_method="pl", iterations=2, batch_size=1,
                                       patch_size=32, device="cpu", quality_epochs=1, mirror=False)
        folder = logic.prepareTraining(slicer.mrmlScene, cases, options, tempfile.mkdtemp(prefix="qgseg-here-"))
        self.assertEqual(logic.state.state, RunState.IDLE)
        there = os.path.join(tempfile.mkdtemp(prefix="qgseg-there-"), folder.run_id)
        shutil.copytree(folder.root, there)
        self.delayDisplay("Running the job folder as another machine would")
        command = worker_command(logic.pythonExecutable(), ["job", "run", there])
        self.assertEqual(subprocess.call(command, env=worker_environment(os.environ, LIBRARY_PARENT)), 0)
        back = os.path.join(tempfile.mkdtemp(prefix="qgseg-back-"), folder.run_id)
        shutil.copytree(there, back)
        logic.importFinishedRun(slicer.mrmlScene, back)
        self.assertEqual(len(logic.review), 1)
        self.assertTrue(logic.checkpoint.startswith(back), logic.checkpoint)
        row = logic.review.rows()[0]
        self.assertEqual(row.volume_id, cases[2].volume_id)
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(row.segmentation_id))
        self.assertTrue(0.0 <= row.quality <= 1.0)
        self.delayDisplay("Run on another machine imported")
