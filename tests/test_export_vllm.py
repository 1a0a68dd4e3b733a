"""Merged folders have vLLM's layout; bases with pickles or their own code are refused unless allowed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ray_qlora.config import ConfigError, ModelConfig, StorageConfig
from ray_qlora.export.vllm import merged_problems
from ray_qlora.modeling import resolve_base


@pytest.fixture()
def merged_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model saved the way merge saves (generation config ending at end of turn)."""
    from transformers import AutoModelForCausalLM

    from ray_qlora.merge import _save_export
    from ray_qlora.modeling import load_tokenizer

    out = tmp_path / "merged"
    _save_export(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), load_tokenizer(tiny_model_dir), out)
    return out


def test_merge_output_has_vllm_layout(merged_dir: Path, tiny_model_dir: Path) -> None:
    from ray_qlora.modeling import load_tokenizer

    eot = load_tokenizer(tiny_model_dir).eos_token_id
    assert merged_problems(merged_dir, eot) == []
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == eot
    assert "<|im_start|>" in (merged_dir / "chat_template.jinja").read_text()


def test_each_missing_piece_is_named(merged_dir: Path) -> None:
    (merged_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert any("eos_token_id is 0, not the end-of-turn id 2" in p for p in merged_problems(merged_dir, 2))
    (merged_dir / "generation_config.json").unlink()
    (merged_dir / "chat_template.jinja").unlink()
    (merged_dir / "pytorch_model.bin").write_bytes(b"x")
    problems = " | ".join(merged_problems(merged_dir, 2))
    assert "generation_config.json missing" in problems
    assert "no chat template" in problems
    assert "pickled files next to the weights: pytorch_model.bin" in problems
    for f in merged_dir.glob("*.safetensors"):
        f.unlink()
    assert "no *.safetensors weights" in " | ".join(merged_problems(merged_dir))


def _base_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    return base


def test_pickled_base_refused_unless_allowed(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = _base_copy(tiny_model_dir, tmp_path)
    for f in base.glob("*.safetensors"):
        f.rename(base / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickled weights only.*model.allow_pickle"):
        resolve_base(ModelConfig(base=str(base)), StorageConfig())
    assert resolve_base(ModelConfig(base=str(base), allow_pickle=True), StorageConfig()) == base


def test_remote_code_refused_unless_trusted(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = _base_copy(tiny_model_dir, tmp_path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    with pytest.raises(ConfigError, match="auto_map.*model.trust_remote_code"):
        resolve_base(ModelConfig(base=str(base)), StorageConfig())
    assert resolve_base(ModelConfig(base=str(base), trust_remote_code=True), StorageConfig()) == base


def test_model_card_names_lineage_metrics_and_loading(tmp_path: Path) -> None:
    from ray_qlora.config import parse_config
    from ray_qlora.model_card import render_card

    cfg = parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"]}})
    record = {"root": "s3://b/runs/r1", "stages": {
        "prepare": {"result": {"counts": {"train": 240, "eval": 40}}},
        "tune": {"result": {"best_trial": "train_trial_abc", "best_params": {"learning_rate": 0.004},
                            "metric": "eval_loss", "best_value": 0.12, "trials": 4}}}}
    merge = {"dtype": "bfloat16", "base_sha256": "f" * 64, "data_manifest_sha256": "e" * 64,
             "adapter_uri": "s3://b/runs/r1/trials/x", "verified": True, "verify_match": 1.0, "verify_prompts": 8,
             "gguf": {"uri": "s3://b/runs/r1/gguf/model-f16.gguf", "gguf_type": "f16", "max_abs_logit_diff": 0.01}}
    report = {"examples": 40, "base": {"eval_loss": 2.5, "exact_match": 0.0},
              "tuned": {"eval_loss": 0.2, "exact_match": 0.875}}
    card = render_card(cfg, "r1", record, merge, report)
    assert card.startswith("---\nbase_model: smollm2-135m-instruct\n")
    for text in ("f" * 64, "e" * 64, "240 / 40", "train_trial_abc", '{"learning_rate": 0.004}',
                 "| exact_match | 0.0% | 87.5% |", "| eval_loss | 2.5000 | 0.2000 |", "ollama create r1 -f Modelfile",
                 "\n    \"learning_rate\": 0.004,",  # the training config as the best trial ran it
                 "vllm serve", "model-f16.gguf", "100% of 8 held-out prompts"):
        assert text in card, text
    assert "## Evaluation" not in render_card(cfg, "r1", record, merge)  # before evaluate: no metrics yet
