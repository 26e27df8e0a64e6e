"""In-Slicer widget tests for QGSegmentation (need the Slicer application; not run in CI).

A FakeRunner replays the event streams recorded from a real tiny run (events/*.jsonl next to this
file) instead of starting a worker, so the panel's progress, stage, metric, cancel and review
behaviour is checked in seconds. The fake writes the prediction files and scores.csv a real
predict stage would write, computed from the test's own volumes.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from QGSegmentationLib.engine.events import parse_line
from QGSegmentationLib.slicer import jobs, scene_io
from QGSegmentationLib.slicer.runner import PollUpdate, RunResult, WorkerError
from QGSegmentationLib.slicer.state import RunState

EVENTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "events")
RECORDINGS = {  # worker sub-command -> recorded stream
    "quality": "quality-events.jsonl",
    "train": "events.jsonl",
    "predict": "predict-events.jsonl",
}


def recorded_events(name):
    with open(os.path.join(EVENTS_DIR, name), encoding="utf-8") as fh:
        return [parse_line(line) for line in fh if line.strip()]


class FakeRunner:
    """Stands in for WorkerRunner: same interface, replays a recorded stream a few events per
    poll. `cancel()` ends the replay as a cancelled run; `fail_with` ends it with that error."""

    events_per_poll = 3

    def __init__(self, command, run_dir, events_path, env=None, fail_with=None):
        self.command = command
        self.run_dir = run_dir
        self.events_path = events_path
        subcommand = command[3]  # [python, -m, module, subcommand, ...]
        self._queue = [e for e in recorded_events(RECORDINGS[subcommand]) if e["event"] != "done"]
        self._done = [e for e in recorded_events(RECORDINGS[subcommand]) if e["event"] == "done"][-1]
        self._fail_with = fail_with
        self._cancelled = False
        self._result = None
        self.events = []

    def start(self):
        return self

    def poll(self):
        if self._result is not None:
            return PollUpdate([], True, self._result)
        if self._cancelled:
            self._result = RunResult("cancelled", 3, {}, WorkerError("cancelled", "cancelled"))
            return PollUpdate([], True, self._result)
        batch, self._queue = self._queue[:self.events_per_poll], self._queue[self.events_per_poll:]
        self.events += batch
        if self._queue:
            return PollUpdate(batch, False)
        if self._fail_with is not None:
            self._result = RunResult("failed", 4, {}, WorkerError(self._fail_with, "CUDA out of memory"))
        else:
            self._write_outputs()
            self._result = RunResult("ok", 0, {}, None)
        return PollUpdate(batch, True, self._result)

    def _write_outputs(self):
        """What each real stage leaves behind: checkpoints, or predictions + scores.csv."""
        args = self.command
        if args[3] in ("quality", "train"):
            folder = os.path.join(self.run_dir, "checkpoints")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "best.pt"), "wb") as fh:
                fh.write(b"fake checkpoint")
            return
        output = args[args.index("--output") + 1]
        dataset = json.load(open(args[args.index("--input") + 1]))
        root = os.path.dirname(args[args.index("--input") + 1])
        rows = []
        for image in dataset["unlabeled"]:
            case = os.path.basename(image)[: -len(".nrrd")]
            node = slicer.util.loadVolume(os.path.join(root, image))
            array = slicer.util.arrayFromVolume(node)
            label = (array > np.percentile(array, 80)).astype(np.uint8)
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            labelmap.CopyOrientation(node)
            slicer.util.updateVolumeFromArray(labelmap, label)
            slicer.util.saveNode(labelmap, os.path.join(output, f"{case}.seg.nrrd"))
            slicer.mrmlScene.RemoveNode(labelmap)
            slicer.mrmlScene.RemoveNode(node)
            rows.append({"case": case, "segment": "organ", "label": 1,
                         "predicted_quality": round(float(label.mean()) + 0.5, 4)})
        with open(os.path.join(output, "scores.csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["case", "segment", "label", "predicted_quality"])
            writer.writeheader()
            writer.writerows(rows)

    def cancel(self, grace_s=10.0):
        self._cancelled = True

    def kill(self):
        self._cancelled = True

    def stop(self, grace_s=5.0):
        if self._result is None:
            self._cancelled = True
            self.poll()
        return self._result

    def keep_waiting(self):
        pass

    def is_unresponsive(self, timeout_s=60.0):
        return False

    def seconds_since_last_event(self):
        return 0.0

    def result(self):
        return self._result


def build_tiny_scene(n_labeled=2, n_unlabeled=2):
    """Volumes with oblique-free but anisotropic geometry, references for the labeled ones."""
    cases = []
    rng = np.random.default_rng(0)
    for index in range(n_labeled + n_unlabeled):
        image = rng.normal(100, 10, (12, 16, 16)).astype(np.float32)
        image[3:9, 4:12, 4:12] += 80
        volume = slicer.util.addVolumeFromArray(image, name=f"tiny {index}")
        volume.SetSpacing(1.0, 1.2, 2.0)
        labeled = index < n_labeled
        segmentation_id = ""
        if labeled:
            labelmap = slicer.util.addVolumeFromArray((image > 140).astype(np.uint8), name="ref",
                                                      nodeClassName="vtkMRMLLabelMapVolumeNode")
            labelmap.CopyOrientation(volume)
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"tiny {index} ref")
            slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
            segmentation.GetSegmentation().GetNthSegment(0).SetName("organ")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            slicer.mrmlScene.RemoveNode(labelmap)
            segmentation_id = segmentation.GetID()
        cases.append(jobs.CaseEntry(f"tiny_{index}", volume.GetID(), volume.GetName(),
                                    "labeled" if labeled else "unlabeled", segmentation_id))
    return cases


class QGSegmentationWidgetTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_replayed_run_updates_panel_and_fills_review()
        self.setUp()
        self.test_cancel_imports_nothing()
        self.setUp()
        self.test_trained_second_opinion_adds_a_stage_and_is_saved_with_the_model()

    def _widget(self, runner_factory):
        import QGSegmentation as module
        logic = module.QGSegmentationLogic(runner_factory=runner_factory)
        widget = module.QGSegmentationWidget(slicer.qMRMLWidget(), logic=logic)
        widget.setup()
        return module, widget, logic

    def test_replayed_run_updates_panel_and_fills_review(self):
        build_tiny_scene()
        module, widget, logic = self._widget(lambda c, r, e, env: FakeRunner(c, r, e, env))
        widget.refreshCases()
        self.assertEqual(widget.ui.casesTable.rowCount, 4)
        widget.ui.outputFolderPathLineEdit.currentPath = tempfile.mkdtemp(prefix="qgseg-widget-")
        widget.updateControls()
        self.assertTrue(widget.ui.trainButton.enabled, widget.ui.trainButton.toolTip)
        # before any device probe, the Advanced section says what auto becomes on a CPU and on a GPU
        self.assertTrue(widget.ui.planHintLabel.text.startswith("auto on the CPU: spacing"), widget.ui.planHintLabel.text)
        self.assertIn("; on the GPU: spacing", widget.ui.planHintLabel.text)
        widget._parameterNode.targetSpacing = 2.0  # the parameter node's observer updates the line
        self.assertTrue(widget.ui.planHintLabel.text.startswith("auto on the CPU: patch"), widget.ui.planHintLabel.text)
        widget._parameterNode.patchSize = 32
        self.assertEqual(widget.ui.planHintLabel.text, "")  # nothing left to plan
        widget._parameterNode.targetSpacing, widget._parameterNode.patchSize = 0.0, 0
        logic.startTraining(slicer.mrmlScene, widget.selectedCases(),
                            jobs.TrainingOptions(device="cpu", iterations=6), widget.ui.outputFolderPathLineEdit.currentPath)
        self.assertEqual(widget.ui.trainButton.text, "Cancel")
        self.assertFalse(widget.ui.casesCollapsibleButton.enabled)
        for _ in range(500):
            widget.onPollTimer()
            if logic.state.state in (RunState.IDLE, RunState.FAILED):
                break
        self.assertEqual(logic.state.state, RunState.IDLE, logic.state.failure_message)
        self.assertEqual(widget.ui.trainButton.text, "Train")
        self.assertIn("3/3", widget.ui.stageLabel.text)
        self.assertEqual(widget.ui.progressBar.value, widget.ui.progressBar.maximum)
        self.assertEqual(widget.ui.reviewTable.rowCount, 2)
        self.assertEqual(widget.ui.reviewProgressLabel.text, "reviewed 0/2")
        widget.ui.reviewTable.selectRow(0)
        case = widget._currentReviewCase
        widget.onApprove()
        self.assertEqual(logic.review.row(case).status, "approved")
        segmentation = slicer.mrmlScene.GetNodeByID(logic.review.row(case).segmentation_id)
        self.assertEqual(set(scene_io.segment_statuses(segmentation).values()), {"completed"})
        self.assertEqual(widget.ui.reviewProgressLabel.text, "reviewed 1/2")
        self.assertTrue(widget.ui.useApprovedButton.enabled)
        widget.onUseApproved()  # the approved volume becomes a labeled case with its result as reference
        row = next(r for r in widget._caseRows() if r["volume_id"] == logic.review.row(case).volume_id)
        self.assertEqual((row["use"], row["role"], row["segmentation_id"]), (True, "labeled", segmentation.GetID()))
        widget.cleanup()

    def test_cancel_imports_nothing(self):
        build_tiny_scene()
        module, widget, logic = self._widget(lambda c, r, e, env: FakeRunner(c, r, e, env))
        widget.ui.outputFolderPathLineEdit.currentPath = tempfile.mkdtemp(prefix="qgseg-widget-")
        logic.startTraining(slicer.mrmlScene, widget.selectedCases(), jobs.TrainingOptions(device="cpu"),
                            widget.ui.outputFolderPathLineEdit.currentPath)
        widget.onPollTimer()
        asked = []
        widget.confirmCancel = lambda: asked.append(True) or bool(len(asked) > 1)  # No, then Yes
        widget.onPrimaryButton()  # the primary button is Cancel while running: asks first
        self.assertEqual(logic.state.state, RunState.TRAINING)
        widget.onPrimaryButton()
        self.assertEqual(len(asked), 2)
        self.assertEqual(logic.state.state, RunState.CANCELLING)
        widget.onPollTimer()
        self.assertEqual(logic.state.state, RunState.IDLE)
        self.assertEqual(len(logic.review), 0)
        self.assertIsNone(scene_io.find_review_table(slicer.mrmlScene))
        widget.cleanup()

    def test_trained_second_opinion_adds_a_stage_and_is_saved_with_the_model(self):
        build_tiny_scene()
        module, widget, logic = self._widget(lambda c, r, e, env: FakeRunner(c, r, e, env))
        output = tempfile.mkdtemp(prefix="qgseg-widget-")
        logic.startTraining(slicer.mrmlScene, widget.selectedCases(),
                            jobs.TrainingOptions(device="cpu", train_second_opinion=True), output)
        for _ in range(500):
            widget.onPollTimer()
            if logic.state.state in (RunState.IDLE, RunState.FAILED):
                break
        self.assertEqual(logic.state.state, RunState.IDLE, logic.state.failure_message)
        self.assertIn("4/4", widget.ui.stageLabel.text)
        self.assertTrue(logic.secondOpinion.startswith(str(logic.job.second_opinion_run_dir)))
        self.assertEqual(jobs.read_job_spec(logic.job.job_json).second_opinion_checkpoint, logic.secondOpinion)
        model_folder = os.path.join(output, "model")
        logic.saveModel(model_folder)
        self.assertIsNotNone(jobs.read_model_folder(model_folder).second_opinion)
        widget.ui.reviewOrderComboBox.currentText = "lower of both"
        self.assertEqual(logic.review.order, "lower of both")
        widget.cleanup()
