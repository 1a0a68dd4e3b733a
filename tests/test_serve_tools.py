"""Tool calls on the transformers engine: the schemas forced calls follow, and reading calls back (no Ray)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from ray_qlora.serve.api import APIError, ChatCompletionRequest
from ray_qlora.serve.tools import call_schema, read_calls, strict_tag

WEATHER = {"name": "get_weather", "description": "Forecast for a city",
           "parameters": {"type": "object", "required": ["city", "days"], "properties": {
               "city": {"type": "string", "enum": ["Paris", "Rome"]},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}
NOW = {"name": "now"}  # no parameters: called with an empty object
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": NOW}]

# a model's own response_template: Mistral-style calls, a JSON list after [TOOL_CALLS]
MISTRALISH = {"start_anchor": "<|im_start|>assistant\n", "fields": {
    "content": {"content": "text"},
    "tool_calls": {"open": "[TOOL_CALLS]", "content": "json", "transform_each": True,
                   "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{arguments}"}}}}}


def _request(**extra) -> ChatCompletionRequest:  # noqa: ANN003
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}], **extra})


def test_named_and_required_choices_become_the_schemas_vllm_builds() -> None:
    named = call_schema([WEATHER, NOW], "named", "get_weather")
    assert named == WEATHER["parameters"]
    assert call_schema([WEATHER, NOW], "named", "now") == {"type": "object", "properties": {}}
    required = call_schema([WEATHER, NOW], "required", None)
    assert required is not None and required["type"] == "array" and required["minItems"] == 1
    assert "maxItems" not in required
    options = required["items"]["anyOf"]
    assert [o["properties"]["name"]["enum"] for o in options] == [["get_weather"], ["now"]]
    assert options[0]["properties"]["parameters"] == WEATHER["parameters"]
    assert call_schema([WEATHER], "required", None, parallel=False)["maxItems"] == 1  # type: ignore[index]
    assert call_schema([WEATHER], "auto", None) is None and call_schema([WEATHER], "none", None) is None


def test_required_keeps_the_references_of_parameters_with_definitions() -> None:
    """Schemas made by pydantic (the openai SDK's pydantic_function_tool) refer to "#/$defs/...": in the
    list of calls they must still resolve."""
    from ray_qlora.structured import check_followable

    dose = {"type": "object", "properties": {"mg": {"type": "number"}}, "required": ["mg"]}
    order = {"name": "order", "parameters": {"type": "object", "properties": {"dose": {"$ref": "#/$defs/Dose"}},
                                             "required": ["dose"], "$defs": {"Dose": dose}}}
    twin = {"name": "reorder", "parameters": order["parameters"]}  # the same definition twice is fine
    required = call_schema([order, twin, NOW], "required", None)
    assert required is not None and required["$defs"] == {"Dose": dose}
    assert all("$defs" not in o["properties"]["parameters"] for o in required["items"]["anyOf"])
    check_followable(required)  # before: "Cannot find field '$defs' in #/$defs/A"
    assert "$defs" in order["parameters"]  # the request's own tools are left as they were
    clash = {"name": "other", "parameters": {**order["parameters"], "$defs": {"Dose": {"type": "string"}}}}
    with pytest.raises(APIError) as err:
        _request(tools=[{"type": "function", "function": order}, {"type": "function", "function": clash}],
                 tool_choice="required")
    assert (err.value.param, err.value.code) == ("tools", "invalid_json_schema") and "Dose" in err.value.message


def test_the_request_picks_the_mode_and_its_schema() -> None:
    assert _request().tool_mode == "none" and _request().schema_text is None
    assert _request(tools=TOOLS).tool_mode == "auto"  # OpenAI's default once tools are sent
    assert _request(tools=TOOLS, tool_choice="none").tool_mode == "none"
    named = _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.tool_mode == "named" and json.loads(named.schema_text or "") == WEATHER["parameters"]
    required = _request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert json.loads(required.schema_text or "")["maxItems"] == 1
    assert required.template_tools() == [{"type": "function", "function": WEATHER},
                                         {"type": "function", "function": NOW}]


def test_forced_calls_are_read_into_openai_tool_calls() -> None:
    named = read_calls({"text": '{"city": "Paris", "days": 3}', "finish_reason": "stop"}, "named", "get_weather")
    (call,) = named["tool_calls"]
    assert named["text"] is None and named["finish_reason"] == "stop"  # OpenAI: a named call stops
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}
    text = '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}]'
    required = read_calls({"text": text, "finish_reason": "stop"}, "required")
    assert required["finish_reason"] == "tool_calls" and required["text"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in required["tool_calls"]] == [
        ("now", {}), ("get_weather", {"city": "Rome", "days": 1})]
    assert len({c["id"] for c in required["tool_calls"]}) == 2
    # cut by max_tokens: the text as generated, no calls, and the reason it stopped
    cut = read_calls({"text": '[{"name": "get_w', "finish_reason": "length"}, "required")
    assert cut["tool_calls"] is None and cut["text"] == '[{"name": "get_w' and cut["finish_reason"] == "length"


def test_auto_reads_hermes_calls_when_the_tokenizer_ships_no_response_template(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert getattr(tok, "response_template", None) is None  # SmolLM2 ships none
    prompt = "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    said = ('Checking. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}\n'
            '</tool_call><tool_call>{"name": "now", "arguments": {}}</tool_call>')
    out = read_calls({"text": said, "finish_reason": "stop"}, "auto", tok=tok, prompt=prompt, functions=[WEATHER, NOW])
    assert out["text"] == "Checking." and out["finish_reason"] == "tool_calls"
    # arguments are cast to the declared types ("2" -> 2 for an integer parameter)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("now", {})]
    plain = read_calls({"text": "It is sunny.", "finish_reason": "stop"}, "auto", tok=tok, prompt=prompt)
    assert plain == {"text": "It is sunny.", "finish_reason": "stop", "tool_calls": None}
    cut = read_calls({"text": '<tool_call>{"name": "get_we', "finish_reason": "length"}, "auto", tok=tok,
                     prompt=prompt)
    assert cut["tool_calls"] is None and cut["text"].startswith("<tool_call>") and cut["finish_reason"] == "length"


def test_auto_reads_calls_with_the_models_own_response_template(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.response_template = MISTRALISH
    prompt = "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    said = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]'
    out = read_calls({"text": said, "finish_reason": "stop"}, "auto", tok=tok, prompt=prompt, functions=[WEATHER])
    assert [json.loads(c["function"]["arguments"]) for c in out["tool_calls"]] == [{"city": "Rome", "days": 1}]
    # the model's own format wins: Hermes tags are plain text to it
    hermes = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    assert read_calls({"text": hermes, "finish_reason": "stop"}, "auto", tok=tok, prompt=prompt)["tool_calls"] is None


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    from ray_qlora.modeling import load_16bit, load_tokenizer

    return load_tokenizer(tiny_model_dir), load_16bit(tiny_model_dir, "float32", "cpu")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_random_model_forced_to_call_makes_a_valid_call(model, choice) -> None:  # noqa: ANN001
    """The tiny model's weights are random: only the grammar makes its call parse and fit the tools.

    One call per answer (parallel_tool_calls: false): sampled at random, a list of calls rarely ends.
    """
    from ray_qlora.generation import generate_text, render
    from ray_qlora.structured import Grammars

    tok, m = model
    req = _request(tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    prompt = render(tok, req.conversation(), req.template_tools())
    grammar = Grammars(tok, int(m.config.vocab_size)).compile(req.schema_text)
    for seed in (0, 1, 2):
        out = generate_text(m, tok, [prompt], 64, 1, 1.0, 1.0, seed, [], grammar)[0]
        read = read_calls(out, req.tool_mode, req.tool_choice_name)
        assert read["finish_reason"] == ("stop" if req.tool_mode == "named" else "tool_calls")
        assert len(read["tool_calls"]) == 1, out
        for call in read["tool_calls"]:
            name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
            assert name in ("get_weather", "now")
            if name == "get_weather":
                assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7
            else:
                assert args == {}


def _streamed(stream, pieces: list[str], finish: str = "stop"):  # noqa: ANN001, ANN202
    """What a client gets: content deltas, then (the answer read, its last content, the logprobs in order)."""
    sent, logprobs = [], []
    for i, piece in enumerate(pieces):
        text, lp = stream.feed(piece, [{"token": piece, "i": i}])
        sent.append(text)
        logprobs += lp
    out, rest, last = stream.finish(finish, None)
    return [s for s in sent if s], out, rest, logprobs + last


def test_auto_streams_text_until_a_call_may_start() -> None:
    from ray_qlora.serve.tools import ToolStream

    read = partial(read_calls, mode="auto", functions=[WEATHER, NOW])
    pieces = ["It ", "is <", "b>sunny", " today."]
    sent, out, rest, logprobs = _streamed(ToolStream(read, "auto", None), pieces)
    # '<' may start '<tool_call>': held until the next piece shows it does not
    assert sent == ["It", " is", " <b>sunny", " today."] and rest is None
    assert out["tool_calls"] is None and out["text"] == "".join(pieces)
    assert [e["i"] for e in logprobs] == [0, 1, 2, 3]  # every token's logprobs, in order, once

    pieces = ["Checking. ", "<tool", '_call>{"name": "now", ', '"arguments": {}}', "</tool_call>"]
    sent, out, rest, logprobs = _streamed(ToolStream(read, "auto", None), pieces)
    assert sent == ["Checking."] and rest is None  # the call's text is never sent as content
    assert out["finish_reason"] == "tool_calls" and [c["function"]["name"] for c in out["tool_calls"]] == ["now"]
    assert [e["i"] for e in logprobs] == [0, 1, 2, 3, 4]


def test_forced_calls_are_held_whole_until_the_end() -> None:
    from ray_qlora.serve.tools import ToolStream

    read = partial(read_calls, mode="named", name="now")
    sent, out, rest, logprobs = _streamed(ToolStream(read, "named", None), ["{", "}"])
    assert sent == [] and rest is None and out["tool_calls"][0]["function"]["arguments"] == "{}"
    assert [e["i"] for e in logprobs] == [0, 1]
    # a call cut short by max_tokens: its text comes at the end, as content
    read = partial(read_calls, mode="required")
    sent, out, rest, _ = _streamed(ToolStream(read, "required", None), ['[{"na', "me"], "length")
    assert sent == [] and rest == '[{"name' and out["tool_calls"] is None and out["finish_reason"] == "length"


def test_strict_auto_is_asked_per_function_or_by_the_server() -> None:
    strict = {**WEATHER, "strict": True}
    loose = {**WEATHER, "strict": False}
    assert _request(tools=TOOLS).grammar_spec() is None  # auto, nobody asked: free text
    kind, text = _request(tools=[{"type": "function", "function": strict}]).grammar_spec() or ("", "")
    tag = json.loads(text)
    assert kind == "structural_tag" and tag["format"]["triggers"] == ["<tool_call>"]
    # each offered function, with and without the newlines around the JSON, under its own parameters
    assert {t["begin"] for t in tag["format"]["tags"]} == {'<tool_call>\n{"name": "get_weather", "arguments": ',
                                                          '<tool_call>{"name": "get_weather", "arguments": '}
    assert all(t["content"]["json_schema"] == WEATHER["parameters"] for t in tag["format"]["tags"])
    assert not tag["format"]["stop_after_first"]
    one = _request(tools=TOOLS, parallel_tool_calls=False).grammar_spec(True)
    assert one is not None and json.loads(one[1])["format"]["stop_after_first"]
    # serve.strict_tools makes auto strict, unless a function opts out; calls not read as Hermes stay free
    assert _request(tools=TOOLS).grammar_spec(strict_default=True)[0] == "structural_tag"  # type: ignore[index]
    assert _request(tools=[{"type": "function", "function": loose}]).grammar_spec(strict_default=True) is None
    assert _request(tools=[{"type": "function", "function": strict}]).grammar_spec(hermes=False) is None
    # a forced call keeps its schema, and a JSON response_format wins over a strict auto
    named = _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.grammar_spec(True) == ("json_schema", named.schema_text)
    fmt = _request(tools=TOOLS, response_format={"type": "json_object"})
    assert fmt.grammar_spec(True) == ("json_schema", '{"type": "object"}')
    assert _request(tools=TOOLS, tool_choice="none").grammar_spec(True) is None


UNIT = {"name": "set_unit", "strict": True, "parameters": {"type": "object", "required": ["unit"], "properties": {
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}


@pytest.fixture(scope="module")
def kelvin_caller(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The tiny model trained on one answer: a set_unit call whose unit, 'kelvin', is not among the tool's."""
    import torch

    from conftest import save_tiny_llama
    from ray_qlora.generation import render
    from ray_qlora.modeling import load_16bit, load_tokenizer

    folder = save_tiny_llama(tmp_path_factory.mktemp("kelvin"), tokenizer_dir)
    tok, model = load_tokenizer(folder), load_16bit(folder, "float32", "cpu")
    prompt = render(tok, [{"role": "user", "content": "Use kelvin."}], [{"type": "function", "function": UNIT}])
    answer = '<tool_call>\n{"name": "set_unit", "arguments": {"unit": "kelvin"}}\n</tool_call>' + tok.eos_token
    head, tail = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, answer))
    ids, labels = torch.tensor([head + tail]), torch.tensor([[-100] * len(head) + tail])
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # about 80 steps on one sequence
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.01:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    return tok, model.eval(), prompt


