"""Row formats -> one message schema.

Every supported format becomes ``[{"role": ..., "content": ...}, ...]`` (the
OpenAI chat shape): Alpaca, ShareGPT, OpenAI messages (content as a string or
a list of text parts), prompt/completion, and plain text for continued
pre-training, which becomes one message of role ``text`` (every token
labelled). A row that fits no format, or whose conversation is unusable,
raises ``RowError`` with a reason that lands in quarantine. Adding a format
means adding one ``_from_*`` function and one entry in ``_DETECTORS``.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["FORMATS", "ROLES", "TEXT_ROLE", "RowError", "detect_format", "normalize_row", "validate_messages"]

ROLES = ("system", "user", "assistant")
TEXT_ROLE = "text"  # a plain-text example: one message, trained on every token

# ShareGPT's speaker names as they appear in public datasets -> chat roles.
_SHAREGPT_ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bot": "assistant",
    "system": "system",
}
Message = dict[str, str]


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


def _from_messages(row: dict[str, Any]) -> list[Message]:
    msgs = row.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RowError("field 'messages' must be a non-empty list")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role {role!r} is not one of {list(ROLES)}")
        out.append({"role": role, "content": _content_text(m.get("content"), f"messages[{i}].content")})
    return out


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
        out.append({"role": role, "content": _content_text(value, f"conversations[{i}].value")})
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


def detect_format(row: dict[str, Any]) -> str:
    for name, (matches, _) in _DETECTORS.items():
        if matches(row):
            return name
    raise RowError(f"unrecognised row format with keys {sorted(row)}; expected one of {list(_DETECTORS)}")


def validate_messages(msgs: list[Message]) -> list[Message]:
    """A trainable conversation: optional leading system, then user/assistant turns, ending on assistant."""
    if msgs[0]["role"] == TEXT_ROLE:
        return msgs
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if any(m["role"] == "system" for m in body):
        raise RowError("a system message may only come first")
    if not body or body[-1]["role"] != "assistant":
        raise RowError("the conversation must end with an assistant message")
    for prev, cur in zip(body, body[1:]):
        if prev["role"] == cur["role"]:
            raise RowError(f"two '{cur['role']}' messages in a row; turns must alternate")
    if body[0]["role"] != "user":
        raise RowError("the first turn after the system message must be the user's")
    return msgs


def normalize_row(row: dict[str, Any], fmt: str = "auto", system_prompt: str | None = None,
                  allow_text: bool = False) -> list[Message]:
    """One raw row -> validated messages, the system prompt added where the row has none.

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
        return msgs
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return validate_messages(msgs)
