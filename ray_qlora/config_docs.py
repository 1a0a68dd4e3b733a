"""docs/CONFIG.md and the config's JSON schema, both generated from the models in ``config.py``.

The field descriptions in ``config.py`` are the one source of the config's documentation:
``python -m ray_qlora.config_docs --write`` regenerates docs/CONFIG.md from them, and a test
fails when the committed file drifts from the models.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ray_qlora.config import PipelineConfig

__all__ = ["DOC_PATH", "json_schema", "main", "render_markdown"]

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
REGENERATE = "python -m ray_qlora.config_docs --write"

_BOUNDS = ((annotated_types.Gt, ">"), (annotated_types.Ge, ">="), (annotated_types.Lt, "<"),
           (annotated_types.Le, "<="))

_INTRO = f"""\
# Configuration reference

<!-- Generated from ray_qlora/config.py by `{REGENERATE}`; do not edit by hand. -->

One YAML file configures every stage; each top-level key below is a section. Only `run.output_uri`
and an input (`data.input_uris` or `data.sources`) are required:

```yaml
run: {{output_uri: s3://my-bucket/runs}}
data: {{input_uris: ["s3://my-bucket/raw/"]}}
```

- Unknown keys are rejected, and every error names the dotted key to fix.
- `${{VAR}}` and `${{VAR:-default}}` in values are replaced from the environment (not in comments);
  a value that is one reference and comes out empty is `null`.
- Any key can be overridden on the command line: `--set training.learning_rate=1e-4`.
- `ray-qlora validate CONFIG` checks a file; `ray-qlora config-schema` prints the JSON schema
  (for editors and CI).

Types: `mapping` is a section of its own keys, documented after its parent; `null` is YAML's `null`
(or an empty value).
"""


def json_schema() -> dict[str, Any]:
    """The JSON schema of a pipeline config (what `ray-qlora config-schema` prints)."""
    return PipelineConfig.model_json_schema()


def render_markdown() -> str:
    """docs/CONFIG.md: a section per top-level key, a table row per field, nested sections after their parent."""
    sections = PipelineConfig.model_fields
    toc = " · ".join(f"[{name}](#{name})" for name in sections)
    parts = [_INTRO, f"Sections: {toc}\n"]
    for name, info in sections.items():
        nested = _nested(info.annotation)
        assert nested is not None and nested[0] == "", f"top-level key {name} is not a section"
        parts += _render_section(name, nested[1], info, level=2)
    return "\n".join(parts)


def _render_section(key: str, model: type[BaseModel], info: FieldInfo, level: int) -> list[str]:
    """The heading, text and table of one section, then those of the sections inside it."""
    heading = key if level == 2 else f"`{key}`"
    text = _md(inspect.cleandoc(model.__doc__) if model.__doc__ else info.description or "")
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    below: list[tuple[str, type[BaseModel], FieldInfo]] = []
    for name, field in model.model_fields.items():
        dotted = f"{key}.{name}"
        description = _md(field.description or "")
        nested = _nested(field.annotation)
        if nested is not None:
            below.append((dotted + nested[0], nested[1], field))
            description += f" Keys: `{dotted + nested[0]}` below."
        rows.append(f"| `{dotted}` | `{_cell(_type(field))}` | {_cell(_default(field))} | {_cell(description)} |")
    out = [f"{'#' * level} {heading}\n", text + "\n", "\n".join(rows) + "\n"]
    for sub_key, sub_model, sub_info in below:
        out += _render_section(sub_key, sub_model, sub_info, level=3)
    return out


def _nested(tp: Any) -> tuple[str, type[BaseModel]] | None:
    """(key suffix, model) when a field holds a section: itself (''), in a list ('[]') or as dict values ('.<key>')."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        found = [n for n in (_nested(a) for a in args) if n is not None]
        return found[0] if found else None
    if origin is list:
        inner = _nested(args[0])
        return None if inner is None else ("[]" + inner[0], inner[1])
    if origin is dict:
        inner = _nested(args[1])
        return None if inner is None else (".<key>" + inner[0], inner[1])
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "", tp
    return None


def _type(field: FieldInfo) -> str:
    """The field's type as a YAML writer reads it, with its bounds: 'int (>= 1) | "auto"'."""
    return _type_name(field.annotation) + _bounds(field.metadata)


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0]) + _bounds(args[1:])
    if origin is Literal:
        return " | ".join(json.dumps(v) for v in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _bounds(metadata: Any) -> str:
    """' (> 0, <= 1)' from a field's annotated-types constraints ('' when it has none)."""
    out = []
    for item in metadata:
        constraints = getattr(item, "metadata", [item])  # a nested Field(ge=1) carries its own list
        for c in constraints:
            for kind, op in _BOUNDS:
                if isinstance(c, kind):
                    out.append(f"{op} {json.dumps(getattr(c, kind.__name__.lower()))}")
    return f" ({', '.join(out)})" if out else ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`"


def _md(text: str) -> str:
    """Prose as markdown shows it literally: '<name>' is not an HTML tag, '*' not emphasis."""
    return text.replace("\\", "\\\\").replace("<", "\\<").replace("*", "\\*")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (GitHub reads '\\|' as a literal pipe, code spans included)."""
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_qlora.config_docs",
                                description="Print, write or check docs/CONFIG.md (generated from the config models).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"regenerate {DOC_PATH}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the file differs from the models")
    args = p.parse_args(argv)
    text = render_markdown()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text)
        print(f"wrote {DOC_PATH}")
    elif args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date with ray_qlora/config.py; run `{REGENERATE}`", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
