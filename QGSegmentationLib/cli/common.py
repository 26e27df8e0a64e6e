"""What every long-running `qgseg` command shares: run folder, events, manifest, exit codes.

`run_with_events(args, body)` emits `start`, keeps a heartbeat going, calls `body(ctx)`, then
emits exactly one `done` and maps failures to the protocol's exit codes and error kinds:
DataError/ConfigError -> 2 (kind data), cancel -> 3, out of memory -> 4 (kind oom), other -> 1.

Under torchrun (WORLD_SIZE > 1) only rank 0 writes events, progress bars and messages; every rank
needs the same explicit --run-dir, and the process group is left at the end of the command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..engine import distributed
from ..engine.cancel import remove_stale_cancel
from ..engine.events import EventWriter
from ..errors import (EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, EXIT_OK, EXIT_OUT_OF_MEMORY,
                      CancelledError, ConfigError, OutOfMemoryError, QGSegError)

#: When this process started (near enough: when the CLI was imported). A run folder's CANCEL file
#: older than this was left by an earlier, cancelled run; one written since asks this run to stop.
PROCESS_STARTED = time.time()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the hand-made line breaks of descriptions and examples.

    Options whose default comes from the training config are declared with ``default=None`` and
    name the real default in their help (``[3d]``); printing "(default: None)" after them would
    contradict it, so a default is shown only when it says something: not None, not the False of
    a flag, not an empty list, and not already in the help text.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Re-wrap prose paragraphs too wide for the terminal; keep the rest exactly as written.

        Indented lines (examples, lists) are never touched. Prose is split into paragraphs at
        blank and indented lines and after a line ending in "." or ":", the hand-made breaks; a
        paragraph with a line wider than the terminal is joined and wrapped as a whole, so a
        narrow terminal shows even lines instead of one long and one short line per source line.
        """
        out = []
        for paragraph in _prose_paragraphs(text.splitlines()):
            if len(paragraph) == 1 and (not paragraph[0] or paragraph[0][:1].isspace()):
                out.append(indent + paragraph[0] if paragraph[0] else "")
            elif max(len(line) for line in paragraph) > width:
                out.extend(textwrap.wrap(" ".join(paragraph), width, initial_indent=indent,
                                         subsequent_indent=indent))
            else:
                out.extend(indent + line for line in paragraph)
        return "\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _says_nothing(action.default) or "default" in text:
            return text
        return super()._get_help_string(action)


def _prose_paragraphs(lines):
    """Group lines: consecutive prose lines form one paragraph; blank and indented lines stand alone."""
    paragraph = []
    for line in lines:
        if not line.strip() or line[:1].isspace():
            if paragraph:
                yield paragraph
                paragraph = []
            yield [line if line.strip() else ""]
            continue
        paragraph.append(line)
        if line.rstrip().endswith((".", ":")):
            yield paragraph
            paragraph = []
    if paragraph:
        yield paragraph


def print_error(exc: QGSegError, prefix: str = "error") -> int:
    """`qgseg: error: message` (and its hint) on stderr; returns the error's exit code."""
    print(f"qgseg: {prefix}: {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
    return exc.exit_code


def command_line(args: argparse.Namespace) -> list:
    """The command as typed, `["qgseg", ...]`, for manifests: rerunning it reproduces the run."""
    return ["qgseg", *getattr(args, "argv", sys.argv[1:])]


def _says_nothing(default: Any) -> bool:
    """None, a flag's False, an empty list, or argparse.SUPPRESS (identity: 0 is a real default)."""
    return default is None or default is False or default is argparse.SUPPRESS or default == []


def add_run_options(parser: argparse.ArgumentParser, run_dir_default: Optional[str] = None,
                    run_dir_default_text: str = "a new runs/<command>-<time>/ in the working folder") -> None:
    group = parser.add_argument_group("run and progress reporting")
    group.add_argument("--run-dir", default=run_dir_default,
                       help="folder for this run's outputs, checkpoints, events and manifest.json"
                            + ("" if run_dir_default else f" (default: {run_dir_default_text})"))
    group.add_argument("--events", metavar="FILE",
                       help="also write JSON-lines progress events to FILE (the Slicer panel reads these)")
    group.add_argument("--json", action="store_true",
                       help="write JSON-lines events to stdout instead of a progress bar")
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                       help="where to compute; auto picks CUDA when torch sees a GPU")
    group.add_argument("--quiet", action="store_true", help="no progress bars")


