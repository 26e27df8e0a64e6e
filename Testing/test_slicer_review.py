"""Review model (pure Python): worst-first order, filters, progress, actions, CSV export."""

from __future__ import annotations

import csv
import math

import pytest

from QGSegmentationLib.slicer.review import (ReviewModel, ReviewRow, Thresholds, read_scores_and_second_opinions,
                                             read_scores_csv, read_second_opinions)


def model():
    rows = [ReviewRow("a", scores={"organ": 0.9, "lesion": 0.6}),   # worst 0.6
            ReviewRow("b", scores={"organ": 0.95}),                   # 0.95
            ReviewRow("c", scores={"organ": 0.75, "lesion": 0.8}),   # 0.75
            ReviewRow("d", scores={}),                                # unscored: last
            ReviewRow("e", scores={"organ": 0.3})]                    # 0.3
    return ReviewModel(rows, Thresholds(low=0.7, high=0.85))


def test_worst_first_and_unscored_last():
    m = model()
    assert [r.case for r in m.rows()] == ["e", "a", "c", "b", "d"]
    assert m.row("a").quality == 0.6 and m.row("d").quality is None
    assert m.suggested_flags() == ["e", "a"]
    assert m.segment_names() == ["organ", "lesion"]


def test_thresholds_categories_and_validation():
    t = Thresholds(0.7, 0.85)
    assert [t.category(q) for q in (0.69, 0.7, 0.849, 0.85, None, math.nan)] == [
        "poor", "uncertain", "uncertain", "good", "unknown", "unknown"]
    assert t.color(0.1) != t.color(0.99)
    with pytest.raises(ValueError, match="low <= high"):
        Thresholds(0.9, 0.5)


def test_actions_filters_progress_and_signal():
    m = model()
    events = []
    m.changed.connect(events.append)
    assert m.progress_text() == "reviewed 0/5"
    m.approve("b")
    m.flag("e", "leaks into liver")
    assert events == ["b", "e"]
    assert m.progress() == (2, 5) and m.progress_text() == "reviewed 2/5"
    assert [r.case for r in m.rows("approved")] == ["b"]
    assert [r.case for r in m.rows("flagged")] == ["e"] and m.row("e").comment == "leaks into liver"
    assert [r.case for r in m.rows("unreviewed")] == ["a", "c", "d"]
    m.set_comment("a", "check apex")
    assert m.row("a").comment == "check apex"
    with pytest.raises(ValueError, match="filter"):
        m.rows("mine")
    with pytest.raises(ValueError, match="status"):
        m.set_status("a", "done")
    with pytest.raises(KeyError, match="zzz"):
        m.approve("zzz")


def test_approved_cases_offer_their_segmentations_as_references():
    m = ReviewModel([ReviewRow("a", volume_id="vA", segmentation_id="sA", scores={"organ": 0.9}),
                     ReviewRow("b", volume_id="vB", segmentation_id="sB", scores={"organ": 0.4}),
                     ReviewRow("c", volume_id="vC", segmentation_id="sC", scores={"organ": 0.8})])
    assert m.approved_references() == {}
    m.approve("a")
    m.flag("b")
    m.approve("c")
    assert m.approved_references() == {"vA": "sA", "vC": "sC"}  # flagged and unreviewed ones stay out
    m.set_status("c", "unreviewed")
    assert m.approved_references() == {"vA": "sA"}


def test_next_unreviewed_wraps_and_ends():
    m = model()
    assert m.next_unreviewed().case == "e"
    assert m.next_unreviewed("e").case == "a"
    assert m.next_unreviewed("d").case == "e"  # wraps around
    for case in "abcde":
        m.approve(case)
    assert m.next_unreviewed("a") is None


def test_export_csv_atomic_and_complete(tmp_path):
    m = model()
    m.flag("a", 'says "hi", twice')
    path = tmp_path / "sub" / "review.csv"
    m.export_csv(path)
    rows = list(csv.DictReader(path.open()))
    assert [r["case"] for r in rows] == ["e", "a", "c", "b", "d"]
    assert rows[1]["comment"] == 'says "hi", twice' and rows[1]["status"] == "flagged"
    assert rows[1]["quality"] == "0.6000" and rows[1]["category"] == "poor"
    assert rows[1]["quality_lesion"] == "0.6000" and rows[3]["quality_lesion"] == ""
    assert rows[4]["category"] == "unknown"
    assert [p.name for p in path.parent.iterdir()] == ["review.csv"]  # no temporary left


