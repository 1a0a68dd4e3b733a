"""Tool calling on the transformers engine: OpenAI's ``tools`` and ``tool_choice``, read the way vLLM reads them.

A forced call (``tool_choice: "required"`` or a named function) is structured
output: the schema generation follows is the function's ``parameters`` (named),
or an array of ``{"name", "parameters"}`` objects, one per call (required). So
the call parses, names a function the client offered and has the arguments it
declared, whatever the model's weights say, on any model; vLLM builds the same
two schemas for the same two choices.

``"auto"`` lets the model choose between text and calls, so the calls must be
read back out of free text, and how a model writes them is its own (Hermes'
``<tool_call>`` tags, Mistral's ``[TOOL_CALLS]``, ...). transformers' response
parser reads them with the ``response_template`` a model's tokenizer ships;
a tokenizer without one (SmolLM2's, most older ones) is read as Hermes, the
commonest format and the one the vLLM engine is started with. A model that
writes no calls that way answers in text, as it would without tools.

A strict ``"auto"`` (a function with OpenAI's ``strict: true``, or
serve.strict_tools) still lets the model choose, but once it opens a Hermes
``<tool_call>`` tag the rest of the call is held to a grammar: an offered
function's name and arguments that follow its parameters (an enum's values
only, declared types, required keys), then the closing tag. That is
xgrammar's structural tag with ``<tool_call>`` as its trigger, the same
construction vLLM uses for its Hermes parser (``strict_tag``).

Kept free of Ray and torch, like api.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Literal

__all__ = ["HERMES", "ToolMode", "ToolStream", "call_schema", "new_call_id", "read_calls", "strict_tag",
           "wants_strict"]

ToolMode = Literal["none", "auto", "required", "named"]

# Hermes' calls, <tool_call>{"name": ..., "arguments": {...}}</tool_call>, as a transformers response_template
HERMES: dict[str, Any] = {
    "start_anchor_pattern": "^",  # given only the generated text, which the answer starts
    "fields": {
        "content": {"content": "text"},
        "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "content": "json", "repeats": True,
                       "transform": {"type": "function",
                                     "function": {"name": "{content.name}", "arguments": "{content.arguments}"}}},
    },
}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    # OpenAI: a function without parameters takes none; an empty object is what it must be called with
    return function.get("parameters") or {"type": "object", "properties": {}}


def call_schema(functions: list[dict[str, Any]], mode: ToolMode, name: str | None,
                parallel: bool = True) -> dict[str, Any] | None:
    """The JSON schema a forced call is generated under (None for 'none' and 'auto': free text).

    ``functions``: the request's ``tools[i].function`` objects; ``name``: the named choice's function.
    """
    if mode == "named":
        return _parameters(next(f for f in functions if f["name"] == name))
    if mode != "required":
        return None
    # each function's parameters move inside the list's items, but their "#/$defs/..." references still
    # point at the root: the definitions move there (as vLLM does); a name two tools define differently
    # is a ValueError
    defs: dict[str, Any] = {}
    one_call = []
    for f in functions:
        params = dict(_parameters(f))
        for key, value in params.pop("$defs", {}).items():
            if defs.setdefault(key, value) != value:
                raise ValueError(f"tools define $defs/{key} differently; tool_choice 'required' needs one "
                                 "meaning per name")
        one_call.append({"type": "object",
                         "properties": {"name": {"type": "string", "enum": [f["name"]]}, "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": one_call}}
    if not parallel:  # parallel_tool_calls: false is at most one call per answer
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


# How a Hermes call opens and closes: with the newlines the tool front (and Qwen, Hermes) write, or without,
# as some models do; both parse.
_HERMES_FORMS = (('<tool_call>\n{"name": ', '}\n</tool_call>'), ('<tool_call>{"name": ', '}</tool_call>'))


def wants_strict(functions: list[dict[str, Any]], default: bool) -> bool:
    """Whether 'auto' calls are held to the tools' schemas: a function asks (``strict: true``), or the server
    does (serve.strict_tools) unless a function says ``strict: false``."""
    flags = [f.get("strict") for f in functions]
    return True in flags or (default and False not in flags)


def strict_tag(functions: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """The xgrammar structural tag for strict 'auto' calls written as Hermes ``<tool_call>`` tags.

    Text is free until the model writes ``<tool_call>``; from there it must write one offered function's
    name and arguments under its parameters, and close the tag. JSON whitespace is capped at one character
    at a time: the tool front writes ``{"a": 1}``, and a grammar allowing any whitespace lets a small model
    spend its budget on newlines (why response_format is generated without free whitespace).
    """
    if not functions:  # nothing to call: any text (a row without tools in a batch of strict ones)
        return {"type": "structural_tag", "format": {"type": "any_text"}}
    tags = [{"type": "tag", "begin": f"{begin}{json.dumps(f['name'])}, \"arguments\": ",
             "content": {"type": "json_schema", "json_schema": _parameters(f), "max_whitespace_cnt": 1},
             "end": end}
            for f in functions for begin, end in _HERMES_FORMS]
    return {"type": "structural_tag",
            "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags,
                       "stop_after_first": not parallel}}


def _parse_auto(text: str, tok: Any, prompt: str, functions: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The message transformers' response parser reads from a free answer ({} when it cannot)."""
    from transformers.utils.chat_parsing import parse_response

    own = getattr(tok, "response_template", None)
    tools = [{"type": "function", "function": f} for f in functions or []] or None
    try:
        # a model's own template may need the prompt (what its chat template pre-writes of the answer)
        return parse_response(text, own or HERMES, prefix=prompt if own else "", tools=tools)
    except ValueError:  # a call cut short (max_tokens) or malformed: the text as it came
        return {}


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def read_calls(out: dict[str, Any], mode: ToolMode, name: str | None = None, tok: Any = None,
               prompt: str = "", functions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``out`` (one generated answer) with its tool calls read: ``tool_calls`` set and ``text`` what is left.

    The finish reason follows OpenAI and vLLM: 'tool_calls' when the model chose to call (required, or
    auto with calls), 'stop' for a named call. An answer cut by max_tokens keeps 'length' and, when its
    calls do not parse, its text and no calls: the client sees what was generated and why it stopped.
    """
    text, finish = out["text"], out["finish_reason"]
    calls: list[dict[str, Any]] = []
    if mode == "named" and name is not None:
        calls = [_call(name, text)]
        text = None
    elif mode == "required":
        try:
            calls = [_call(c["name"], c["parameters"]) for c in json.loads(text)]
            text = None
        except (ValueError, TypeError, KeyError):
            pass  # only an answer cut short can fail: the grammar allowed nothing else
        if calls and finish == "stop":
            finish = "tool_calls"
    elif mode == "auto":
        message = _parse_auto(text, tok, prompt, functions)
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            calls.append(_call(str(fn.get("name", "")), fn.get("arguments", {})))
        if calls:
            text = message.get("content") or None
            finish = "tool_calls" if finish == "stop" else finish
    return {**out, "text": text, "finish_reason": finish, "tool_calls": calls or None}


class ToolStream:
    """A streamed answer that may hold tool calls: what to send as it comes, and the calls at the end.

    Under 'auto' read as Hermes, text is sent as it comes up to what may start a ``<tool_call>`` tag (held
    back like a stop sequence), so a model answering in text streams as without tools; from the tag on,
    the rest waits for the end, when the whole answer is read. Forced calls, and calls in a model's own
    format (whose markers this cannot know), are all held: only the whole answer tells calls from text.
    """

    def __init__(self, read: Callable[[dict[str, Any]], dict[str, Any]], mode: ToolMode, tok: Any) -> None:
        from ray_qlora.generation import StopScanner

        self.read = read
        hermes = mode == "auto" and getattr(tok, "response_template", None) is None
        self.scanner = StopScanner([HERMES["fields"]["tool_calls"]["open"]]) if hermes else None
        self.texts: list[str] = []
        self.sent = ""
        self.pending: list[dict[str, Any]] = []  # logprobs of text not sent yet

    def feed(self, text: str, logprobs: list[dict[str, Any]] | None) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, the logprobs to send with it)."""
        self.texts.append(text)
        self.pending += logprobs or []
        if self.scanner is None:
            return "", []
        out, tagged = self.scanner.feed(text)
        if tagged:
            self.scanner = None  # a call has started: the rest waits for the end
        self.sent += out
        if not out or tagged or self.scanner.buffer:  # type: ignore[union-attr]
            return out, []  # some of these tokens' text is still held: their logprobs wait with it
        sent, self.pending = self.pending, []
        return out, sent

    def finish(self, finish_reason: str, logprobs: list[dict[str, Any]] | None
               ) -> tuple[dict[str, Any], str | None, list[dict[str, Any]]]:
        """(the answer read, its content not sent yet (None: none), the logprobs not sent yet)."""
        out = self.read({"text": "".join(self.texts), "finish_reason": finish_reason})
        text = out["text"] or ""
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        return out, rest or None, self.pending + (logprobs or [])
