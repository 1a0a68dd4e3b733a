"""Chat generation shared by merge (verification), evaluate and serve."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ray_qlora import storage
from ray_qlora.config import PipelineConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Prompt", "eval_prompts", "generate", "inference_dtype"]

Prompt = tuple[list[dict[str, str]], str]  # (messages before the answer, reference answer)


def inference_dtype(saved: str, device: str) -> str:
    """The dtype to run a saved model in: its own on GPU, float32 on CPU (bf16 is emulated there)."""
    return saved if device.startswith("cuda") else "float32"


def eval_prompts(cfg: PipelineConfig, run: storage.RunPaths, limit: int) -> list[Prompt]:
    """The first ``limit`` held-out conversations, split into prompt and reference answer."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(run.eval, cfg.storage)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["messages", "content_hash"])
    rows = sorted(table.to_pylist(), key=lambda r: r["content_hash"])  # stable order across runs
    out = []
    for r in rows[:limit]:
        msgs = json.loads(r["messages"])
        out.append((msgs[:-1], msgs[-1]["content"]))
    return out


def generate(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", conversations: list[list[dict[str, str]]],
             max_new_tokens: int, batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None) -> list[dict[str, Any]]:
    """Batched chat completion; greedy when temperature is 0.

    Returns per conversation {text, prompt_tokens, completion_tokens, finish_reason}.
    """
    import torch

    tok.padding_side = "left"  # decoder-only: pad on the left so every row ends at the prompt
    eot = tok.eos_token_id
    results = []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i:i + batch_size]
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                                  "eos_token_id": eot}
        if temperature > 0:
            if seed is not None:
                torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1]
        for row, mask in zip(out, enc["attention_mask"]):
            new = row[prompt_len:].tolist()
            finished = eot in new
            if finished:
                new = new[:new.index(eot)]
            results.append({"text": tok.decode(new, skip_special_tokens=True).strip(),
                            "prompt_tokens": int(mask.sum()), "completion_tokens": len(new) + int(finished),
                            "finish_reason": "stop" if finished else "length"})
    return results
