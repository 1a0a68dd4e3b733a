"""Checks that a merged folder and an adapter folder are what vLLM loads.

vLLM reads a merged model as a Hugging Face folder (config.json with an
architecture it knows, safetensors weights, the tokenizer with its chat
template, and generation_config.json whose EOS ends a turn), and a LoRA
adapter for ``--lora-modules name=path`` as a peft folder (adapter_config.json
+ adapter_model.safetensors) whose rank fits ``--max-lora-rank``. Each check
returns the problems found, so the merge stage can refuse to publish a
folder that would fail at load time on someone else's cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["VLLM_DEFAULT_MAX_LORA_RANK", "adapter_problems", "merged_problems"]

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank; larger ranks need the flag


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    return (_json(folder / "tokenizer_config.json") or {}).get("chat_template")


def merged_problems(folder: Path, eos_token_id: int | None = None) -> list[str]:
    """What would stop vLLM serving ``folder`` as a chat model (empty: nothing)."""
    problems = []
    config = _json(folder / "config.json")
    if config is None:
        return ["config.json missing or not JSON"]
    if not config.get("architectures"):
        problems.append("config.json has no 'architectures' (vLLM picks the model class from it)")
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    index = _json(folder / "model.safetensors.index.json")
    if not weights:
        problems.append("no *.safetensors weights")
    elif index is not None:
        missing = sorted(set(index.get("weight_map", {}).values()) - set(weights))
        if missing:
            problems.append(f"the safetensors index names missing shards: {', '.join(missing)}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        problems.append(f"pickled files next to the weights: {', '.join(pickles)}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        problems.append("no tokenizer.json or tokenizer.model")
    if not _chat_template(folder):
        problems.append("no chat template (chat_template.jinja or tokenizer_config.json): "
                        "/v1/chat/completions would refuse requests")
    gen = _json(folder / "generation_config.json")
    if gen is None:
        problems.append("generation_config.json missing: vLLM would not know the end-of-turn token")
    elif eos_token_id is not None:
        eos = gen.get("eos_token_id")
        if eos_token_id not in (eos if isinstance(eos, list) else [eos]):
            problems.append(f"generation_config.json eos_token_id is {eos!r}, not the end-of-turn id {eos_token_id}")
    return problems


def adapter_problems(folder: Path, max_lora_rank: int | None = None) -> list[str]:
    """What would stop ``vllm serve BASE --enable-lora --lora-modules name=folder`` loading it."""
    cfg = _json(folder / "adapter_config.json")
    if cfg is None:
        return ["adapter_config.json missing or not JSON"]
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    if not (folder / "adapter_model.safetensors").is_file():
        problems.append("no adapter_model.safetensors")
    for key in ("r", "lora_alpha", "target_modules"):
        if not cfg.get(key):
            problems.append(f"adapter_config.json has no {key!r}")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} is not supported by vLLM's LoRA")
    rank = cfg.get("r") or 0
    if max_lora_rank is not None and rank > max_lora_rank:
        problems.append(f"rank {rank} is above --max-lora-rank {max_lora_rank}: start vLLM with "
                        f"--max-lora-rank {rank} or more")
    return problems
