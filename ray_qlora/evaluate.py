"""Stage 4, evaluate: base vs tuned on the held-out split.

Two kinds of figure: eval loss (teacher-forced, on assistant tokens only,
like training) and task metrics from greedy generation: exact match, and
when the answers are JSON, the valid-JSON rate and per-field accuracy.
Writes report.json and a bar chart, and returns the table it prints.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from ray_qlora import storage
from ray_qlora.config import PipelineConfig

__all__ = ["evaluate", "format_table", "task_metrics"]

log = logging.getLogger(__name__)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def task_metrics(predictions: list[str], references: list[str], task: str = "auto") -> dict[str, float]:
    """exact_match always; valid_json, json_match and field_accuracy when the references are JSON objects."""
    n = len(references)
    m: dict[str, float] = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n}
    refs = [_parse_json(r) for r in references]
    is_json = task == "json" or (task == "auto" and all(isinstance(r, dict) for r in refs))
    if is_json:
        preds = [_parse_json(p) for p in predictions]
        m["valid_json"] = sum(isinstance(p, dict) for p in preds) / n
        m["json_match"] = sum(p == r for p, r in zip(preds, refs)) / n
        fields = [(k, v, p) for p, r in zip(preds, refs) if isinstance(r, dict) for k, v in r.items()]
        m["field_accuracy"] = (sum(isinstance(p, dict) and p.get(k) == v for k, v, p in fields) / len(fields)
                               if fields else 0.0)
    return m


def _eval_loss(model: Any, cfg: PipelineConfig, run: storage.RunPaths, batch_size: int) -> float:
    """Mean token loss on assistant tokens of the eval split."""
    import torch

    from ray_qlora.train import load_split

    ds = load_split(run.eval, cfg)
    total, count = 0.0, 0
    for i in range(0, len(ds), batch_size):
        rows = ds[i:i + batch_size]
        width = max(len(x) for x in rows["input_ids"])
        pad = lambda seqs, v: torch.tensor([s + [v] * (width - len(s)) for s in seqs])  # noqa: E731
        ids, labels = pad(rows["input_ids"], 0), pad(rows["labels"], -100)
        mask = pad([[1] * len(s) for s in rows["input_ids"]], 0)  # right padding is masked out
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        # position t predicts token t+1
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(model.device),
            ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def _score(name: str, model_path: Any, cfg: PipelineConfig, run: storage.RunPaths,
           prompts: list[tuple[list[dict[str, str]], str]], dtype: str, device: str) -> dict[str, Any]:
    from ray_qlora.generation import generate
    from ray_qlora.modeling import load_16bit, load_tokenizer

    log.info("evaluate: scoring %s on %d prompts", name, len(prompts))
    model, tok = load_16bit(model_path, dtype, device), load_tokenizer(model_path, cfg.data.chat_template)
    outs = generate(model, tok, [p for p, _ in prompts], cfg.eval.max_new_tokens, cfg.eval.batch_size)
    preds = [o["text"] for o in outs]
    metrics = {"eval_loss": _eval_loss(model, cfg, run, cfg.eval.batch_size),
               **task_metrics(preds, [r for _, r in prompts], cfg.eval.task)}
    return {"metrics": metrics, "predictions": preds}


def format_table(report: dict[str, Any]) -> str:
    base, tuned = report["base"], report["tuned"]
    lines = [f"{'metric':<16}{'base':>10}{'tuned':>10}{'delta':>10}"]
    for k in base:
        b, t = base[k], tuned[k]
        pct = k != "eval_loss"
        fmt = (lambda x: f"{x:>9.1%} ") if pct else (lambda x: f"{x:>10.4f}")
        lines.append(f"{k:<16}{fmt(b)}{fmt(t)}{(t - b) * (100 if pct else 1):>+9.{1 if pct else 4}f}{'pp' if pct else ''}")
    return "\n".join(lines)


def _plot(report: dict[str, Any], png_uri: str, cfg: PipelineConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in report["base"] if k != "eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [report["base"][k] * 100 for k in keys], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [report["tuned"][k] * 100 for k in keys], 0.4, label="tuned")
    ax.set_xticks(list(xs), keys)
    ax.set_ylabel("% of held-out examples")
    ax.set_ylim(0, 118)
    ax.set_title(f"base vs tuned (eval loss {report['base']['eval_loss']:.3f} -> {report['tuned']['eval_loss']:.3f})")
    ax.legend(loc="upper center", ncol=2)
    storage.write_figure(fig, png_uri, cfg.storage)


def evaluate(cfg: PipelineConfig, run: storage.RunPaths) -> dict[str, Any]:
    """Score the base and the merged model; write report.json and base_vs_tuned.png."""
    from ray_qlora.generation import eval_prompts, inference_dtype
    from ray_qlora.modeling import pick_device, resolve_base

    device = pick_device()
    dtype = inference_dtype(cfg.merge.dtype, device)
    prompts = eval_prompts(cfg, run, cfg.eval.max_examples)
    merged = storage.copy_dir_from(run.merged, None, cfg.storage)
    base = _score("base", resolve_base(cfg.model, cfg.storage), cfg, run, prompts, dtype, device)
    tuned = _score("tuned", merged, cfg, run, prompts, dtype, device)
    report = {
        "examples": len(prompts),
        "base": base["metrics"],
        "tuned": tuned["metrics"],
        "samples": [{"prompt": p[-1]["content"], "reference": r, "base": b, "tuned": t}
                    for (p, r), b, t in zip(prompts[:5], base["predictions"], tuned["predictions"])],
    }
    storage.write_json(run.report, report, cfg.storage)
    _plot(report, storage.join(run.eval_dir, "base_vs_tuned.png"), cfg)
    report["table"] = format_table(report)
    log.info("evaluate:\n%s", report["table"])
    if not all(math.isfinite(v) for v in report["tuned"].values()):
        raise RuntimeError("evaluate: the tuned model produced non-finite metrics")
    return report
