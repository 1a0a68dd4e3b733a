"""Row formats -> one message schema.

Every supported format becomes ``[{"role": ..., "content": ...}, ...]`` (the
OpenAI chat shape): Alpaca, ShareGPT, OpenAI messages (content as a string or
a list of text parts), prompt/completion, and plain text for continued
pre-training, which becomes one message of role ``text`` (every token
labelled).

Tool use (function calling) comes in the shapes the serving API takes, so a
model is trained on the conversation it will be served: a row's ``tools``
(OpenAI function tools, or bare ``{name, description, parameters}`` objects,
as a list or its JSON text), assistant messages with ``tool_calls`` (their
``arguments`` an object, or its JSON text as OpenAI sends it) and ``tool``
messages with the results. ShareGPT exports write calls as ``function_call``
turns and results as ``observation`` turns (LLaMA-Factory's convention); they
become the same messages. How a template writes them is templating.py's job.

A row that fits no format, or whose conversation is unusable,
raises ``RowError`` with a reason that lands in quarantine. Adding a format
means adding one ``_from_*`` function and one entry in ``_DETECTORS``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, NamedTuple

__all__ = ["FORMATS", "ROLES", "TEXT_ROLE", "Example", "RowError", "detect_format", "normalize_row",
           "validate_messages"]

ROLES = ("system", "user", "assistant", "tool")
TEXT_ROLE = "text"  # a plain-text example: one message, trained on every token
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names (serve/api.py enforces it too)

# ShareGPT's speaker names as they appear in public datasets -> chat roles.
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool",
}
Message = dict[str, Any]
Tool = dict[str, Any]


class Example(NamedTuple):
    """One usable row: its conversation, and the function tools it offers (None: none)."""

    messages: list[Message]
    tools: list[Tool] | None = None


class RowError(ValueError):
    """A row that cannot be used; the message is the quarantine reason."""


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    val = row.get(key)
    if val is None or (isinstance(val, str) and not val.strip()):
        if required:
            raise RowError(f"field '{key}' is missing or empty")
        return ""
    if not isinstance(val, str):
        raise RowError(f"field '{key}' must be a string, got {type(val).__name__}")
    return val


def _from_alpaca(row: dict[str, Any]) -> list[Message]:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]


def _from_prompt_completion(row: dict[str, Any]) -> list[Message]:
    return [{"role": "user", "content": _text(row, "prompt")},
            {"role": "assistant", "content": _text(row, "completion")}]


def _from_alpaca_system(row: dict[str, Any]) -> list[Message]:
    system = _text(row, "system", required=False)
    msgs = _from_alpaca(row)
    return [{"role": "system", "content": system}, *msgs] if system else msgs


def _content_text(content: Any, where: str) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are kept."""
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}[{j}] is a {kind!r} part; only text parts can be trained on")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str) or not content.strip():
        raise RowError(f"{where} must be a non-empty string or list of text parts")
    return content


def _arguments(args: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object (how chat templates write them, and how the server hands them over)."""
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RowError(f"{where} is not JSON") from None
    if not isinstance(args, dict):
        raise RowError(f"{where} must be a JSON object, got {type(args).__name__}")
    return args


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI tool calls (or bare {name, arguments} objects) -> [{id?, type, function: {name, arguments}}]."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, (list, tuple)):
        raise RowError(f"{where} must be a list of calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RowError(f"{where}[{j}] needs a function name matching {TOOL_NAME.pattern}, got {name!r}")
        made: dict[str, Any] = {"type": "function", "function": {
            "name": name, "arguments": _arguments(fn.get("arguments", {}), f"{where}[{j}].function.arguments")}}
        if isinstance(call.get("id"), str):
            made = {"id": call["id"], **made}
        out.append(made)
    return out


def _message(m: Any, where: str) -> Message:
    if not isinstance(m, dict):
        raise RowError(f"{where} must be an object with role and content")
    role = m.get("role")
    if role not in ROLES:
        raise RowError(f"{where}.role {role!r} is not one of {list(ROLES)}")
    content = m.get("content")
    if m.get("tool_calls") and role != "assistant":
        raise RowError(f"{where}: only an assistant message makes tool_calls, not a {role!r} one")
    if role == "assistant" and m.get("tool_calls"):  # content is optional beside calls, as in OpenAI's API
        text = "" if content is None or content == "" else _content_text(content, f"{where}.content")
        return {"role": role, "content": text, "tool_calls": _tool_calls(m["tool_calls"], f"{where}.tool_calls")}
    if role == "tool" and isinstance(content, dict):  # a result kept as an object: the model reads it as JSON
        content = json.dumps(content, ensure_ascii=False)
    out: Message = {"role": role, "content": _content_text(content, f"{where}.content")}
    if role == "tool" and isinstance(m.get("tool_call_id"), str):  # what the server hands the template too
        out["tool_call_id"] = m["tool_call_id"]
    return out


def _from_messages(row: dict[str, Any]) -> list[Message]:
    msgs = row.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RowError("field 'messages' must be a non-empty list")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(msgs)]


def _from_sharegpt(row: dict[str, Any]) -> list[Message]:
    turns = row.get("conversations")
    if not isinstance(turns, (list, tuple)) or not turns:
        raise RowError("field 'conversations' must be a non-empty list")
    out: list[Message] = []
    system = row.get("system")  # some exports keep the system prompt beside the turns
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RowError(f"conversations[{i}] must be an object with from and value")
        speaker = t.get("from", t.get("role"))
        role = _SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise RowError(f"conversations[{i}].from {speaker!r} is not one of {sorted(_SHAREGPT_ROLES)}")
        value = t.get("value", t.get("content"))
        if str(speaker).lower() == "function_call":  # the value is the call(s) as JSON text
            try:
                calls = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                raise RowError(f"conversations[{i}].value of a function_call turn is not JSON") from None
            out.append({"role": "assistant", "content": "",
                        "tool_calls": _tool_calls(calls, f"conversations[{i}].value")})
        else:
            if role == "tool" and isinstance(value, dict):
                value = json.dumps(value, ensure_ascii=False)
            out.append({"role": role, "content": _content_text(value, f"conversations[{i}].value")})
    return out


def _tools(row: dict[str, Any]) -> list[Tool] | None:
    """The row's ``tools`` as OpenAI function tools ({type, function: {name, description?, parameters?}})."""
    tools = row.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory and many exports keep them as JSON text
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise RowError("field 'tools' is not JSON") from None
    if not tools:
        return None
    if not isinstance(tools, (list, tuple)):
        raise RowError(f"field 'tools' must be a list of function tools, got {type(tools).__name__}")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(tool, dict) and "function" in tool and tool.get("type", "function") != "function":
            raise RowError(f"tools[{i}].type {tool.get('type')!r} is not 'function'")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RowError(f"tools[{i}] needs a function name matching {TOOL_NAME.pattern}, got {name!r}")
        if name in {t["function"]["name"] for t in out}:
            raise RowError(f"tools[{i}]: function {name!r} is defined twice")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RowError(f"tools[{i}].parameters must be a JSON schema object")
        out.append({"type": "function",
                    "function": {k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None}})
    return out


def _from_text(row: dict[str, Any]) -> list[Message]:
    return [{"role": TEXT_ROLE, "content": _text(row, "text")}]


_DETECTORS: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], list[Message]]]] = {
    "messages": (lambda r: "messages" in r, _from_messages),
    "sharegpt": (lambda r: "conversations" in r, _from_sharegpt),
    "alpaca": (lambda r: "instruction" in r or "output" in r, _from_alpaca_system),
    "prompt_completion": (lambda r: "prompt" in r or "completion" in r, _from_prompt_completion),
    "text": (lambda r: "text" in r, _from_text),
}
FORMATS = tuple(_DETECTORS)
_TOOL_FORMATS = ("messages", "sharegpt")  # the formats that can carry tool use


