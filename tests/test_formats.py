"""Row formats normalise to one message schema; bad rows say why."""

from __future__ import annotations

import pytest

from ray_qlora.data.formats import RowError, normalize_row

SYS = "Be terse."


def test_alpaca_with_input() -> None:
    msgs = normalize_row({"instruction": "Translate", "input": "hola", "output": "hello"})
    assert msgs == [{"role": "user", "content": "Translate\n\nhola"}, {"role": "assistant", "content": "hello"}]


def test_alpaca_without_input_and_system_prompt() -> None:
    msgs = normalize_row({"instruction": "Say hi", "input": "", "output": "hi"}, system_prompt=SYS)
    assert msgs[0] == {"role": "system", "content": SYS}
    assert msgs[1]["content"] == "Say hi"


def test_messages_keep_their_own_system_prompt() -> None:
    row = {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "a2"}]}
    msgs = normalize_row(row, system_prompt=SYS)
    assert msgs[0]["content"] == "mine" and len(msgs) == 5


def test_prompt_completion() -> None:
    assert normalize_row({"prompt": "2+2?", "completion": "4"})[1] == {"role": "assistant", "content": "4"}


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
    assert normalize_row(row, system_prompt=SYS) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]


def test_sharegpt_system_field_beside_the_turns() -> None:
    row = {"system": "top", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalize_row(row)[0] == {"role": "system", "content": "top"}


def test_openai_content_parts_are_joined() -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]}
    assert normalize_row(row) == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}]


def test_alpaca_with_its_own_system() -> None:
    msgs = normalize_row({"system": "mine", "instruction": "i", "output": "o"}, system_prompt=SYS)
    assert msgs[0] == {"role": "system", "content": "mine"} and len(msgs) == 3


def test_plain_text_when_allowed_gets_no_system_prompt() -> None:
    assert normalize_row({"text": "doc"}, system_prompt=SYS, allow_text=True) == [{"role": "text", "content": "doc"}]
    assert normalize_row({"text": "doc", "meta": 1}, fmt="text", allow_text=True)[0]["content"] == "doc"
