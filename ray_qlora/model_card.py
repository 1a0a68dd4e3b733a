"""The merged model's README.md: what it is, what it came from, how it scored, how to load it.

Written by merge (base, data, training, best trial) and again by evaluate,
which adds the base-vs-tuned metrics. The YAML front matter uses the keys
model hubs read (base_model, library_name, tags).
"""

from __future__ import annotations

import json
from typing import Any

from ray_qlora import storage
from ray_qlora.config import PipelineConfig

__all__ = ["render_card", "write_card"]


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _metrics_table(report: dict[str, Any]) -> str:
    lines = ["| metric | base | tuned |", "|---|---|---|"]
    for k in report["tuned"]:
        b, t = report["base"].get(k), report["tuned"][k]
        fmt = (lambda x: f"{x:.4f}") if k == "eval_loss" else (lambda x: f"{x:.1%}")
        lines.append(f"| {k} | {'' if b is None else fmt(b)} | {fmt(t)} |")
    return "\n".join(lines)


def render_card(cfg: PipelineConfig, run_id: str, record: dict[str, Any], merge: dict[str, Any],
                report: dict[str, Any] | None = None) -> str:
    """The card's markdown from run.json's record (prepare and tune results), merge's result and the eval report."""
    from ray_qlora.train import apply_trial_params

    stages = record.get("stages", {})
    prep = (stages.get("prepare") or {}).get("result", {})
    tune = (stages.get("tune") or {}).get("result", {})
    trained = apply_trial_params(cfg, tune.get("best_params", {}))  # what the best trial actually ran with
    name = cfg.serve.model_name or run_id
    gguf = merge.get("gguf") or {}
    front = "\n".join(["---", f"base_model: {cfg.model.base}", "library_name: transformers",
                       "tags: [ray-qlora, qlora, lora, merged]", "---"])
    lines = [front, "", f"# {name}", "",
             f"A QLoRA fine-tune of `{cfg.model.base}` made with ray-qlora (run `{run_id}`): the best LoRA "
             f"adapter of the search, merged into the {merge.get('dtype', cfg.merge.dtype)} base.", "",
             "## Lineage", "",
             _table([("base model", f"`{cfg.model.base}`"),
                     ("base content sha256", f"`{merge.get('base_sha256', 'unknown')}`"),
                     ("data manifest sha256", f"`{merge.get('data_manifest_sha256', 'unknown')}`"),
                     ("train / eval examples", f"{prep.get('counts', {}).get('train', '?')} / "
                                               f"{prep.get('counts', {}).get('eval', '?')}"),
                     ("run", f"`{record.get('root', '')}`"),
                     ("adapter", f"`{merge.get('adapter_uri', '')}`")]), "",
             "## Training", "",
             _table([("best trial", f"`{tune.get('best_trial', '?')}`"),
                     ("best parameters", f"`{json.dumps(tune.get('best_params', {}), sort_keys=True)}`"),
                     (tune.get("metric", "eval_loss"), tune.get("best_value", "?")),
                     ("trials", tune.get("trials", "?")),
                     ("LoRA", f"r={trained.lora.r}, alpha={trained.lora.alpha}, "
                              f"targets={trained.lora.target_modules}"),
                     ("4-bit base", f"{cfg.model.quantization.quant_type}, double quant "
                                    f"{cfg.model.quantization.double_quant}")]), "",
             "<details><summary>training config</summary>", "", "```json",
             json.dumps({"lora": trained.lora.model_dump(mode="json"),
                         "training": trained.training.model_dump(mode="json"),
                         "data": {"max_seq_length": cfg.data.max_seq_length, "packing": cfg.data.packing,
                                  "chat_template": cfg.data.chat_template or "the base's"}},
                        indent=2, sort_keys=True), "```", "", "</details>", ""]
    if merge.get("verified"):
        lines += [f"Verified at merge: greedy answers equal the unmerged base + adapter on "
                  f"{merge.get('verify_match', 0):.0%} of {merge.get('verify_prompts')} held-out prompts.", ""]
    if report:
        lines += ["## Evaluation", "", f"Held-out examples: {report['examples']}.", "", _metrics_table(report), ""]
    lines += ["## Use", "", "transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH)",
              "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"...\"}], add_generation_prompt=True,"
              " return_tensors=\"pt\")",
              "print(tok.decode(model.generate(ids, max_new_tokens=128)[0][ids.shape[1]:], skip_special_tokens=True))",
              "```", "", "vLLM (OpenAI-compatible server):", "", "```bash", "vllm serve PATH", "```", "",
              "Ollama (the Modelfile in this folder):", "", "```bash", f"ollama create {name} -f Modelfile",
              f"ollama run {name}", "```", ""]
    if gguf.get("uri"):
        lines += [f"GGUF ({gguf.get('gguf_type')}) for llama.cpp: `{gguf['uri']}` "
                  f"(max logit difference vs this folder: {gguf.get('max_abs_logit_diff', float('nan')):.4g}).", ""]
    return "\n".join(lines)


def write_card(cfg: PipelineConfig, run: storage.RunPaths, run_id: str, merge: dict[str, Any],
               report: dict[str, Any] | None = None, folder_uri: str | None = None) -> str:
    """Write README.md into the merged folder (or ``folder_uri``); returns its URI."""
    record = storage.read_json(run.run_json, cfg.storage) if storage.exists(run.run_json, cfg.storage) else {}
    uri = storage.join(folder_uri or run.merged, "README.md")
    storage.write_bytes(uri, render_card(cfg, run_id, record, merge, report).encode(), cfg.storage)
    return uri
