"""Row formats normalise to one message schema; bad rows say why."""

from __future__ import annotations

import pytest

from ray_qlora.data.formats import RowError, normalize_row

SYS = "Be terse."


def test_alpaca_with_input() -> None:
    msgs = normalize_row({"instruction": "Translate", "input": "hola", "output": "hello"}).messages
    assert msgs == [{"role": "user", "content": "Translate\n\nhola"}, {"role": "assistant", "content": "hello"}]


def test_alpaca_without_input_and_system_prompt() -> None:
    msgs = normalize_row({"instruction": "Say hi", "input": "", "output": "hi"}, system_prompt=SYS).messages
    assert msgs[0] == {"role": "system", "content": SYS}
    assert msgs[1]["content"] == "Say hi"


def test_messages_keep_their_own_system_prompt() -> None:
    row = {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    msgs = normalize_row(row, system_prompt=SYS).messages
    assert msgs[0]["content"] == "mine" and len(msgs) == 5


def test_prompt_completion() -> None:
    assert normalize_row({"prompt": "2+2?", "completion": "4"}).messages[1] == {"role": "assistant", "content": "4"}


def test_explicit_format_overrides_detection() -> None:
    with pytest.raises(RowError, match="'messages'"):
        normalize_row({"instruction": "x", "output": "y"}, fmt="messages")


@pytest.mark.parametrize("row, reason", [
    ({"instruction": "x"}, "field 'output' is missing or empty"),
    ({"instruction": "x", "output": "   "}, "field 'output' is missing or empty"),
    ({"instruction": 3, "output": "y"}, "must be a string"),
    ({"text": "free text"}, "set data.allow_text: true"),
    ({"unknown": "free text"}, "unrecognised row format"),
    ({"conversations": [{"from": "alien", "value": "q"}]}, "is not one of"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "must end with an assistant message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]}, "only text parts"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must end with an assistant message"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "is not one of"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "must alternate"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "only come first"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "must be the user's"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}, "non-empty string"),
    ("not an object", "must be a JSON object"),
])
def test_bad_rows_raise_with_reason(row: object, reason: str) -> None:
    with pytest.raises(RowError, match=reason):
        normalize_row(row)  # type: ignore[arg-type]


def test_sharegpt_roles_and_system() -> None:
    row = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
                             {"from": "gpt", "value": "a1"}, {"from": "user", "value": "q2"},
                             {"from": "model", "value": "a2"}]}
    assert normalize_row(row, system_prompt=SYS).messages == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]


def test_sharegpt_system_field_beside_the_turns() -> None:
    row = {"system": "top", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalize_row(row).messages[0] == {"role": "system", "content": "top"}


def test_openai_content_parts_are_joined() -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]}
    assert normalize_row(row).messages == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]


def test_alpaca_with_its_own_system() -> None:
    msgs = normalize_row({"system": "mine", "instruction": "i", "output": "o"}, system_prompt=SYS).messages
    assert msgs[0] == {"role": "system", "content": "mine"} and len(msgs) == 3


def test_plain_text_when_allowed_gets_no_system_prompt() -> None:
    doc = normalize_row({"text": "doc"}, system_prompt=SYS, allow_text=True)
    assert doc.messages == [{"role": "text", "content": "doc"}] and doc.tools is None
    assert normalize_row({"text": "doc", "meta": 1}, fmt="text", allow_text=True).messages[0]["content"] == "doc"


# Tool use: the shapes OpenAI's API (and so the server) takes.
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}}


def _tool_row(arguments: object = '{"city": "Oslo"}', **extra: object) -> dict:
    return {"tools": [WEATHER], **extra, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, rain"},
        {"role": "assistant", "content": "It is 4 C and raining in Oslo."}]}


def test_tool_use_rows_keep_tools_calls_and_results() -> None:
    ex = normalize_row(_tool_row())
    assert ex.tools == [WEATHER]
    call = ex.messages[1]
    # arguments become an object (as the server hands them to the template), content '' beside calls
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    assert ex.messages[2] == {"role": "tool", "content": "4 C, rain", "tool_call_id": "call_1"}
    assert normalize_row(_tool_row({"city": "Oslo"})).messages[1] == call  # an object already is kept


def test_tools_as_json_text_or_bare_functions_read_the_same() -> None:
    import json

    assert normalize_row(_tool_row(tools=json.dumps([WEATHER]))).tools == [WEATHER]
    assert normalize_row(_tool_row(tools=[WEATHER["function"]])).tools == [WEATHER]


def test_a_conversation_may_end_on_the_call() -> None:
    row = _tool_row()
    row["messages"] = row["messages"][:2]  # teaches when to call: the answer is the call itself
    assert normalize_row(row).messages[-1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_sharegpt_function_call_and_observation_turns() -> None:
    import json

    row = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "4 C, rain"},
        {"from": "gpt", "value": "4 C and rain."}]}
    ex = normalize_row(row)
    assert ex.tools == [WEATHER]
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]
    assert ex.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]


def _with(row: dict, index: int, **changes: object) -> dict:
    msgs = [dict(m) for m in row["messages"]]
    msgs[index].update(changes)
    return {**row, "messages": msgs}


@pytest.mark.parametrize("row, reason", [
    (_tool_row("{city: Oslo}"), r"messages\[1\].tool_calls\[0\].function.arguments is not JSON"),
    (_tool_row("[1, 2]"), "must be a JSON object"),
    (_with(_tool_row(), 1, tool_calls=[{"function": {"name": "get weather!", "arguments": "{}"}}]), "function name"),
    (_with(_tool_row(), 1, tool_calls=[{"function": {"name": "get_time", "arguments": "{}"}}]),
     "'get_time', which the row's tools do not define"),
    (_with(_tool_row(), 0, tool_calls=[{"function": {"name": "get_weather"}}]), "only an assistant message"),
    ({**_tool_row(), "messages": _tool_row()["messages"][:1] + _tool_row()["messages"][2:]},
     "must answer an assistant message's tool_calls"),
    ({**_tool_row(), "messages": _tool_row()["messages"][:2] + [{"role": "user", "content": "and?"},
                                                               {"role": "assistant", "content": "a"}]},
     "must be followed by their results"),
    ({**_tool_row(), "messages": _tool_row()["messages"][:3] + [{"role": "user", "content": "and?"},
                                                               {"role": "assistant", "content": "a"}]},
     "followed by the assistant's turn"),
    (_tool_row(tools="[not json"), "field 'tools' is not JSON"),
    (_tool_row(tools=[WEATHER, WEATHER]), "defined twice"),
    (_tool_row(tools=[{"type": "code_interpreter", "function": {"name": "x"}}]), "is not 'function'"),
    (_tool_row(tools=[{"name": "f", "parameters": "none"}]), "parameters must be a JSON schema object"),
    ({"instruction": "x", "output": "y", "tools": [WEATHER]}, "needs the messages or sharegpt format"),
])
def test_bad_tool_rows_raise_with_reason(row: dict, reason: str) -> None:
    with pytest.raises(RowError, match=reason):
        normalize_row(row)
