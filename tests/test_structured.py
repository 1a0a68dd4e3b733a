"""Structured output (serve's response_format, eval.constrained): a random tiny model's answers follow the
schema (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from ray_qlora.serve.api import ResponseFormat
from ray_qlora.structured import SchemaError, check_followable

ORDER = {"type": "object", "additionalProperties": False, "required": ["route", "urgent", "times"],
         "properties": {"route": {"enum": ["PO", "IV", "IM"]}, "urgent": {"type": "boolean"},
                        "times": {"type": "array", "maxItems": 2, "items": {"enum": ["am", "pm"]}}}}
PROMPTS = ["Give 5 mg PO daily", "Start heparin IV now", "hello"]
BUDGET = 64  # the longest answer ORDER allows is 55 characters: it closes however the model splits it into tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from ray_qlora.modeling import load_16bit, load_tokenizer

    return load_tokenizer(tiny_model_dir), load_16bit(tiny_model_dir, "float32", "cpu")


@pytest.fixture(scope="module")
def grammars(model):  # noqa: ANN001, ANN201
    from ray_qlora.structured import Grammars

    tok, m = model
    return Grammars(tok, m.config.vocab_size)


def _schema(schema: dict) -> str:
    fmt = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "order", "schema": schema}})
    text = fmt.schema_text()
    assert text is not None
    return text


def test_answers_follow_the_schema_greedy_sampled_and_batched(model, grammars) -> None:  # noqa: ANN001
    from ray_qlora.generation import generate_text

    tok, m = model
    free = generate_text(m, tok, PROMPTS, BUDGET, len(PROMPTS))
    with pytest.raises(json.JSONDecodeError):  # the random model writes no JSON on its own
        json.loads(free[0]["text"])
    grammar = grammars.compile(_schema(ORDER))
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        outs = generate_text(m, tok, PROMPTS, BUDGET, len(PROMPTS), temperature, 1.0, seed, None, grammar)
        for out in outs:
            assert out["finish_reason"] == "stop", out  # the grammar closed the object, then only EOS was allowed
            jsonschema.validate(json.loads(out["text"]), ORDER)
            assert out["text"] == json.dumps(json.loads(out["text"]))  # no free whitespace, as vLLM is set to


def test_json_object_means_an_object_and_streams_the_same_text(model, grammars) -> None:  # noqa: ANN001
    from ray_qlora.generation import generate_text, stream_text

    tok, m = model
    grammar = grammars.compile(ResponseFormat(type="json_object").schema_text())
    greedy = generate_text(m, tok, ["Give 5 mg PO daily"], 24, 1, 0.0, 1.0, None, None, grammar)[0]
    assert greedy["finish_reason"] == "stop" and isinstance(json.loads(greedy["text"]), dict)
    # sampled, the object's keys may run past the budget: cut short, as OpenAI's finish_reason 'length' says
    whole = generate_text(m, tok, ["Give 5 mg PO daily"], 24, 1, 1.0, 1.0, 3, None, grammar)[0]
    events = list(stream_text(m, tok, "Give 5 mg PO daily", 24, 1.0, 1.0, 3, None, grammar))
    assert "".join(e.get("text", "") for e in events) == whole["text"]
    assert whole["text"].startswith("{")  # an object, never an array or a bare value
    assert events[-1]["finish_reason"] == whole["finish_reason"]


def test_properties_come_in_the_schemas_order_and_a_schema_compiles_once(model, grammars) -> None:  # noqa: ANN001
    from ray_qlora.generation import generate_text

    tok, m = model
    assert grammars.compile(_schema(ORDER)) is grammars.compile(_schema(ORDER))  # cached
    backwards = {**ORDER, "properties": dict(reversed(list(ORDER["properties"].items())))}
    for schema in (ORDER, backwards):
        out = generate_text(m, tok, PROMPTS[:1], BUDGET, 1, 0.0, 1.0, None, None, grammars.compile(_schema(schema)))
        assert list(json.loads(out[0]["text"])) == list(schema["properties"]), out  # as a model was tuned to write


@pytest.mark.parametrize("schema", [{"type": "bogus"}, {"$ref": "#/$defs/missing"}])
def test_a_schema_that_cannot_be_followed_is_refused_in_plain_words(grammars, schema: dict) -> None:  # noqa: ANN001
    for check in (lambda: grammars.compile(_schema(schema)), lambda: check_followable(schema)):
        with pytest.raises(SchemaError) as err:
            check()
        assert not err.value.missing_library
        assert str(err.value).startswith("the JSON schema cannot be followed: ")
        assert not str(err.value).split("followed: ")[1].startswith("[")  # xgrammar's C++ log prefix is cut
    check_followable(ORDER)


def test_without_xgrammar_the_error_says_what_to_install(model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import sys

    from ray_qlora.structured import Grammars

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if it were not installed
    with pytest.raises(SchemaError) as err:
        Grammars(model[0], 64).compile(_schema(ORDER))
    assert err.value.missing_library and "ray-qlora[structured]" in str(err.value)
