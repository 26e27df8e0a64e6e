"""A tiny pure-Python signal: logic -> UI notifications without custom PythonQt signals.

Custom PythonQt signals are fragile (they need a QObject subclass with the right metaclass);
a list of callables is enough for logic objects that live outside Qt and are unit-tested.
"""

from __future__ import annotations

from typing import Any, Callable, List


class Signal:
    """Holds slots (callables) and calls each of them on `emit`, in connection order.

    Connecting the same slot twice has no effect; disconnecting an unknown slot is a no-op."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._slots: List[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(slot):
            raise TypeError(f"signal {self.name or '?'}: slot {slot!r} is not callable")
        if slot not in self._slots:
            self._slots.append(slot)
        return slot

    def disconnect(self, slot: Callable[..., Any] | None = None) -> None:
        """Remove one slot, or every slot when called without one."""
        if slot is None:
            self._slots.clear()
        elif slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args: Any, **kwargs: Any) -> None:
        for slot in list(self._slots):  # a slot may disconnect itself while we iterate
            slot(*args, **kwargs)

    __call__ = emit

    def __len__(self) -> int:
        return len(self._slots)
