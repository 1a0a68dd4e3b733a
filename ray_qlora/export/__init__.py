"""Exports of a merged model or an adapter for the tools users already run.

- ``gguf``: a GGUF file (f16 or q8_0) for llama.cpp and Ollama, verified by
  loading it back with transformers and comparing logits.
- ``ollama``: Modelfiles whose TEMPLATE renders what the training chat
  template renders.
- ``vllm``: checks that the merged folder and adapter folders are what vLLM
  loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray_qlora.config import PipelineConfig
from ray_qlora.errors import UserError

__all__ = ["ExportError", "write_exports"]

log = logging.getLogger(__name__)


# Relative logit difference a verified GGUF may show: f16 rounding is ~1e-3
# of the largest logit, q8_0's 8-bit steps ~2e-2 (SmolLM2-135M: 0 and 0.021);
# a q/k permutation bug shows 0.5 and more on a real model.
GGUF_LOGIT_LIMITS = {"f16": 0.01, "q8_0": 0.05}


class ExportError(UserError, RuntimeError):
    """An export that would not load where it is meant to (the message says what is wrong)."""


def write_exports(cfg: PipelineConfig, merged: Path, tok: Any, prompts: list[str], gguf_dir: Path) -> dict[str, Any]:
    """Check the merged folder loads in vLLM, add its Ollama Modelfile, write and verify the GGUF.

    ``merged`` is the local merged folder (Modelfile goes in it); the GGUF
    goes to ``gguf_dir`` so that serving, which copies the merged folder,
    does not download it too. Returns what was written, with the GGUF figures.
    """
    import json

    from ray_qlora.export.vllm import merged_problems

    problems = merged_problems(merged, tok.eos_token_id)
    if problems:
        raise ExportError("merge: the merged folder is not what vLLM loads: " + "; ".join(problems))
    out: dict[str, Any] = {"vllm_layout": "ok"}
    context = int(json.loads((merged / "config.json").read_text()).get("max_position_embeddings") or 2048)
    if cfg.export.ollama:
        out["modelfile"] = _modelfile(cfg, merged, tok, ".", context)
    if cfg.export.gguf:
        out["gguf"] = _gguf(cfg, merged, tok, prompts, gguf_dir, context)
    return out


def _modelfile(cfg: PipelineConfig, folder: Path, tok: Any, from_ref: str, context: int) -> str | None:
    """A Modelfile in ``folder``; SYSTEM is the system prompt training added (data.system_prompt)."""
    from ray_qlora.export.ollama import merged_modelfile, write_modelfile

    try:
        text = merged_modelfile(tok, from_ref=from_ref, num_ctx=min(context, 8192), system=cfg.data.system_prompt)
    except ValueError as err:  # a template Ollama's TEMPLATE cannot express: none beats a wrong one
        log.warning("export: no Ollama Modelfile in %s: %s", folder, err)
        return None
    return str(write_modelfile(text, folder))


def _gguf(cfg: PipelineConfig, merged: Path, tok: Any, prompts: list[str], gguf_dir: Path,
          context: int) -> dict[str, Any]:
    """model-<type>.gguf (+ a Modelfile FROM it) for Llama-architecture models; verified against ``merged``."""
    from ray_qlora.export.gguf import GGUFExportError, verify_gguf, write_gguf

    gguf_type = str(cfg.export.gguf)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    path = gguf_dir / f"model-{gguf_type}.gguf"
    try:
        write_gguf(merged, path, gguf_type)
    except GGUFExportError as err:  # e.g. not a Llama architecture: say so, export the rest
        log.warning("export: no GGUF: %s", err)
        return {"skipped": str(err)}
    result: dict[str, Any] = {"gguf_type": gguf_type, "file": path.name, "bytes": path.stat().st_size}
    if cfg.export.verify_gguf and prompts:
        figures = verify_gguf(merged, path, prompts)
        result.update({k: v for k, v in figures.items() if k != "path"})
        limit = cfg.export.gguf_max_logit_diff or GGUF_LOGIT_LIMITS[gguf_type]
        wrong = [what for what, bad in (
            ("tokenizer ids differ", not figures["tokenizer_match"]),
            ("chat template differs", not figures["chat_template_match"]),
            (f"relative logit difference {figures['max_rel_logit_diff']:.3g} > {limit} "
             "(export.gguf_max_logit_diff)", figures["max_rel_logit_diff"] > limit),
            (f"top-1 agreement {figures['top1_agreement']:.0%} < 90%", figures["top1_agreement"] < 0.9)) if bad]
        if wrong:
            raise ExportError(f"merge: the GGUF does not reproduce the merged model: {'; '.join(wrong)}; "
                              "not published")
    if cfg.export.ollama:
        result["modelfile"] = _modelfile(cfg, gguf_dir, tok, f"./{path.name}", context)
    log.info("export: %s", result)
    return result