@dataclass
class RunContext:
    command: str
    run_dir: Path
    events: EventWriter
    show_progress: bool
    started: float = field(default_factory=time.time)
    outputs: Dict[str, Any] = field(default_factory=dict)
    #: The folders this call created for a default run folder, the run folder first: removed again
    #: when the command is refused for bad input, so a typo leaves nothing behind.
    created_dirs: List[Path] = field(default_factory=list)

    def say(self, text: str) -> None:
        """Human-readable output: to stdout normally, to stderr when stdout carries JSON events
        (rank 0 only under torchrun)."""
        if self.is_main:
            print(text, file=sys.stderr if self._json else sys.stdout, flush=True)

    _json: bool = False
    is_main: bool = True


def make_context(args: argparse.Namespace, command: str, default_run_dir: Optional[str] = None) -> RunContext:
    """The run's context. Without --run-dir the run folder is `default_run_dir` when the command
    has a natural one (predict: its --output), else a new runs/<command>-<time>/."""
    launch = distributed.launch_env()
    if launch.distributed and not args.run_dir:
        raise ConfigError(f"under torchrun (WORLD_SIZE={launch.world_size}) pass --run-dir: every rank "
                          "must use the same run folder")
    default = f"{command.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"  # no spaces in paths
    run_dir = Path(args.run_dir or default_run_dir or Path("runs") / default)
    run_id = f"{command}-{uuid.uuid4().hex[:8]}"
    if launch.is_main:  # before the run folder: a refused --events leaves nothing behind
        try:
            events = EventWriter.open(args.events, to_stdout=bool(getattr(args, "json", False)), run_id=run_id)
        except OSError as exc:  # a folder of that name, no permission
            raise ConfigError(f"--events {args.events}: cannot write it ({exc.strerror or exc})",
                              hint="name a file, e.g. --events run_events.jsonl") from None
    else:  # other ranks report nothing: one event stream per run
        events = EventWriter(run_id=run_id)
    created = [] if args.run_dir else _missing_folders(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file where a folder should be
        events.close()
        raise ConfigError(f"{run_dir}: cannot create the run folder ({exc.strerror or exc})",
                          hint="name a folder with --run-dir") from None
    ctx = RunContext(command=command, run_dir=run_dir, events=events,
                     show_progress=launch.is_main and not (args.json or args.quiet),
                     created_dirs=created)
    ctx._json = bool(args.json)
    ctx.is_main = launch.is_main
    if launch.is_main:
        events.echo = show_on_terminal
    return ctx


def _missing_folders(folder: Path) -> List[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_if_untouched(folders: List[Path]) -> None:
    """Remove the folders a refused run created (deepest first, the run folder itself first) with
    what the run wrote there before it was refused: its records (manifest, split, plan), data it
    generated, partial outputs. A run folder holding a checkpoint stays: a run refused after it
    began training (say, one that diverged) keeps what it trained."""
    if not folders or any(folders[0].rglob("*.pt")):
        return
    shutil.rmtree(folders[0], ignore_errors=True)
    for folder in folders[1:]:
        try:
            folder.rmdir()  # fails, and so keeps the folder, when anything else is in it
        except OSError:
            break


def show_on_terminal(text: str) -> None:
    """A line for the person at the terminal, on stderr (stdout may carry JSON events), printed
    above any progress bar instead of through it."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def run_with_events(args: argparse.Namespace, command: str, body: Callable[[RunContext], Dict[str, Any]],
                    default_run_dir: Optional[str] = None) -> int:
    try:
        ctx = make_context(args, command, default_run_dir)
    except QGSegError as exc:  # no run folder or event stream yet: report on stderr only
        return print_error(exc)
    ctx.events.emit("start", command=command, argv=command_line(args)[1:], pid=os.getpid(), run_dir=str(ctx.run_dir))
    ctx.events.heartbeat_thread()
    if ctx.is_main:
        stale = remove_stale_cancel(ctx.run_dir, PROCESS_STARTED)
        if stale is not None:
            ctx.events.warning(f"removed {stale}, left by an earlier cancelled run")
    code, status = EXIT_OK, "ok"
    try:
        outputs = body(ctx) or {}
        ctx.outputs.update({k: str(v) for k, v in outputs.items()})
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a training loop
        code, status = EXIT_CANCELLED, "cancelled"
        ctx.events.emit("error", kind="cancelled", message="interrupted", hint=None)
        print_error(CancelledError("interrupted by Ctrl-C", hint="rerun the same command to resume "
                                   "from the last checkpoint, if the run had saved one"), "cancelled")
    except BaseException as exc:  # noqa: BLE001 - every failure must end the stream properly
        code, status = _report_failure(ctx, exc)
    finally:
        if ctx.is_main:
            if code == EXIT_BAD_INPUT and not args.run_dir:
                _remove_if_untouched(ctx.created_dirs)  # refused: no record in a folder nobody named
            else:  # a folder named with --run-dir records its failures too
                _ensure_manifest(ctx, args, status)
        ctx.events.emit("done", status=status, exit_code=code, outputs=ctx.outputs,
                        wall_s=round(time.time() - ctx.started, 2))
        ctx.events.close()
        if code in (EXIT_OK, EXIT_CANCELLED):  # all ranks got here; after a failure torchrun
            distributed.shutdown()              # tears the other ranks down itself
    return code


def _ensure_manifest(ctx: RunContext, args: argparse.Namespace, status: str) -> None:
    """Every run folder gets a manifest.json: commands that train write their own (with the
    resolved config); for the others it records the command line's options. A manifest another
    command left in the folder (say, scores written into a training run's folder) is kept."""
    import json

    from ..engine.manifest import write_manifest

    path = ctx.run_dir / "manifest.json"
    if path.exists():
        if path.stat().st_mtime >= ctx.started - 1.0:
            return  # written by this run
        try:
            previous = json.loads(path.read_text()).get("command", [])
        except (OSError, ValueError, AttributeError):
            previous = []
        words = ctx.command.replace("-", " ").split()  # "quality score" -> qgseg quality score ...
        if previous[:1 + len(words)] != ["qgseg", *words]:
            return  # another command's record (say, the training of the g that scores here)
    options = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else
                   [str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
               for k, v in vars(args).items() if not callable(v) and k != "argv"}
    try:
        write_manifest(ctx.run_dir, command=command_line(args), config=options,
                       device=str(getattr(args, "device", "")), seed=getattr(args, "seed", None),
                       started=ctx.started, status=status)
    except OSError as exc:  # a run that failed for want of disk space still ends its event stream
        ctx.events.warning(f"could not write {path}: {exc}")


def _report_failure(ctx: RunContext, exc: BaseException):
    from ..engine.device import is_oom

    if isinstance(exc, SystemExit):
        raise exc
    if not isinstance(exc, QGSegError) and _torch_loaded() and is_oom(exc):
        exc = OutOfMemoryError(f"out of memory: {str(exc).splitlines()[0][:200]}",
                               hint="use a smaller patch size or batch size, or --device cpu")
    if isinstance(exc, QGSegError):
        status = "cancelled" if isinstance(exc, CancelledError) else "failed"
        ctx.events.emit("error", kind=exc.kind, message=exc.message, hint=exc.hint)
        return print_error(exc, "cancelled" if status == "cancelled" else "error"), status
    ctx.events.emit("error", kind="other", message=f"{type(exc).__name__}: {exc}", hint="see the log for the traceback")
    traceback.print_exc()
    return EXIT_FAILURE, "failed"


def _torch_loaded() -> bool:
    return "torch" in sys.modules


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, QGSegError):
        return exc.exit_code
    return EXIT_OUT_OF_MEMORY if isinstance(exc, MemoryError) else EXIT_FAILURE
