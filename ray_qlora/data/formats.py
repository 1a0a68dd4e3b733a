"""Row formats -> one message schema.

Every supported format becomes ``[{"role": ..., "content": ...}, ...]`` (the
OpenAI chat shape). A row that fits no format, or whose conversation is
unusable, raises ``RowError`` with a reason that lands in quarantine.
Adding a format (ShareGPT, say) means adding one ``_from_*`` function and one
entry in ``_DETECTORS``.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["ROLES", "RowError", "detect_format", "normalize_row", "validate_messages"]

ROLES = ("system", "user", "assistant")
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


def _from_messages(row: dict[str, Any]) -> list[Message]:
    msgs = row.get("messages")
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise RowError("field 'messages' must be a non-empty list")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role {role!r} is not one of {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"messages[{i}].content must be a non-empty string")
        out.append({"role": role, "content": content})
    return out


_DETECTORS: dict[str, tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], list[Message]]]] = {
    "messages": (lambda r: "messages" in r, _from_messages),
    "alpaca": (lambda r: "instruction" in r or "output" in r, _from_alpaca),
    "prompt_completion": (lambda r: "prompt" in r or "completion" in r, _from_prompt_completion),
}


def detect_format(row: dict[str, Any]) -> str:
    for name, (matches, _) in _DETECTORS.items():
        if matches(row):
            return name
    raise RowError(f"unrecognised row format with keys {sorted(row)}; expected one of {list(_DETECTORS)}")


def validate_messages(msgs: list[Message]) -> list[Message]:
    """A trainable conversation: optional leading system, then user/assistant turns, ending on assistant."""
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


def normalize_row(row: dict[str, Any], fmt: str = "auto", system_prompt: str | None = None) -> list[Message]:
    """One raw row -> validated messages, the system prompt added where the row has none."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    name = detect_format(row) if fmt == "auto" else fmt
    msgs = _DETECTORS[name][1](row)
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    return validate_messages(msgs)
