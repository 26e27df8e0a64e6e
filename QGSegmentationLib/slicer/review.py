"""Review model: one row per segmented case, sorted worst-first, with the reviewer's decisions.

Pure Python (the Review table widget and the MRML table node are views of it). Quality is the
quality predictor's estimated Dice per segment; a case's `quality` is its worst segment, because
one bad organ makes the case need attention. When the run had a second-opinion model, each row
also holds each segment's Dice against that model's segmentation (`second_opinion`, worst segment
in `agreement`), shown beside g's estimate. The order is the reviewer's choice (ORDERS): g's
estimate (the default; the second opinion stands in for rows g did not score, e.g. a model folder
without a quality predictor), the second opinion, the lower of the two, or their mean. On the 360
LA masks of BENCHMARKS.md section 7 the mean tracked the true Dice best overall (Pearson 0.93;
g 0.89, second opinion 0.91, lower of both 0.91); on the 264 masks of the 44 volumes that had
never been looked at before, the second opinion alone was better (0.96 vs 0.94).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence

from ..fileio import write_text_atomic
from .signal import Signal

STATUSES = ("unreviewed", "approved", "flagged")
FILTERS = ("all", "unreviewed", "flagged", "approved")
# Worst first by: g's estimate / the Dice against the second-opinion model / whichever is lower /
# the mean of the two.
ORDERS = ("quality", "2nd opinion", "lower of both", "mean of both")
CATEGORY_COLORS = {  # (r, g, b) 0..255 for table cells
    "poor": (230, 124, 115),
    "uncertain": (247, 203, 77),
    "good": (87, 187, 138),
    "unknown": (200, 200, 200),
}


@dataclass(frozen=True)
class Thresholds:
    """Quality below `low` is poor (flagged for attention), at or above `high` is good."""

    low: float = 0.7
    high: float = 0.85

    def __post_init__(self):
        if not (0.0 <= self.low <= self.high <= 1.0):
            raise ValueError(f"thresholds must satisfy 0 <= low <= high <= 1, got low={self.low}, "
                             f"high={self.high}")

    def category(self, quality: Optional[float]) -> str:
        """"poor", "uncertain", "good", or "unknown" when there is no score."""
        if quality is None or (isinstance(quality, float) and math.isnan(quality)):
            return "unknown"
        if quality < self.low:
            return "poor"
        if quality < self.high:
            return "uncertain"
        return "good"

    def color(self, quality: Optional[float]) -> tuple:
        return CATEGORY_COLORS[self.category(quality)]


@dataclass
class ReviewRow:
    case: str
    volume: str = ""            # volume node name (shown) ...
    volume_id: str = ""         # ... and ID (used to show it)
    segmentation: str = ""
    segmentation_id: str = ""
    scores: Dict[str, float] = field(default_factory=dict)  # segment name -> predicted quality
    status: str = "unreviewed"
    comment: str = ""
    run_id: str = ""
    second_opinion: Dict[str, float] = field(default_factory=dict)  # segment -> Dice against a second model

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"case {self.case!r}: status must be one of {STATUSES}, "
                             f"got {self.status!r}")

    @property
    def quality(self) -> Optional[float]:
        """The worst segment's predicted quality (None when the case has no score)."""
        return _worst(self.scores)

    @property
    def agreement(self) -> Optional[float]:
        """The worst segment's Dice against the second-opinion model (None without one)."""
        return _worst(self.second_opinion)


def _worst(values: Dict[str, float]) -> Optional[float]:
    present = [v for v in values.values() if v is not None and not math.isnan(v)]
    return min(present) if present else None


def read_scores_csv(path: str | os.PathLike) -> Dict[str, Dict[str, float]]:
    """Read the worker's scores.csv (columns case, segment, predicted_quality) into
    {case: {segment: quality}}. Raises ValueError naming the file and the bad line."""
    return _read_score_column(path, "predicted_quality", required=True)


def read_second_opinions(path: str | os.PathLike) -> Dict[str, Dict[str, float]]:
    """The optional second_opinion_dice column of scores.csv as {case: {segment: Dice}}
    ({} when the run had no second-opinion model)."""
    return _read_score_column(path, "second_opinion_dice", required=False)


def read_scores_and_second_opinions(path: str | os.PathLike) -> tuple:
    """({case: {segment: g's quality}}, {case: {segment: second-opinion Dice}}) from scores.csv;
    either may be empty (a run without g, or without a second opinion), not both."""
    seconds = read_second_opinions(path)
    return _read_score_column(path, "predicted_quality", required=not seconds), seconds


def _read_score_column(path, column: str, required: bool) -> Dict[str, Dict[str, float]]:
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or ())
            if not required and column not in fields:
                return {}
            missing = {"case", "segment", column} - fields
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            scores: Dict[str, Dict[str, float]] = {}
            for line_no, rec in enumerate(reader, start=2):
                try:
                    value = float(rec[column])
                except (TypeError, ValueError):
                    raise ValueError(f"{path} line {line_no}: {column} {rec[column]!r} is not a number") from None
                scores.setdefault(rec["case"], {})[rec["segment"]] = value
    except FileNotFoundError:
        raise ValueError(f"{path}: scores file not found") from None
    return scores


