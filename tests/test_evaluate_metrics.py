"""Task metrics: exact match, and the JSON figures the demo's structured task is judged by."""

from __future__ import annotations

import pytest

from ray_qlora.evaluate import format_table, task_metrics

REF = ['{"drug": "a", "dose_mg": 5, "route": "PO", "frequency": "BID"}',
       '{"drug": "b", "dose_mg": 10, "route": "IV", "frequency": "QD"}']


def test_perfect_and_reformatted_json() -> None:
    m = task_metrics(REF, REF)
    assert m == {"exact_match": 1.0, "valid_json": 1.0, "json_match": 1.0, "field_accuracy": 1.0}
    spaced = ['{"drug":"a","dose_mg":5,"route":"PO","frequency":"BID"}', REF[1]]
    m = task_metrics(spaced, REF)
    assert m["exact_match"] == 0.5 and m["json_match"] == 1.0


def test_partial_fields_and_invalid_json() -> None:
    preds = ['{"drug": "a", "dose_mg": 50, "route": "PO", "frequency": "BID"}', "Sure! Here is the JSON"]
    m = task_metrics(preds, REF)
    assert m["valid_json"] == 0.5
    assert m["json_match"] == 0.0
    assert m["field_accuracy"] == pytest.approx(3 / 8)


def test_plain_text_task_has_no_json_metrics() -> None:
    m = task_metrics(["Paris", "4"], ["Paris", "5"])
    assert m == {"exact_match": 0.5}


def test_table_shows_both_sides_and_delta() -> None:
    table = format_table({"base": {"eval_loss": 2.0, "exact_match": 0.0},
                          "tuned": {"eval_loss": 0.5, "exact_match": 0.75}})
    assert "exact_match" in table and "75.0%" in table and "+75.0pp" in table and "-1.5000" in table
