"""merge's exports in one call: vLLM layout gate, Modelfiles, a GGUF verified against the merged folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_qlora.config import parse_config


@pytest.fixture()
def merged(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, object]:
    from transformers import AutoModelForCausalLM

    from ray_qlora.merge import _save_export
    from ray_qlora.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    _save_export(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tok, tmp_path / "merged")
    return tmp_path / "merged", tok


def _cfg(tmp_path: Path, **export: object) -> object:
    return parse_config({"run": {"output_uri": str(tmp_path)}, "data": {"input_uris": ["x"], "system_prompt": "Be brief."},
                         "export": {"gguf": "q8_0", **export}})


def test_exports_written_and_gguf_checked_against_the_merged_model(merged: tuple, tmp_path: Path) -> None:
    from ray_qlora.export import ExportError, write_exports

    folder, tok = merged
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Give 5 mg PO daily"}], tokenize=False,
                                       add_generation_prompt=True)]
    out = write_exports(_cfg(tmp_path), folder, tok, prompts, tmp_path / "gguf")
    assert out["vllm_layout"] == "ok"
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM .\n") and 'SYSTEM """Be brief."""' in modelfile
    gguf = out["gguf"]
    assert gguf["file"] == "model-q8_0.gguf" and (tmp_path / "gguf" / "model-q8_0.gguf").is_file()
    assert gguf["tokenizer_match"] and gguf["chat_template_match"] and 0 < gguf["max_rel_logit_diff"] < 0.05
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\n")
    # The same file against a limit q8_0 cannot meet: refused, with the figure and the key to change.
    with pytest.raises(ExportError, match=r"relative logit difference .* > 1e-09 \(export.gguf_max_logit_diff\)"):
        write_exports(_cfg(tmp_path, gguf_max_logit_diff=1e-9), folder, tok, prompts, tmp_path / "gguf2")


def test_layout_problems_stop_the_export(merged: tuple, tmp_path: Path) -> None:
    from ray_qlora.export import ExportError, write_exports

    folder, tok = merged
    (folder / "generation_config.json").unlink()
    with pytest.raises(ExportError, match="not what vLLM loads: generation_config.json missing"):
        write_exports(_cfg(tmp_path), folder, tok, [], tmp_path / "gguf")


def test_non_llama_models_get_no_gguf_but_the_rest(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ray_qlora.export import write_exports
    from ray_qlora.merge import _save_export
    from ray_qlora.modeling import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2))
    _save_export(model, tok, tmp_path / "merged")
    out = write_exports(_cfg(tmp_path), tmp_path / "merged", tok, ["x"], tmp_path / "gguf")
    assert "llama" in out["gguf"]["skipped"].lower() and (tmp_path / "merged" / "Modelfile").is_file()
    assert not list((tmp_path / "gguf").glob("*.gguf"))
    shutil.rmtree(tmp_path / "merged")
