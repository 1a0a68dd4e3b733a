"""Verbs run too early name the verb to run first, before starting any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.config import parse_config
from ray_qlora.errors import StageOrderError
from ray_qlora.pipeline import Run, run_stage


@pytest.mark.parametrize("stage, needs", [("tune", "prepare"), ("merge", "tune"), ("evaluate", "merge"),
                                          ("serve", "merge")])
def test_a_stage_before_the_one_it_needs_is_refused(tmp_path: Path, stage: str, needs: str) -> None:
    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path)]}})
    with pytest.raises(StageOrderError, match=f"stage '{needs}' has not succeeded.*ray-qlora {needs}"):
        run_stage(Run(cfg, "fresh"), stage)


def _cfg(tmp_path: Path, **sections: dict) -> "object":
    data = {"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": [str(tmp_path / "raw")]}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data)


def _succeeded(run: Run, stage: str) -> None:
    run.save_stage(stage, {"status": "succeeded", "result": {}})


def test_run_json_keeps_each_stages_config_and_the_first_as_the_runs(tmp_path: Path) -> None:
    first = Run(_cfg(tmp_path), "r")
    _succeeded(first, "prepare")
    second = Run(_cfg(tmp_path, training={"learning_rate": 1e-3}), "r")
    _succeeded(second, "tune")
    rec = second.record()
    assert rec["config"]["training"]["learning_rate"] == 2e-4  # the run's config is not overwritten
    assert rec["stages"]["prepare"]["config"]["training"]["learning_rate"] == 2e-4
    assert rec["stages"]["tune"]["config"]["training"]["learning_rate"] == 1e-3


@pytest.mark.parametrize("stage, change, key", [
    ("tune", {"model": {"base": "/elsewhere"}}, "model.base"),
    ("tune", {"data": {"max_seq_length": 1024}}, "data.max_seq_length"),
    ("merge", {"lora": {"r": 64}}, "lora.r"),
    ("evaluate", {"data": {"chat_template": "chatml"}}, "data.chat_template"),
])
def test_a_stage_refuses_a_config_that_changes_earlier_outputs(tmp_path: Path, stage: str, change: dict,
                                                               key: str) -> None:
    from ray_qlora.pipeline import LineageError

    run = Run(_cfg(tmp_path), "r")
    for earlier in ("prepare", "tune", "merge")[:("prepare", "tune", "merge", "evaluate").index(stage)]:
        _succeeded(run, earlier)
    changed = Run(_cfg(tmp_path, **change), "r")
    with pytest.raises(LineageError, match=f"(?s){key}: .* now .*--allow-config-change"):
        run_stage(changed, stage)
    assert run.record()["stages"].get(stage) is None  # refused before it started: nothing recorded
    allowed = Run(_cfg(tmp_path, **change), "r", allow_config_change=True)
    assert key in allowed.check_lineage(stage)


def test_changes_that_do_not_touch_earlier_outputs_pass(tmp_path: Path) -> None:
    run = Run(_cfg(tmp_path), "r")
    _succeeded(run, "prepare")
    # speed knobs of prepare, LoRA shape before any tune, training knobs: nothing built from them yet
    changed = Run(_cfg(tmp_path, data={"num_actors": 3, "batch_size": 64}, lora={"r": 8},
                       training={"learning_rate": 1e-3}), "r")
    assert changed.check_lineage("tune") == {}


def test_run_refuses_a_missing_api_key_before_any_stage(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from ray_qlora.config import ConfigError
    from ray_qlora.pipeline import run_pipeline

    monkeypatch.delenv("RAY_QLORA_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="serve.auth is 'api_key' but no key is set"):
        run_pipeline(_cfg(tmp_path), run_id="r")
    assert not (tmp_path / "runs" / "r").exists()  # nothing started


def test_run_refuses_strict_calls_without_xgrammar_before_any_stage(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import sys

    from ray_qlora.config import ConfigError
    from ray_qlora.pipeline import run_pipeline

    monkeypatch.setenv("RAY_QLORA_API_KEYS", "k")
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if the structured extra were not installed
    with pytest.raises(ConfigError, match=r"serve.strict_tools: .*needs xgrammar.*set serve.strict_tools: false"):
        run_pipeline(_cfg(tmp_path, serve={"strict_tools": True}), run_id="r")
    assert not (tmp_path / "runs" / "r").exists()  # nothing started
