"""In-Slicer logic tests with the FakeRunner: a failing worker (out of memory) ends in FAILED with
advice and imports nothing; a finished run's review table survives saving and reloading the
scene. Need the Slicer application; not run in CI."""

from __future__ import annotations

import os
import sys
import tempfile

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from QGSegmentationWidgetTest import FakeRunner, build_tiny_scene  # noqa: E402

from QGSegmentationLib.slicer import jobs, scene_io  # noqa: E402
from QGSegmentationLib.slicer.state import RunState  # noqa: E402


class QGSegmentationLogicTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_out_of_memory_fails_with_advice()
        self.setUp()
        self.test_review_table_survives_scene_reload()

    def test_out_of_memory_fails_with_advice(self):
        import QGSegmentation as module
        logic = module.QGSegmentationLogic(
            runner_factory=lambda c, r, e, env: FakeRunner(c, r, e, env, fail_with="oom"))
        cases = build_tiny_scene()
        logic.startTraining(slicer.mrmlScene, cases, jobs.TrainingOptions(device="cpu"),
                            tempfile.mkdtemp(prefix="qgseg-logic-"))
        logic.runToCompletion(slicer.mrmlScene, timeout_s=60, interval_s=0)
        self.assertEqual(logic.state.state, RunState.FAILED)
        self.assertIn("smaller patch size", logic.state.failure_message)
        self.assertEqual(len(logic.review), 0)

    def test_review_table_survives_scene_reload(self):
        import QGSegmentation as module
        logic = module.QGSegmentationLogic(runner_factory=lambda c, r, e, env: FakeRunner(c, r, e, env))
        cases = build_tiny_scene()
        logic.startTraining(slicer.mrmlScene, cases, jobs.TrainingOptions(device="cpu"),
                            tempfile.mkdtemp(prefix="qgseg-logic-"))
        logic.runToCompletion(slicer.mrmlScene, timeout_s=60, interval_s=0)
        self.assertEqual(logic.state.state, RunState.IDLE, logic.state.failure_message)
        first = logic.review.rows()[0]
        logic.setReviewStatus(slicer.mrmlScene, first.case, "flagged", "boundary leaks")
        path = os.path.join(tempfile.mkdtemp(prefix="qgseg-scene-"), "review.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        reloaded = module.QGSegmentationLogic()
        reloaded.loadReviewFromScene(slicer.mrmlScene)
        row = reloaded.review.row(first.case)
        self.assertEqual((row.status, row.comment), ("flagged", "boundary leaks"))
        segmentation = slicer.mrmlScene.GetNodeByID(row.segmentation_id)
        self.assertEqual(set(scene_io.segment_statuses(segmentation).values()), {"flagged"})