def test_a_strict_call_is_held_to_the_functions_schema(kelvin_caller) -> None:  # noqa: ANN001
    """Free, the model calls with the unit it learned; strict, the same call can only take an offered unit."""
    from ray_qlora.generation import generate_text
    from ray_qlora.structured import Grammars

    tok, model, prompt = kelvin_caller
    read = partial(read_calls, mode="auto", tok=tok, prompt=prompt, functions=[UNIT])
    free = read(generate_text(model, tok, [prompt], 48, 1)[0])
    (call,) = free["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"unit": "kelvin"}  # what it was trained to write
    kind, text = _request(tools=[{"type": "function", "function": UNIT}]).grammar_spec() or ("", "")
    grammar = Grammars(tok, int(model.config.vocab_size)).compile(text, kind)
    greedy = read(generate_text(model, tok, [prompt], 48, 1, grammar=grammar)[0])
    assert greedy["finish_reason"] == "tool_calls" and greedy["text"] is None, greedy
    greedy_unit = json.loads(greedy["tool_calls"][0]["function"]["arguments"])["unit"]
    sampled = generate_text(model, tok, [prompt] * 4, 48, 4, 1.0, 1.0, 0, [], grammar)
    for held in [greedy, *map(read, sampled)]:
        (call,) = held["tool_calls"]
        assert call["function"]["name"] == "set_unit"
        assert json.loads(call["function"]["arguments"])["unit"] in ("celsius", "fahrenheit")
    # one grammar per row (evaluation's rows each have their own tools): a row offered none stays free
    free_row = Grammars(tok, int(model.config.vocab_size)).compile(json.dumps(strict_tag([])), "structural_tag")
    rows = generate_text(model, tok, [prompt] * 2, 48, 2, grammar=[grammar, free_row])
    assert [json.loads(read(o)["tool_calls"][0]["function"]["arguments"])["unit"] for o in rows] == [
        greedy_unit, "kelvin"]


def test_strict_leaves_a_text_answer_as_it_was(model) -> None:  # noqa: ANN001
    """The random model writes no <tool_call>: its greedy answer is the same text with or without strict."""
    from ray_qlora.generation import generate_text, render
    from ray_qlora.structured import Grammars

    tok, m = model
    req = _request(tools=[{"type": "function", "function": {**WEATHER, "strict": True}}])
    prompt = render(tok, req.conversation(), req.template_tools())
    kind, text = req.grammar_spec() or ("", "")
    grammar = Grammars(tok, int(m.config.vocab_size)).compile(text, kind)
    free, held = (generate_text(m, tok, [prompt], 24, 1, grammar=g)[0] for g in (None, grammar))
    assert "<tool_call>" not in free["text"] and held["text"] == free["text"]
