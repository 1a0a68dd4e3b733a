"""The config's documentation and JSON schema stay true to the models they are generated from."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from ray_qlora import env_refs
from ray_qlora.config import PipelineConfig, load_config, parse_config
from ray_qlora.config_docs import DOC_PATH, REGENERATE, json_schema, render_markdown

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
SECTIONS = {"run", "storage", "ray", "data", "model", "lora", "training", "tune", "merge", "eval", "adapters",
            "export", "serve"}
MINIMAL = {"run": {"output_uri": "/tmp/out"}, "data": {"input_uris": ["/tmp/data"]}}


def _models_in(tp: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models a field annotation holds: itself, in a union, a list or a dict's values."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
    elif get_origin(tp) in (Union, types.UnionType, list, dict, tuple):
        for arg in get_args(tp):
            yield from _models_in(arg)


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, FieldInfo) of every field of a model and of the models inside it."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, info
        for inner in _models_in(info.annotation):
            yield from _fields(inner, key + ".")


def test_config_md_matches_the_models() -> None:
    expected = render_markdown()
    actual = DOC_PATH.read_text() if DOC_PATH.is_file() else ""
    if actual != expected:
        diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True),
                                                 "docs/CONFIG.md", "generated"))[:40])
        pytest.fail(f"docs/CONFIG.md is out of date with ray_qlora/config.py; regenerate it with "
                    f"`{REGENERATE}` and commit it.\n{diff}")


def test_every_field_has_a_description() -> None:
    keys = dict(_fields(PipelineConfig))
    assert len(keys) > 100  # the walk reached the nested sections
    missing = sorted(k for k, info in keys.items() if not (info.description or "").strip())
    assert not missing, f"config fields without Field(description=...): {missing}"


def test_every_key_is_documented() -> None:
    doc = render_markdown()
    # a table row per key; list items and dict values are written data.sources[].uri, tune.search_space.<key>.values
    rows = re.findall(r"^\| `([^`]+)` \|", doc, flags=re.MULTILINE)
    assert len(rows) == len(set(rows))
    nested_keys = {k for k, _ in _fields(PipelineConfig) if "." in k}
    assert {r.replace("[]", "").replace(".<key>", "") for r in rows} == nested_keys
    for section in SECTIONS:
        assert f"\n## {section}\n" in doc


def test_config_schema_verb_prints_the_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "ray_qlora.cli", "config-schema"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    schema = json.loads(out)
    assert SECTIONS <= set(schema["properties"])
    assert set(schema["properties"]) == set(PipelineConfig.model_fields)
    assert sorted(schema["required"]) == ["data", "run"]
    assert schema == json_schema()


@pytest.fixture()
def validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_schema_accepts_every_shipped_config(path: Path, validator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An editor or CI validating a shipped file against the schema agrees with load_config."""
    monkeypatch.setenv("RAY_QLORA_OUTPUT", "s3://bucket/out")
    load_config(path)
    data = env_refs.expand(yaml.safe_load(path.read_text()))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors


@pytest.mark.parametrize("section, values", [
    ("data", {"dedup": False}),  # the first config format's switch
    ("lora", {"target_modules": "q_proj,v_proj"}),  # how a search choice gives modules
    ("lora", {"target_modules": ["q_proj", "v_proj"]}),
    ("serve", {"autoscaling": None}),
    ("training", {"batch_size": "auto"}),
])
def test_schema_accepts_what_the_models_accept(section: str, values: dict, validator: Any) -> None:
    data = {**MINIMAL, section: {**MINIMAL.get(section, {}), **values}}
    parse_config(data)
    assert not list(validator.iter_errors(data))


@pytest.mark.parametrize("section, values", [
    ("training", {"learnig_rate": 1e-4}),  # unknown keys are rejected, as load_config does
    ("lora", {"r": 0}),
    ("serve", {"auth": "basic"}),
])
def test_schema_rejects_what_the_models_reject(section: str, values: dict, validator: Any) -> None:
    data = {**MINIMAL, section: values}
    with pytest.raises(ValueError):
        parse_config(data)
    assert list(validator.iter_errors(data))
