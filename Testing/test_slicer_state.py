"""Panel state machine (pure Python): transitions, the one primary button, tooltips saying why."""

from __future__ import annotations

import pytest

from QGSegmentationLib.slicer.signal import Signal
from QGSegmentationLib.slicer.state import (InvalidTransition, PanelInputs, PanelStateMachine,
                                            RunState, TRANSITIONS)

READY = PanelInputs(n_labeled=2, n_unlabeled=3, n_selected=3, has_model=True, output_folder="/tmp/out")


def test_full_training_cycle_and_signal():
    machine = PanelStateMachine()
    seen = []
    machine.changed.connect(lambda old, new: seen.append((old, new)))
    path = [RunState.PREPARING, RunState.TRAINING, RunState.PREDICTING, RunState.IMPORTING, RunState.IDLE]
    for state in path:
        machine.transition(state)
    assert [new for _, new in seen] == path and seen[0][0] is RunState.IDLE


@pytest.mark.parametrize("state", [RunState.PREPARING, RunState.TRAINING, RunState.PREDICTING])
def test_cancel_from_every_cancellable_state(state):
    machine = PanelStateMachine()
    machine.transition(RunState.PREPARING)
    if state is not RunState.PREPARING:
        machine.transition(state if state is RunState.TRAINING else RunState.PREDICTING)
    assert machine.request_cancel()
    assert machine.state is RunState.CANCELLING
    controls = machine.controls(READY)
    assert controls.primary_is_cancel and not controls.primary_enabled and not controls.inputs_enabled
    machine.transition(RunState.IDLE)
    assert not machine.request_cancel()  # nothing running


def test_invalid_transitions_raise():
    machine = PanelStateMachine()
    with pytest.raises(InvalidTransition, match="idle to training"):
        machine.transition(RunState.TRAINING)
    machine.transition(RunState.PREPARING)
    machine.transition(RunState.PREDICTING)
    machine.transition(RunState.IMPORTING)
    assert not machine.can_transition(RunState.CANCELLING)  # importing is not cancellable
    assert not machine.request_cancel()
    # Every state can eventually get back to IDLE.
    for state, targets in TRANSITIONS.items():
        assert targets, state


def test_failure_keeps_message_and_allows_retry():
    machine = PanelStateMachine()
    machine.transition(RunState.PREPARING)
    machine.transition(RunState.TRAINING)
    machine.transition(RunState.FAILED, "out of memory")
    controls = machine.controls(READY)
    assert controls.state_label == "Failed: out of memory"
    assert controls.primary_text == "Train" and controls.primary_enabled and controls.inputs_enabled
    machine.transition(RunState.PREPARING)
    assert machine.failure_message is None


def test_running_controls_one_primary_button_becomes_cancel():
    machine = PanelStateMachine()
    idle = machine.controls(READY)
    assert (idle.primary_text, idle.primary_enabled, idle.primary_is_cancel) == ("Train", True, False)
    assert idle.segment_enabled and idle.review_enabled
    machine.transition(RunState.PREPARING)
    machine.transition(RunState.TRAINING)
    running = machine.controls(READY)
    assert (running.primary_text, running.primary_enabled, running.primary_is_cancel) == ("Cancel", True, True)
    assert not running.segment_enabled and not running.inputs_enabled and running.progress_visible
    machine.transition(RunState.PREDICTING)
    machine.transition(RunState.IMPORTING)
    importing = machine.controls(READY)
    assert importing.primary_text == "Cancel" and not importing.primary_enabled


@pytest.mark.parametrize("inputs, phrase", [
    (PanelInputs(output_folder="/o"), "Mark at least two volumes as 'labeled'"),
    (PanelInputs(n_labeled=1, output_folder="/o"), "Mark a second volume as 'labeled'"),  # none would validate
    (PanelInputs(n_labeled=2, n_labeled_without_reference=1, output_folder="/o"), "1 labeled volume has no reference"),
    (PanelInputs(n_labeled=3, n_labeled_without_reference=2, output_folder="/o"), "2 labeled volumes have no reference"),
    (PanelInputs(n_labeled=2, output_folder="  "), "Choose an output folder"),
    (PanelInputs(n_labeled=2, output_folder="/o", dependencies_ok=False), "Dependencies are missing"),
])
def test_train_tooltip_says_why_disabled(inputs, phrase):
    controls = PanelStateMachine().controls(inputs)
    assert not controls.primary_enabled
    assert controls.primary_tooltip.startswith("Train is disabled:") and phrase in controls.primary_tooltip


def test_segment_tooltip_says_why_disabled():
    controls = PanelStateMachine().controls(PanelInputs(n_labeled=2, output_folder="/o"))
    assert controls.primary_enabled and not controls.segment_enabled
    assert "No model yet" in controls.segment_tooltip and "Select at least one volume" in controls.segment_tooltip


def test_signal_connect_disconnect_and_errors():
    signal, calls = Signal("s"), []
    slot = signal.connect(lambda *a, **k: calls.append((a, k)))
    signal.connect(slot)  # idempotent
    signal.emit(1, x=2)
    assert calls == [((1,), {"x": 2})] and len(signal) == 1
    signal.disconnect(slot)
    signal(3)
    assert len(calls) == 1
    with pytest.raises(TypeError, match="not callable"):
        signal.connect(42)


@pytest.mark.parametrize("state", [RunState.TRAINING, RunState.PREDICTING])
@pytest.mark.parametrize("panel_asked", [True, False])
def test_a_worker_that_ends_cancelled_returns_the_panel_to_ready(state, panel_asked):
    """Whether the panel's Cancel stopped the worker or something else did (a CANCEL file made by
    hand, Ctrl-C in its terminal), the panel goes back to Ready, also while segmenting, where
    going straight to IDLE is not a transition."""
    machine = PanelStateMachine()
    machine.transition(RunState.PREPARING)
    machine.transition(state)
    if panel_asked:
        machine.request_cancel()
    machine.worker_cancelled()
    assert machine.state is RunState.IDLE
