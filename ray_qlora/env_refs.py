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
from collections.abc import Callable, Mapping
from typing import Any

REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnsetVariable(Exception):
    """A ``${NAME}`` without a default whose variable is not set."""

    def __init__(self, key: str, name: str) -> None:
        super().__init__(f"{key}: environment variable {name} is not set (used as ${{{name}}}); "
                         f"set it, or give a default: ${{{name}:-...}}")
        self.key, self.name = key, name


def _map_strings(data: Any, fn: Callable[[str, str], Any], key: str = "") -> Any:
    """``data`` rebuilt with ``fn(dotted key, text)`` in place of every string in its mappings and lists;
    keys are named as config errors name them (``data.sources[0].uri``)."""
    if isinstance(data, Mapping):
        return {k: _map_strings(v, fn, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [_map_strings(v, fn, f"{key}[{i}]") for i, v in enumerate(data)]
    return fn(key, data) if isinstance(data, str) else data


def references(data: Any) -> list[tuple[str, str, str | None]]:
    """(dotted key, NAME, default or None) for every reference in the values of ``data``."""
    found: list[tuple[str, str, str | None]] = []

    def note(key: str, text: str) -> str:
        found.extend((key, m.group(1), m.group(2)) for m in REF.finditer(text))
        return text

    _map_strings(data, note)
    return found


def expand(data: Any, environ: Mapping[str, str] = os.environ) -> Any:
    """``data`` with every reference in its string values replaced from ``environ``.

    Replaced values are strings; the config's field types turn "4" or "true"
    into numbers and booleans. A value that is a single reference and comes
    out empty becomes null, so ``endpoint_url: ${AWS_ENDPOINT_URL:-}`` means
    "unset", as an empty value would.
    """

    def replace(key: str, text: str) -> str | None:
        def value(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in environ:
                return environ[name]
            if default is None:
                raise UnsetVariable(key, name)
            return default

        out = REF.sub(value, text)
        return None if out == "" and REF.fullmatch(text) else out

    return _map_strings(data, replace)
