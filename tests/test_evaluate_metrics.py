"""Task metrics: exact and normalised match, regex, a user scorer, and the JSON figures the demo is judged by."""

from __future__ import annotations

import pytest

from ray_qlora.evaluate import format_table, task_metrics

REF = ['{"drug": "a", "dose_mg": 5, "route": "PO", "frequency": "BID"}',
       '{"drug": "b", "dose_mg": 10, "route": "IV", "frequency": "QD"}']


def test_perfect_and_reformatted_json() -> None:
    m = task_metrics(REF, REF)
    assert m == {"exact_match": 1.0, "normalized_match": 1.0, "valid_json": 1.0, "json_match": 1.0,
                 "field_accuracy": 1.0}
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
    assert m == {"exact_match": 0.5, "normalized_match": 0.5}


def test_normalized_match_ignores_case_punctuation_and_spacing_only() -> None:
    m = task_metrics(["  the ANSWER is: Paris. ", "5 mg"], ["The answer is Paris", "50 mg"])
    assert m["exact_match"] == 0.0 and m["normalized_match"] == 0.5


def test_chosen_metrics_regex_and_user_scorer() -> None:
    def starts_right(pred: str, ref: str) -> float:
        return float(pred[:1] == ref[:1])

    m = task_metrics(["A-12", "B-7", "nope"], ["A-12", "C-1", "nothing"], metrics=["exact_match", "regex_match"],
                     regex=r"[A-Z]-\d+", scorer=starts_right)
    assert m == {"exact_match": pytest.approx(1 / 3), "regex_match": pytest.approx(2 / 3),
                 "starts_right": pytest.approx(2 / 3)}


def test_scorer_spec_errors_name_the_key() -> None:
    from ray_qlora.config import ConfigError
    from ray_qlora.evaluate import load_scorer

    assert load_scorer("operator:eq")("a", "a") is True
    with pytest.raises(ConfigError, match="eval.scorer: cannot import 'no_such_mod:f'"):
        load_scorer("no_such_mod:f")
    with pytest.raises(ConfigError, match="eval.scorer"):
        load_scorer("os:sep")


def test_table_shows_both_sides_and_delta() -> None:
    table = format_table({"base": {"eval_loss": 2.0, "exact_match": 0.0},
                          "tuned": {"eval_loss": 0.5, "exact_match": 0.75}})
    assert "exact_match" in table and "75.0%" in table and "+75.0pp" in table and "-1.5000" in table


def test_summary_markdown_has_table_and_escaped_samples() -> None:
    from ray_qlora.evaluate import _summary_md

    md = _summary_md({"examples": 2, "actors": 2, "base": {"eval_loss": 2.0, "exact_match": 0.0},
                      "tuned": {"eval_loss": 0.5, "exact_match": 0.5},
                      "samples": [{"prompt": "a|b", "reference": "x\ny", "base": "?", "tuned": "x"}]})
    assert "| exact_match | 0.0% | 50.0% |" in md
    assert "| a\\|b | x<br>y | ? | x |" in md