class ReviewModel:
    """Rows plus the reviewer's actions. `changed(case_or_None)` fires after every change."""

    def __init__(self, rows: Iterable[ReviewRow] = (), thresholds: Thresholds = Thresholds(),
                 order: str = "quality"):
        self._rows: Dict[str, ReviewRow] = {}
        self.thresholds = thresholds
        self.order = order
        self.changed = Signal("review changed")
        for row in rows:
            self.add(row, notify=False)

    # --- content -------------------------------------------------------------------------------
    def add(self, row: ReviewRow, notify: bool = True) -> None:
        """Add or replace the row of `row.case` (a new run of the same case replaces it)."""
        self._rows[row.case] = row
        if notify:
            self.changed.emit(row.case)

    def row(self, case: str) -> ReviewRow:
        try:
            return self._rows[case]
        except KeyError:
            raise KeyError(f"no review row for case {case!r}") from None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def order(self) -> str:
        return self._order

    @order.setter
    def order(self, order: str) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self._order = order

    def rows(self, filter: str = "all") -> List[ReviewRow]:
        """Rows passing `filter`, worst first by `order` (a row without the chosen value falls
        back on the other one; rows with neither come last, then by case)."""
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
        selected = [r for r in self._rows.values() if filter == "all" or r.status == filter]

        def key(row):
            value = self._order_value(row)
            return (value is None, value if value is not None else 0.0, row.case)

        return sorted(selected, key=key)

    def _order_value(self, row: ReviewRow) -> Optional[float]:
        present = [v for v in (row.quality, row.agreement) if v is not None]
        if self._order == "lower of both":
            return min(present, default=None)
        if self._order == "mean of both":
            return sum(present) / len(present) if present else None
        first, second = ((row.agreement, row.quality) if self._order == "2nd opinion"
                         else (row.quality, row.agreement))
        return first if first is not None else second

    def listed(self, case: Optional[str], filter: str = "all") -> Optional[str]:
        """`case` when the table filtered by `filter` lists it, else None. The panel keeps its
        current case only while it is listed, so Approve and Flag never act on a row that is not
        highlighted (or gone: the scene closed, another run replaced the rows)."""
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
        if case is None or case not in self._rows:
            return None
        return case if filter == "all" or self._rows[case].status == filter else None

    def segment_names(self, second_opinion: bool = False) -> List[str]:
        """Segments with a g score (with a second opinion when `second_opinion`), in first-seen order."""
        names: List[str] = []
        for row in self._rows.values():
            for name in (row.second_opinion if second_opinion else row.scores):
                if name not in names:
                    names.append(name)
        return names

    # --- progress ------------------------------------------------------------------------------
    def progress(self) -> tuple:
        """(reviewed, total): a row is reviewed once approved or flagged."""
        reviewed = sum(1 for r in self._rows.values() if r.status != "unreviewed")
        return reviewed, len(self._rows)

    def progress_text(self) -> str:
        k, n = self.progress()
        return f"reviewed {k}/{n}"

    # --- reviewer actions ----------------------------------------------------------------------
    def set_status(self, case: str, status: str, comment: Optional[str] = None) -> ReviewRow:
        row = self.row(case)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        row.status = status
        if comment is not None:
            row.comment = comment
        self.changed.emit(case)
        return row

    def approve(self, case: str, comment: Optional[str] = None) -> ReviewRow:
        return self.set_status(case, "approved", comment)

    def flag(self, case: str, comment: Optional[str] = None) -> ReviewRow:
        return self.set_status(case, "flagged", comment)

    def set_comment(self, case: str, comment: str) -> ReviewRow:
        row = self.row(case)
        row.comment = comment
        self.changed.emit(case)
        return row

    def approved_references(self) -> Dict[str, str]:
        """{volume node ID: segmentation node ID} of the approved cases: reviewed results that can
        serve as reference segmentations, making those volumes labeled cases of the next training."""
        return {r.volume_id: r.segmentation_id for r in self.rows("approved") if r.volume_id and r.segmentation_id}

    def next_unreviewed(self, after: Optional[str] = None) -> Optional[ReviewRow]:
        """The next unreviewed row in the table's order after `after` (wrapping around);
        None when every row is reviewed."""
        ordered = self.rows("all")
        start = 0
        if after is not None:
            cases = [r.case for r in ordered]
            if after in cases:
                start = cases.index(after) + 1
        for row in ordered[start:] + ordered[:start]:
            if row.status == "unreviewed" and row.case != after:
                return row
        return None

    def suggested_flags(self) -> List[str]:
        """Cases whose quality is below the low threshold (the ones to look at first)."""
        return [r.case for r in self.rows() if self.thresholds.category(r.quality) == "poor"]

    # --- export --------------------------------------------------------------------------------
    def to_csv_text(self) -> str:
        segments, seconds = self.segment_names(), self.segment_names(second_opinion=True)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["case", "volume", "segmentation", "quality", "category",
                         *[f"quality_{s}" for s in segments], *[f"second_opinion_{s}" for s in seconds],
                         "status", "comment", "run_id"])
        cell = lambda values, s: "" if s not in values else f"{values[s]:.4f}"  # noqa: E731
        for r in self.rows("all"):
            q = r.quality
            writer.writerow([r.case, r.volume, r.segmentation, "" if q is None else f"{q:.4f}",
                             self.thresholds.category(q), *[cell(r.scores, s) for s in segments],
                             *[cell(r.second_opinion, s) for s in seconds], r.status, r.comment, r.run_id])
        return out.getvalue()

    def export_csv(self, path: str | os.PathLike) -> str:
        """Write all rows (worst-first) to `path` atomically; returns the path."""
        write_text_atomic(path, self.to_csv_text())
        return os.fspath(path)

    def replace_rows(self, rows: Sequence[ReviewRow]) -> None:
        self._rows = {r.case: replace(r) for r in rows}
        self.changed.emit(None)
