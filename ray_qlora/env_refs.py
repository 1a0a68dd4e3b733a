"""``${VAR}`` and ``${VAR:-default}`` in a config's values, found and replaced after the YAML is parsed.

Working on the parsed values rather than the file's text means that a
reference in a comment is ignored (a commented-out line does not need its
variable set), and that a value holding YAML's own characters (``: ``, `` #``,
quotes, a newline) stays one string instead of reshaping the document.

Only the standard library here: ``jobs/runtime_env.py`` imports this module on
the machine that submits a job, which may have nothing but Ray installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnsetVariable(Exception):
    """A ``${NAME}`` without a default whose variable is not set."""

    def __init__(self, key: str, name: str) -> None:
        super().__init__(f"{key or '<root>'}: environment variable {name} is not set (used as ${{{name}}}); "
                         f"set it, or give a default: ${{{name}:-...}}")
        self.key, self.name = key, name


def _child(key: str, k: Any) -> str:
    """The dotted key of ``k`` inside ``key``, as config errors name it: ``data.sources[0].uri``."""
    if isinstance(k, int):
        return f"{key}[{k}]"
    return f"{key}.{k}" if key else str(k)


def _walk(data: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) for every string value in nested mappings and lists."""
    if isinstance(data, Mapping):
        for k, v in data.items():
            yield from _walk(v, _child(key, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _walk(v, _child(key, i))
    elif isinstance(data, str):
        yield key, data


def references(data: Any) -> Iterator[tuple[str, str, str | None]]:
    """(dotted key, NAME, default or None) for every reference in the values of ``data``."""
    for key, text in _walk(data):
        for m in REF.finditer(text):
            yield key, m.group(1), m.group(2)


def expand(data: Any, environ: Mapping[str, str] = os.environ, key: str = "") -> Any:
    """``data`` with every reference in its string values replaced from ``environ``.

    Replaced values are strings; the config's field types turn "4" or "true"
    into numbers and booleans. A value that is a single reference and comes
    out empty becomes null, so ``endpoint_url: ${AWS_ENDPOINT_URL:-}`` means
    "unset", as an empty value would.
    """
    if isinstance(data, Mapping):
        return {k: expand(v, environ, _child(key, k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand(v, environ, _child(key, i)) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in environ:
            return environ[name]
        if default is None:
            raise UnsetVariable(key, name)
        return default

    out = REF.sub(value, data)
    return None if out == "" and REF.fullmatch(data) else out
