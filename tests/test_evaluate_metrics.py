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


def test_schema_valid_counts_answers_that_parse_and_validate() -> None:
    schema = {"type": "object", "required": ["drug", "dose_mg"],
              "properties": {"drug": {"type": "string"}, "dose_mg": {"type": "number", "minimum": 0}}}
    preds = [REF[0], '{"drug": "b", "dose_mg": -1}', '{"drug": "c"}', "not json", '{"drug": "d", "dose_mg": 2.5}']
    m = task_metrics(preds, REF * 2 + REF[:1], schema=schema)
    assert m["schema_valid"] == pytest.approx(2 / 5) and m["valid_json"] == pytest.approx(4 / 5)
    only = task_metrics(preds, REF * 2 + REF[:1], metrics=["schema_valid"], schema=schema)
    assert only == {"schema_valid": pytest.approx(2 / 5)}
    assert "schema_valid" not in task_metrics(preds, REF * 2 + REF[:1])  # no schema: no such metric


def test_eval_schema_settings_are_checked_where_they_are_written() -> None:
    from ray_qlora.config import ConfigError, parse_config

    base = {"run": {"output_uri": "/tmp/x"}, "data": {"input_uris": ["x"]}}
    for eval_cfg, words in (({"json_schema": {"type": "objekt"}}, "eval.json_schema: not a valid JSON schema"),
                            ({"json_schema": {"properties": {"a": {"minimum": "one"}}}},
                             "not a valid JSON schema at properties/a/minimum"),
                            ({"constrained": True}, "set eval.json_schema"),
                            ({"metrics": ["schema_valid"]}, "set eval.json_schema")):
        with pytest.raises(ConfigError, match=words):
            parse_config({**base, "eval": eval_cfg})
    parse_config({**base, "eval": {"json_schema": {"type": "object"}, "constrained": True}})


def test_a_schema_constrained_generation_cannot_follow_is_refused_before_any_work() -> None:
    from ray_qlora.config import ConfigError
    from ray_qlora.evaluate import check_schema_followable

    check_schema_followable({"type": "object", "properties": {"a": {"enum": [1, 2]}}})
    # valid JSON Schema, but no grammar can hold generation to a pattern that is not a regular expression
    with pytest.raises(ConfigError, match=r"eval.json_schema: the JSON schema cannot be followed"):
        check_schema_followable({"type": "string", "pattern": "(("})


def test_generation_that_needs_xgrammar_names_the_key_that_asks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from ray_qlora.config import ConfigError, parse_config
    from ray_qlora.evaluate import check_generation

    base = {"run": {"output_uri": "/tmp/x"}, "data": {"input_uris": ["x"]}}
    constrained = parse_config({**base, "eval": {"json_schema": {"type": "object"}, "constrained": True}})
    strict = parse_config({**base, "serve": {"strict_tools": True}})
    for cfg in (constrained, strict, parse_config(base)):
        check_generation(cfg)  # xgrammar is installed here: nothing to refuse
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if it were not
    check_generation(parse_config(base))  # free generation needs no grammar
    with pytest.raises(ConfigError, match=r"eval.constrained: .*needs xgrammar"):
        check_generation(constrained)
    with pytest.raises(ConfigError,
                       match=r"serve.strict_tools: .*needs xgrammar \(pip install 'ray-qlora\[structured\]'\)"):
        check_generation(strict)


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


def test_tool_calls_are_scored_on_name_and_arguments_not_spelling() -> None:
    from ray_qlora.evaluate import prediction, reference

    ref = reference({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]})
    assert reference({"role": "assistant", "content": "4 C."}) == "4 C."

    same, _ = prediction('<tool_call>\n{"arguments": {"days": 2,"city": "Oslo"}, "name": "get_weather"}\n</tool_call>')
    other, _ = prediction('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}\n</tool_call>')
    text, called = prediction("I cannot check the weather.")
    assert (text, called) == ("I cannot check the weather.", False) and prediction(same)[1] is False
    assert task_metrics([same, other, text], [ref] * 3)["exact_match"] == pytest.approx(1 / 3)


def test_tool_metrics_split_calls_from_text_answers() -> None:
    from ray_qlora.evaluate import calls_text, tool_metrics

    def call(name: str, **args: object) -> str:
        return calls_text([{"name": name, "arguments": args}])

    refs = [call("place_order", drug="a"), call("place_order", drug="b"), call("cancel", id=1), "QD", "PO"]
    preds = [call("place_order", drug="a"), call("place_order", drug="x"), "no call", call("place_order"), "PO"]
    m = tool_metrics(preds, refs, [True, True, True, False, False], [True, True, False, True, False])
    assert m == {"call_exact": pytest.approx(1 / 3), "call_name_match": pytest.approx(2 / 3),
                 "text_not_called": 0.5}
    assert tool_metrics(["a"], ["a"], [False], [False]) == {}  # no calls held out: no tool metrics
