"""Error types and the exit codes the `qgseg` command line maps them to.

Exit codes are part of the worker protocol the Slicer panel relies on:
0 ok, 1 other failure, 2 bad input, 3 cancelled, 4 out of memory.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXIT_OUT_OF_MEMORY = 4


class QGSegError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = EXIT_FAILURE
    kind = "other"  # the `kind` field of an `error` event

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class DataError(QGSegError):
    """A bad input file or dataset description. The message names the file and the problem."""

    exit_code = EXIT_BAD_INPUT
    kind = "data"


class ConfigError(QGSegError):
    """An invalid option or configuration value."""

    exit_code = EXIT_BAD_INPUT
    kind = "data"


class RunFolderError(ConfigError):
    """The run folder holds another run (other networks, labels, g configuration, an ensemble),
    which this one cannot resume. Raised before anything is trained, so the folder's record of
    that earlier run (its manifest.json) is left as it is."""


class CancelledError(QGSegError):
    """The run saw its cancel file and stopped after saving a checkpoint."""

    exit_code = EXIT_CANCELLED
    kind = "cancelled"


class OutOfMemoryError(QGSegError):
    """The device ran out of memory."""

    exit_code = EXIT_OUT_OF_MEMORY
    kind = "oom"


class CudaUnavailableError(QGSegError):
    """`--device cuda` was asked for on a machine where torch sees no CUDA device."""

    exit_code = EXIT_BAD_INPUT
    kind = "cuda_unavailable"


def check_option_names(given, cls, source: str) -> None:
    """Raise ConfigError when the mapping `given` has keys that are not fields of dataclass `cls`,
    listing the valid ones (so a typo in a config file fails at once, naming the fix)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; "
                          f"valid options: {', '.join(sorted(names))}")


def check_option_types(given, cls, source: str) -> None:
    """Raise ConfigError when a value of the mapping `given` does not have the type its field of
    dataclass `cls` declares (a number, a whole number, true/false, text, a mapping, or None
    where the field allows it), or is a number that is not finite: `--set lr=abc` or `ssl: 3` in a
    config file fail here, naming the option, instead of deep inside training. Fields of other
    types (sizes, spacings, ranges) are checked by their own validators."""
    import dataclasses
    import math
    import types
    import typing

    hints = typing.get_type_hints(cls)
    unions = (typing.Union, getattr(types, "UnionType", typing.Union))  # Optional[X], X | None
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        value, wanted = given[f.name], hints[f.name]
        args = typing.get_args(wanted)
        optional = typing.get_origin(wanted) in unions and type(None) in args
        if optional:
            if value is None:
                continue
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                continue
            wanted = rest[0]
        origin = typing.get_origin(wanted) or wanted
        if origin is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            what = "a finite number"
        elif origin is int:
            ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif origin is bool:
            ok, what = isinstance(value, bool), "true or false"
        elif origin is str:
            ok, what = isinstance(value, str), "text"
        elif origin is dict:  # get_origin(Dict[str, Any]) is dict too
            ok, what = isinstance(value, dict), "a mapping (e.g. {name: value})"
        else:
            continue
        if not ok:
            raise ConfigError(f"{source}: option {f.name} must be {what}{' or null' if optional else ''}, "
                              f"not {value!r}")
