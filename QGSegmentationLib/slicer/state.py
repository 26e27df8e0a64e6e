"""The panel's run state machine, in pure Python so it is unit-tested without Qt.

    IDLE -> PREPARING -> TRAINING -> PREDICTING -> IMPORTING -> IDLE
    any running state -> CANCELLING -> IDLE        (nothing from the run is imported)
    any running state -> FAILED -> IDLE | PREPARING

`PanelStateMachine.controls(inputs)` answers what the widget must show in a state: the one
primary button (Train, or Cancel while running), whether each action is enabled and, when it
is not, a tooltip that says why. The widget only copies these values into Qt widgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, FrozenSet, List, Optional

from .signal import Signal


class RunState(str, Enum):
    IDLE = "idle"
    PREPARING = "preparing"
    TRAINING = "training"
    PREDICTING = "predicting"
    IMPORTING = "importing"
    CANCELLING = "cancelling"
    FAILED = "failed"


RUNNING_STATES: FrozenSet[RunState] = frozenset(
    {RunState.PREPARING, RunState.TRAINING, RunState.PREDICTING, RunState.IMPORTING})

TRANSITIONS: Dict[RunState, FrozenSet[RunState]] = {
    RunState.IDLE: frozenset({RunState.PREPARING}),
    # "Segment selected" skips training; a train-only run with nothing to segment goes to IDLE.
    RunState.PREPARING: frozenset({RunState.TRAINING, RunState.PREDICTING, RunState.CANCELLING,
                                   RunState.FAILED}),
    RunState.TRAINING: frozenset({RunState.PREDICTING, RunState.IDLE, RunState.CANCELLING,
                                  RunState.FAILED}),
    RunState.PREDICTING: frozenset({RunState.IMPORTING, RunState.CANCELLING, RunState.FAILED}),
    # Importing runs in the GUI thread in one go; it cannot be cancelled half-way.
    RunState.IMPORTING: frozenset({RunState.IDLE, RunState.FAILED}),
    RunState.CANCELLING: frozenset({RunState.IDLE, RunState.FAILED}),
    RunState.FAILED: frozenset({RunState.IDLE, RunState.PREPARING}),
}

STATE_LABELS: Dict[RunState, str] = {
    RunState.IDLE: "Ready",
    RunState.PREPARING: "Preparing data",
    RunState.TRAINING: "Training",
    RunState.PREDICTING: "Segmenting and scoring",
    RunState.IMPORTING: "Importing results",
    RunState.CANCELLING: "Cancelling",
    RunState.FAILED: "Failed",
}


class InvalidTransition(RuntimeError):
    """A state change the panel must never make (a bug in the caller)."""


@dataclass(frozen=True)
class PanelInputs:
    """What the panel knows about its inputs, counted by the widget from the Cases table."""

    n_labeled: int = 0                  # rows with role "labeled" (selected)
    n_labeled_without_reference: int = 0  # of those, rows with no reference segmentation
    n_unlabeled: int = 0                # rows with role "unlabeled" (selected)
    n_selected: int = 0                 # rows selected for "Segment selected"
    has_model: bool = False             # a trained or loaded model is available
    output_folder: str = ""
    dependencies_ok: bool = True
    dependencies_message: str = ""


@dataclass(frozen=True)
class Controls:
    """The enabled state, text and tooltip of every action the state decides."""

    state_label: str
    primary_text: str                   # "Train" or "Cancel"
    primary_enabled: bool
    primary_tooltip: str
    primary_is_cancel: bool
    segment_enabled: bool
    segment_tooltip: str
    inputs_enabled: bool                # cases table, training options, models and environment sections
    review_enabled: bool
    progress_visible: bool


def train_blockers(inputs: PanelInputs) -> List[str]:
    """Reasons Train cannot start, most fundamental first (empty when it can)."""
    reasons = []
    if not inputs.dependencies_ok:
        reasons.append(inputs.dependencies_message
                       or "Dependencies are missing: open the Environment section to install them.")
    if inputs.n_labeled == 0:
        reasons.append("Mark at least two volumes as 'labeled' in the Cases table.")
    elif inputs.n_labeled == 1:
        reasons.append("Mark a second volume as 'labeled': one trains the segmenter, the other chooses "
                       "its checkpoint.")
    if inputs.n_labeled_without_reference:
        n = inputs.n_labeled_without_reference
        reasons.append(f"{n} labeled volume{'s have' if n > 1 else ' has'} no reference "
                       "segmentation: choose one in the Cases table or set the role to 'unlabeled'.")
    if not inputs.output_folder.strip():
        reasons.append("Choose an output folder in the Training section.")
    return reasons


def segment_blockers(inputs: PanelInputs) -> List[str]:
    """Reasons "Segment selected" cannot start (empty when it can)."""
    reasons = []
    if not inputs.dependencies_ok:
        reasons.append(inputs.dependencies_message
                       or "Dependencies are missing: open the Environment section to install them.")
    if not inputs.has_model:
        reasons.append("No model yet: train one or load a model folder in the Models section.")
    if inputs.n_selected == 0:
        reasons.append("Select at least one volume in the Cases table.")
    if not inputs.output_folder.strip():
        reasons.append("Choose an output folder in the Training section.")
    return reasons


class PanelStateMachine:
    """Current run state plus the rules for leaving it. `changed(old, new)` fires on each move."""

    def __init__(self) -> None:
        self.state = RunState.IDLE
        self.failure_message: Optional[str] = None
        self.changed = Signal("state changed")

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES or self.state is RunState.CANCELLING

    def can_transition(self, new: RunState) -> bool:
        return RunState(new) in TRANSITIONS[self.state]

    def transition(self, new: RunState, message: Optional[str] = None) -> None:
        """Move to `new`; raise InvalidTransition for a move the diagram does not allow.
        `message` is kept as the failure message when `new` is FAILED."""
        new = RunState(new)
        if not self.can_transition(new):
            raise InvalidTransition(f"cannot go from {self.state.value} to {new.value}")
        old, self.state = self.state, new
        self.failure_message = message if new is RunState.FAILED else None
        self.changed.emit(old, new)

    def request_cancel(self) -> bool:
        """Go to CANCELLING if something is running; returns whether it did."""
        if self.state in RUNNING_STATES and self.can_transition(RunState.CANCELLING):
            self.transition(RunState.CANCELLING)
            return True
        return False

    def worker_cancelled(self) -> None:
        """A worker ended as cancelled: back to IDLE, through CANCELLING when the panel did not ask
        (a CANCEL file made by hand, Ctrl-C in its terminal): a stop while segmenting too."""
        if self.state is not RunState.CANCELLING:
            self.transition(RunState.CANCELLING)
        self.transition(RunState.IDLE)

    def controls(self, inputs: PanelInputs) -> Controls:
        state = self.state
        label = STATE_LABELS[state]
        if state is RunState.FAILED and self.failure_message:
            label = f"Failed: {self.failure_message}"
        if state in RUNNING_STATES:
            cancellable = state is not RunState.IMPORTING
            return Controls(
                state_label=label, primary_text="Cancel", primary_is_cancel=True,
                primary_enabled=cancellable,
                primary_tooltip=("Stop the run; nothing from it is imported." if cancellable
                                 else "Results are being imported; this takes a moment."),
                segment_enabled=False, segment_tooltip="A run is in progress.",
                inputs_enabled=False, review_enabled=False, progress_visible=True)
        if state is RunState.CANCELLING:
            return Controls(
                state_label=label, primary_text="Cancelling...", primary_is_cancel=True,
                primary_enabled=False,
                primary_tooltip="Waiting for the worker to stop (it is killed after a grace period).",
                segment_enabled=False, segment_tooltip="A run is being cancelled.",
                inputs_enabled=False, review_enabled=False, progress_visible=True)
        train_why = train_blockers(inputs)
        segment_why = segment_blockers(inputs)
        return Controls(
            state_label=label, primary_text="Train", primary_is_cancel=False,
            primary_enabled=not train_why,
            primary_tooltip=("Train a quality-guided model on the labeled and unlabeled volumes, "
                             "then segment and score the unlabeled ones."
                             if not train_why else "Train is disabled: " + " ".join(train_why)),
            segment_enabled=not segment_why,
            segment_tooltip=("Segment and score the selected volumes with the current model."
                             if not segment_why else "Disabled: " + " ".join(segment_why)),
            inputs_enabled=True, review_enabled=True,
            progress_visible=state is RunState.FAILED)
