"""Stage 3, merge: fold the best adapter into the 16-bit base and export it.

The adapter trained against a 4-bit base is merged into the 16-bit base (not
the 4-bit one: merging into quantized weights would bake quantization error
into the result). The export is then verified: the merged model, reloaded
from what was written, must give the same greedy answers as the unmerged
base + adapter on held-out prompts before anything downstream uses it.
Then the exports (see ray_qlora/export): the folder is checked to be what
vLLM loads, gets an Ollama Modelfile and a model card, and a GGUF is written
beside it and verified against it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from ray_qlora import storage
from ray_qlora.config import PipelineConfig

__all__ = ["merge"]

log = logging.getLogger(__name__)


def _save_export(model: Any, tok: Any, out: Path) -> None:
    """safetensors + tokenizer (with its chat template) + a generation config that stops at end of turn."""
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, k, None)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _local_adapter(cfg: PipelineConfig, adapter_uri: str) -> Path:
    """The adapter folder, local; refused if its weights are a pickle the config does not allow."""
    from ray_qlora.adapters import check_adapter_files

    names = {Path(u).name for u in storage.list_files(adapter_uri, cfg.storage)}
    check_adapter_files(names, cfg.model.allow_pickle, adapter_uri)
    return storage.copy_dir_from(adapter_uri, None, cfg.storage)


def _lineage(cfg: PipelineConfig, run: storage.RunPaths, base_path: Path) -> dict[str, Any]:
    """Hashes that tie the merged model to its base and data (for the model card)."""
    from ray_qlora.modeling import base_fingerprint

    out: dict[str, Any] = {"base_sha256": base_fingerprint(base_path) if base_path.is_dir() else None}
    if storage.exists(run.manifest, cfg.storage):
        out["data_manifest_sha256"] = hashlib.sha256(storage.read_bytes(run.manifest, cfg.storage)).hexdigest()
    return out


def merge(cfg: PipelineConfig, run: storage.RunPaths, adapter_uri: str) -> dict[str, Any]:
    """Merge, export to ``<run>/merged`` (+ ``<run>/gguf``), verify; returns the verification figures."""
    from peft import PeftModel

    from ray_qlora.export import write_exports
    from ray_qlora.generation import eval_prompts, generate, inference_dtype
    from ray_qlora.model_card import render_card
    from ray_qlora.modeling import load_16bit, load_tokenizer, pick_device, resolve_base, torch_dtype

    trust = cfg.model.trust_remote_code
    device = pick_device()
    base_path = resolve_base(cfg.model, cfg.storage)
    tok = load_tokenizer(base_path, cfg.data.chat_template, trust_remote_code=trust)
    adapter = _local_adapter(cfg, adapter_uri)
    run_dtype = inference_dtype(cfg.merge.dtype, device)

    unmerged = PeftModel.from_pretrained(load_16bit(base_path, run_dtype, device, trust), str(adapter))
    unmerged.eval()
    prompts = eval_prompts(cfg, run, cfg.merge.verify_prompts) if cfg.merge.verify else []
    convs = [p for p, _ in prompts]
    before = generate(unmerged, tok, convs, cfg.merge.verify_max_new_tokens) if convs else []

    merged = unmerged.merge_and_unload().to(torch_dtype(cfg.merge.dtype))
    with tempfile.TemporaryDirectory() as d:
        out, gguf_dir = Path(d) / "merged", Path(d) / "gguf"
        _save_export(merged, tok, out)
        del merged, unmerged
        result: dict[str, Any] = {"dtype": cfg.merge.dtype, "adapter_uri": adapter_uri,
                                  "merged_uri": run.merged, "verified": False, **_lineage(cfg, run, base_path)}
        if convs:
            reloaded = load_16bit(out, run_dtype, device, trust)
            after = generate(reloaded, load_tokenizer(out, trust_remote_code=trust), convs,
                             cfg.merge.verify_max_new_tokens)
            same = [a["text"] == b["text"] for a, b in zip(before, after)]
            match = sum(same) / len(same)
            result.update(verify_prompts=len(same), verify_match=match,
                          mismatches=[{"prompt": convs[i][-1]["content"], "unmerged": before[i]["text"],
                                       "merged": after[i]["text"]} for i, s in enumerate(same) if not s][:5])
            if match < cfg.merge.verify_min_match:
                raise RuntimeError(
                    f"merge: merged model matches the unmerged one on {match:.0%} of prompts, below "
                    f"merge.verify_min_match={cfg.merge.verify_min_match}; export not published")
            result["verified"] = True
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs[:4]]
        exports = write_exports(cfg, out, tok, texts, gguf_dir)
        if "file" in exports.get("gguf", {}):
            exports["gguf"]["uri"] = storage.join(run.gguf, exports["gguf"].get("file", ""))
        result["exports"] = exports
        result["gguf"] = exports.get("gguf")
        record = storage.read_json(run.run_json, cfg.storage) if storage.exists(run.run_json, cfg.storage) else {}
        (out / "README.md").write_text(render_card(cfg, run.run_id, record, result))
        storage.copy_dir_to(out, run.merged, cfg.storage)
        if gguf_dir.is_dir() and any(gguf_dir.iterdir()):
            storage.copy_dir_to(gguf_dir, run.gguf, cfg.storage)
    log.info("merge: exported %s (verified=%s, match=%s)", run.merged, result["verified"],
             result.get("verify_match"))
    return result
