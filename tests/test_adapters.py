"""The adapter registry: versioned publishes with their lineage, names that cannot be paths, pickles refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ray_qlora import adapters, storage
from ray_qlora.config import parse_config


def _cfg(output_uri: str, base: Path, **extra: Any) -> Any:
    return parse_config({"run": {"output_uri": output_uri}, "data": {"input_uris": ["x"]},
                         "model": {"base": str(base), **extra}, "export": {"ollama": False}})


def _publish(cfg: Any, adapter: Path, name: str = "med-orders", **prov: Any) -> dict[str, Any]:
    return adapters.publish(cfg, str(adapter), name, {"run_id": "r1", "metrics": {"best_eval_loss": 0.5}, **prov})


def test_publish_versions_list_show_delete(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path) -> None:
    from ray_qlora.modeling import base_fingerprint, load_tokenizer

    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    first, second = _publish(cfg, adapter_dir), _publish(cfg, adapter_dir, trial="t2")
    assert (first["version"], second["version"]) == ("v1", "v2")
    folder = tmp_path / "out" / "adapters" / "med-orders" / "v2"
    assert second["uri"] == str(folder)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                   "chat_template.jinja", "metadata.json"}
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["base_model"]["sha256"] == base_fingerprint(tiny_model_dir)
    assert meta["base_model"]["model_type"] == "llama"
    assert meta["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    assert meta["run_id"] == "r1" and meta["trial"] == "t2" and meta["metrics"] == {"best_eval_loss": 0.5}
    import hashlib
    assert meta["files"]["adapter_model.safetensors"] == hashlib.sha256(
        (adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert (folder / "chat_template.jinja").read_text() == load_tokenizer(tiny_model_dir).chat_template

    rows = adapters.list_adapters(cfg)
    assert [(r["name"], r["version"], r["versions"]) for r in rows] == [("med-orders", "v2", 2)]
    assert "med-orders" in adapters.format_list(rows)
    assert adapters.show(cfg, "med-orders")["versions"] == ["v1", "v2"]
    assert "trial" not in adapters.show(cfg, "med-orders", "v1")  # v1 was published without one
    assert adapters.resolve(cfg, "med-orders", "v1").endswith("med-orders/v1")

    assert adapters.delete(cfg, "med-orders", "v1") == ["med-orders/v1"]
    assert adapters.show(cfg, "med-orders")["versions"] == ["v2"]
    assert _publish(cfg, adapter_dir)["version"] == "v3"  # versions are never reused
    assert adapters.delete(cfg, "med-orders") == ["med-orders/v2", "med-orders/v3"]
    assert adapters.list_adapters(cfg) == [] and not (tmp_path / "out" / "adapters" / "med-orders").exists()


def test_a_version_without_metadata_is_not_listed(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path) -> None:
    """metadata.json is written last: a publish that died half-way is invisible, not half-loaded."""
    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    _publish(cfg, adapter_dir)
    half = tmp_path / "out" / "adapters" / "med-orders" / "v2"
    half.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", half)
    assert adapters.show(cfg, "med-orders")["versions"] == ["v1"]


def test_registered_adapter_loads_in_peft_and_passes_vllm_checks(tmp_path: Path, tiny_model_dir: Path,
                                                                 adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_qlora.export.vllm import adapter_problems

    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    folder = Path(adapters.resolve(cfg, _publish(cfg, adapter_dir)["name"]))
    assert adapter_problems(folder, max_lora_rank=16) == []
    assert "max-lora-rank 4" in adapter_problems(folder, max_lora_rank=2)[0]
    ids = torch.tensor([[1, 5, 9, 200]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(folder))
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter_dir))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


@pytest.mark.parametrize("name", ["../x", "s3://bucket/key", "Med", "", "a/b", "-x", "x" * 64, "..", "a b"])
def test_names_that_could_be_paths_are_refused(tmp_path: Path, tiny_model_dir: Path, name: str) -> None:
    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    with pytest.raises(adapters.AdapterError, match="not valid"):
        adapters.show(cfg, name)


@pytest.mark.parametrize("version", ["2", "v0", "../v1", "v1/..", "latest2"])
def test_bad_versions_are_refused(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path, version: str) -> None:
    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    _publish(cfg, adapter_dir)
    with pytest.raises(adapters.AdapterError, match="version"):
        adapters.show(cfg, "med-orders", version)


def test_missing_names_and_versions_say_what_exists(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path) -> None:
    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    with pytest.raises(adapters.AdapterError, match="no adapter named 'nope'.*adapters list"):
        adapters.resolve(cfg, "nope")
    _publish(cfg, adapter_dir)
    with pytest.raises(adapters.AdapterError, match="no version v7 .*it has v1"):
        adapters.resolve(cfg, "med-orders", "v7")


def test_pickled_adapter_refused_unless_allowed(tmp_path: Path, tiny_model_dir: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text("{}")
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    cfg = _cfg(str(tmp_path / "out"), tiny_model_dir)
    with pytest.raises(adapters.AdapterError, match="pickle.*model.allow_pickle"):
        _publish(cfg, pickled)
    assert not (tmp_path / "out" / "adapters" / "med-orders").exists()
    allowed = _cfg(str(tmp_path / "out"), tiny_model_dir, allow_pickle=True)
    assert set(_publish(allowed, pickled)["files"]) == {"adapter_config.json", "adapter_model.bin"}


def test_registry_on_s3(local_s3: Any, tiny_model_dir: Path, adapter_dir: Path) -> None:
    local_s3.create_bucket("registry")
    cfg = _cfg("s3://registry/out", tiny_model_dir)
    meta = _publish(cfg, adapter_dir, name="s3-adapter")
    assert meta["uri"] == "s3://registry/out/adapters/s3-adapter/v1"
    assert storage.exists(storage.join(meta["uri"], "adapter_model.safetensors"), cfg.storage)
    assert [r["name"] for r in adapters.list_adapters(cfg)] == ["s3-adapter"]
    assert adapters.delete(cfg, "s3-adapter") == ["s3-adapter/v1"]
    assert adapters.list_adapters(cfg) == []


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_named_chat_templates_are_kept_and_picked_as_transformers_picks(where: str, tmp_path: Path, request: Any,
                                                                         tiny_model_dir: Path,
                                                                         adapter_dir: Path) -> None:
    """Some tokenizers ship a dict of templates ('default', 'tool_use'): the registry keeps them all, in
    transformers' own layout, and serving renders with the one training used."""
    from ray_qlora.data.templating import pick_template
    from ray_qlora.modeling import load_tokenizer

    if where == "s3":
        request.getfixturevalue("local_s3").create_bucket("named")
    cfg = _cfg("s3://named/out" if where == "s3" else str(tmp_path / "out"), tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = {"default": "plain:{{ messages[0].content }}", "tool_use": "tools:{{ tools | length }}"}
    meta = adapters.publish(cfg, str(adapter_dir), "named", {"run_id": "r1"}, tokenizer=tok)
    assert storage.read_bytes(storage.join(meta["uri"], "additional_chat_templates/tool_use.jinja"),
                              cfg.storage).decode() == "tools:{{ tools | length }}"
    kept = adapters.read_templates(cfg, meta["uri"])
    assert kept == tok.chat_template
    msgs, tools = [{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "f"}}]
    for offered in (None, tools):  # the same text as transformers' own choice among the named templates
        assert tok.apply_chat_template(msgs, chat_template=pick_template(kept, offered), tools=offered,
                                       tokenize=False) == tok.apply_chat_template(msgs, tools=offered, tokenize=False)
    assert pick_template(kept, tools) == "tools:{{ tools | length }}"
    tok.chat_template = {"default": "x", "../up": "y"}
    with pytest.raises(adapters.AdapterError, match="not a plain name"):
        adapters.publish(cfg, str(adapter_dir), "named", {"run_id": "r1"}, tokenizer=tok)
    assert adapters.show(cfg, "named")["versions"] == ["v1"] and not storage.exists(
        storage.join(meta["uri"].replace("/v1", "/v2"), "adapter_config.json"), cfg.storage)  # nothing written


def test_cli_verbs_and_their_errors(tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path, capsys) -> None:  # noqa: ANN001
    from ray_qlora.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"run": {"output_uri": str(tmp_path / "out")}, "data": {"input_uris": ["x"]},
                                  "model": {"base": str(tiny_model_dir)}, "export": {"ollama": False}}))
    assert main(["adapters", "list", str(config)]) == 0
    assert "no adapters published yet" in capsys.readouterr().out
    _publish(_cfg(str(tmp_path / "out"), tiny_model_dir), adapter_dir)
    assert main(["adapters", "show", str(config), "--name", "med-orders"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert main(["adapters", "show", str(config)]) == 2
    assert "needs --name" in capsys.readouterr().err
    assert main(["adapters", "show", str(config), "--name", "../../etc"]) == 2
    assert "not valid" in capsys.readouterr().err
    assert main(["adapters", "publish", str(config), "--run-id", "never-ran"]) == 2
    assert "stage 'tune' has not succeeded" in capsys.readouterr().err
    assert main(["adapters", "delete", str(config), "--name", "med-orders"]) == 0
    assert "deleted med-orders/v1" in capsys.readouterr().out