def test_second_opinion_is_read_shown_and_exported_beside_g(tmp_path):
    scores = tmp_path / "scores.csv"
    scores.write_text("case,segment,label,predicted_quality,second_opinion_dice\n"
                      "A,organ,1,0.81,0.9\nA,lesion,2,0.4,0.35\nB,organ,1,0.9,0.7\n")
    seconds = read_second_opinions(scores)
    assert seconds == {"A": {"organ": 0.9, "lesion": 0.35}, "B": {"organ": 0.7}}
    m = ReviewModel([ReviewRow(c, scores=q, second_opinion=seconds[c]) for c, q in read_scores_csv(scores).items()])
    assert [r.case for r in m.rows()] == ["A", "B"]  # ordered by g, not by the second opinion
    assert m.row("A").agreement == 0.35 and ReviewRow("C").agreement is None
    rows = list(csv.DictReader(m.to_csv_text().splitlines()))
    assert rows[0]["second_opinion_lesion"] == "0.3500" and rows[1]["second_opinion_lesion"] == ""
    plain = tmp_path / "plain.csv"
    plain.write_text("case,segment,predicted_quality\nA,organ,0.81\n")
    assert read_second_opinions(plain) == {}
    assert "second_opinion" not in ReviewModel([ReviewRow("A", scores={"organ": 0.8})]).to_csv_text()
    assert read_scores_and_second_opinions(scores) == (read_scores_csv(scores), seconds)
    assert read_scores_and_second_opinions(plain) == ({"A": {"organ": 0.81}}, {})
    without_g = tmp_path / "without_g.csv"  # a model folder without quality.pt, with a second opinion
    without_g.write_text("case,segment,label,second_opinion_dice\nA,organ,1,0.9\n")
    assert read_scores_and_second_opinions(without_g) == ({}, {"A": {"organ": 0.9}})
    only_second = ReviewModel([ReviewRow("x", second_opinion={"organ": 0.9}), ReviewRow("y"),
                               ReviewRow("z", second_opinion={"organ": 0.5})])
    assert [r.case for r in only_second.rows()] == ["z", "x", "y"]  # worst first by the second opinion
    bad = tmp_path / "bad.csv"
    bad.write_text("case,segment,predicted_quality,second_opinion_dice\nA,organ,0.8,n/a\n")
    with pytest.raises(ValueError, match="bad.csv line 2: second_opinion_dice"):
        read_second_opinions(bad)


def test_read_scores_csv(tmp_path):
    good = tmp_path / "scores.csv"
    good.write_text("case,segment,predicted_quality\nA,organ,0.81\nA,lesion,0.4\nB,organ,0.9\n")
    assert read_scores_csv(good) == {"A": {"organ": 0.81, "lesion": 0.4}, "B": {"organ": 0.9}}
    bad = tmp_path / "bad.csv"
    bad.write_text("case,segment,predicted_quality\nA,organ,high\n")
    with pytest.raises(ValueError, match="bad.csv line 2"):
        read_scores_csv(bad)
    cols = tmp_path / "cols.csv"
    cols.write_text("case,quality\nA,1\n")
    with pytest.raises(ValueError, match="missing column"):
        read_scores_csv(cols)
    with pytest.raises(ValueError, match="not found"):
        read_scores_csv(tmp_path / "nope.csv")


def test_row_status_validated():
    with pytest.raises(ValueError, match="case 'x'"):
        ReviewRow("x", status="done")


def test_order_by_quality_second_opinion_the_lower_or_the_mean_of_both():
    """The reviewer picks what "worst first" means; Next unreviewed follows the same order, and a
    row without the chosen value falls back on the other one."""
    rows = [ReviewRow(case="a", volume="a", scores={"la": 0.9}, second_opinion={"la": 0.5}),
            ReviewRow(case="b", volume="b", scores={"la": 0.6}, second_opinion={"la": 0.95}),
            ReviewRow(case="c", volume="c", scores={"la": 0.8}, second_opinion={"la": 0.8}),
            ReviewRow(case="d", volume="d", second_opinion={"la": 0.7}),  # no g score
            ReviewRow(case="e", volume="e")]                             # neither
    model = ReviewModel(rows)
    assert [r.case for r in model.rows()] == ["b", "d", "c", "a", "e"]
    model.order = "2nd opinion"
    assert [r.case for r in model.rows()] == ["a", "d", "c", "b", "e"]
    assert model.next_unreviewed().case == "a" and model.next_unreviewed("a").case == "d"
    model.order = "lower of both"
    assert [r.case for r in model.rows()] == ["a", "b", "d", "c", "e"]
    model.order = "mean of both"  # a 0.70, b 0.775, c 0.80, d 0.70 (its only value)
    assert [r.case for r in model.rows()] == ["a", "d", "b", "c", "e"]
    model.order = "lower of both"
    model.approve("a")
    assert [r.case for r in model.rows("unreviewed")] == ["b", "d", "c", "e"]
    with pytest.raises(ValueError, match="order must be one of"):
        model.order = "best"
    with pytest.raises(ValueError, match="order must be one of"):
        ReviewModel(order="random")


def test_the_current_case_stays_only_while_listed():
    """The panel's current case after a filter change, a decision or a closed scene: Approve
    must never act on a row that is not highlighted (or raise KeyError for one that is gone)."""
    m = model()
    m.flag("a", "boundary leaks")
    assert m.listed("a") == "a" and m.listed("a", "flagged") == "a"
    assert m.listed("a", "unreviewed") is None and m.listed("a", "approved") is None
    assert m.listed(None) is None and m.listed("zzz") is None
    assert m.row("a").comment == "boundary leaks"  # what selecting the row puts back in the comment field
    m.replace_rows([])  # the scene was closed
    assert m.listed("a") is None
    with pytest.raises(ValueError, match="filter"):
        model().listed("a", "everything")