def detect_format(row: dict[str, Any]) -> str:
    for name, (matches, _) in _DETECTORS.items():
        if matches(row):
            return name
    raise RowError(f"unrecognised row format with keys {sorted(row)}; expected one of {list(_DETECTORS)}")


def validate_messages(msgs: list[Message], tools: list[Tool] | None = None) -> list[Message]:
    """A trainable conversation: optional leading system, then user/assistant turns, ending on assistant.

    Tool use fits between the turns as OpenAI's API orders it: an assistant message with tool_calls,
    the results (one or more ``tool`` messages), then the assistant again. Calls must name one of the
    row's ``tools`` when it has any.
    """
    if msgs[0]["role"] == TEXT_ROLE:
        return msgs
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if any(m["role"] == "system" for m in body):
        raise RowError("a system message may only come first")
    if not body or body[-1]["role"] != "assistant":
        raise RowError("the conversation must end with an assistant message")
    for prev, cur in zip(body, body[1:]):
        if cur["role"] == "tool" and not (prev["role"] == "tool" or prev.get("tool_calls")):
            raise RowError("a tool message must answer an assistant message's tool_calls")
        if prev.get("tool_calls") and cur["role"] != "tool":
            raise RowError("an assistant message with tool_calls must be followed by their results (role 'tool')")
        if prev["role"] == "tool" and cur["role"] == "user":
            raise RowError("tool results must be followed by the assistant's turn, not the user's")
        if prev["role"] == cur["role"] != "tool":
            raise RowError(f"two '{cur['role']}' messages in a row; turns must alternate")
    if body[0]["role"] != "user":
        raise RowError("the first turn after the system message must be the user's")
    names = {t["function"]["name"] for t in tools or []}
    for m in body:
        for call in m.get("tool_calls", []):
            if tools and call["function"]["name"] not in names:
                raise RowError(f"a tool call names {call['function']['name']!r}, which the row's tools do not "
                               f"define ({sorted(names)})")
    return msgs


def normalize_row(row: dict[str, Any], fmt: str = "auto", system_prompt: str | None = None,
                  allow_text: bool = False) -> Example:
    """One raw row -> its validated messages and tools, the system prompt added where the row has none.

    Plain-text rows train on every token, which is right for continued
    pre-training and wrong for an instruction set that merely has a stray
    ``text`` field, so they are only accepted when the config says so.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    name = detect_format(row) if fmt == "auto" else fmt
    if name == "text" and not allow_text:
        raise RowError("plain-text row (continued pre-training); set data.allow_text: true to train on it")
    msgs = _DETECTORS[name][1](row)
    if msgs[0]["role"] == TEXT_ROLE:
        return Example(msgs)
    if name in _TOOL_FORMATS:
        tools = _tools(row)
    elif row.get("tools"):  # dropping them would train the answers without the tools they were written for
        raise RowError(f"field 'tools' needs the messages or sharegpt format; this row reads as {name}")
    else:
        tools = None
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return Example(validate_messages(msgs, tools), tools)
