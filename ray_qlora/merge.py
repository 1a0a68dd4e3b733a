"""Stage 3, merge: fold the best adapter into the 16-bit base and export it.

The adapter trained against a 4-bit base is merged into the 16-bit base (not
the 4-bit one: merging into quantized weights would bake quantization error
into the result). The export is then verified: the merged model, reloaded
from what was written, must give the same greedy answers as the unmerged
base + adapter on held-out prompts before anything downstream uses it.
"""

from __future__ import annotations

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


def merge(cfg: PipelineConfig, run: storage.RunPaths, adapter_uri: str) -> dict[str, Any]:
    """Merge, export to ``<run>/merged``, verify; returns the verification figures."""
    from peft import PeftModel

    from ray_qlora.generation import eval_prompts, generate, inference_dtype
    from ray_qlora.modeling import load_16bit, load_tokenizer, pick_device, resolve_base, torch_dtype

    device = pick_device()
    base_path = resolve_base(cfg.model, cfg.storage)
    tok = load_tokenizer(base_path, cfg.data.chat_template)
    adapter = storage.copy_dir_from(adapter_uri, None, cfg.storage)
    run_dtype = inference_dtype(cfg.merge.dtype, device)

    unmerged = PeftModel.from_pretrained(load_16bit(base_path, run_dtype, device), str(adapter))
    unmerged.eval()
    prompts = eval_prompts(cfg, run, cfg.merge.verify_prompts) if cfg.merge.verify else []
    convs = [p for p, _ in prompts]
    before = generate(unmerged, tok, convs, cfg.merge.verify_max_new_tokens) if convs else []

    merged = unmerged.merge_and_unload().to(torch_dtype(cfg.merge.dtype))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        _save_export(merged, tok, out)
        del merged, unmerged
        result: dict[str, Any] = {"dtype": cfg.merge.dtype, "adapter_uri": adapter_uri,
                                  "merged_uri": run.merged, "verified": False}
        if convs:
            reloaded = load_16bit(out, run_dtype, device)
            after = generate(reloaded, load_tokenizer(out), convs, cfg.merge.verify_max_new_tokens)
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
        storage.copy_dir_to(out, run.merged, cfg.storage)
    log.info("merge: exported %s (verified=%s, match=%s)", run.merged, result["verified"],
             result.get("verify_match"))
    return result
