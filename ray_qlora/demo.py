"""The embedded default, end to end: local S3 + local Ray + SmolLM2 + the sample dataset.

Starts the object store, uploads the sample data, runs every stage, asks the
served model a question through the `openai` SDK, prints the base-vs-tuned
table, and copies the run's report and plots to a local folder (the local
store lives in memory and goes away with the demo). ``sample="tools"`` runs
the tool-use sample instead (jobs/configs/tools.yaml), and the question goes
with the ``place_order`` tool: the answer printed is the call the model made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray_qlora import storage
from ray_qlora.config import load_config
from ray_qlora.data.sample import PLACE_ORDER, sample_files, tool_sample_files
from ray_qlora.local_s3 import local_s3_in_env

__all__ = ["ask", "demo", "upload_sample"]

DEMO_QUESTION = "Start furosemide 40 mg IV twice daily."
SAMPLES = {"orders": sample_files, "tools": tool_sample_files}


def upload_sample(raw_uri: str, cfg_storage: Any, sample: str = "orders") -> list[str]:
    uris = []
    for name, data in SAMPLES[sample]().items():
        uri = storage.join(raw_uri, name)
        storage.write_bytes(uri, data, cfg_storage)
        uris.append(uri)
    return uris


def ask(base_url: str, model: str, system: str | None, question: str,
        tools: list[dict[str, Any]] | None = None) -> str:
    """One chat request through the official OpenAI client, as any user would send it; with ``tools``
    (tool_choice left to the model), the calls it made, as ``name(arguments)``, or its text."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="not-needed-locally")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    resp = client.chat.completions.create(model=model, messages=msgs, max_tokens=64, temperature=0,
                                          **({"tools": tools} if tools else {}))
    message = resp.choices[0].message
    calls = [f"{c.function.name}({c.function.arguments})" for c in message.tool_calls or []]
    return "; ".join(calls) or message.content or ""


def _keep_locally(run_root: str, out: Path, cfg_storage: Any) -> None:
    for rel in ("run.json", "data/manifest.json", "tune/leaderboard.json", "tune/leaderboard.csv", "tune/eval_loss.png",
                "eval/report.json", "eval/summary.md", "eval/predictions.json", "eval/base_vs_tuned.png",
                "merged/README.md", "merged/Modelfile"):
        uri = storage.join(run_root, rel)
        if storage.exists(uri, cfg_storage):
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(storage.read_bytes(uri, cfg_storage))


def demo(config_path: str, keep_dir: str = ".demo", sample: str = "orders",
         overrides: list[str] | None = None) -> dict[str, Any]:
    import ray
    from ray import serve

    from ray_qlora.pipeline import run_pipeline

    started = time.time()
    with local_s3_in_env() as store:  # stopped, and this process pointed back, when the demo ends
        print(f"local S3 at {store.endpoint_url}", flush=True)
        try:
            cfg = load_config(config_path, overrides)  # inside: ${AWS_ENDPOINT_URL} is this store's
            bucket = cfg.run.output_uri.removeprefix("s3://").split("/")[0]
            store.create_bucket(bucket)
            for uri in cfg.data.input_uris:
                print("uploaded", ", ".join(upload_sample(uri, cfg.storage, sample)), flush=True)
            run = run_pipeline(cfg)
            served = run.output("serve")
            answer = ask(served["base_url"], served["model"], cfg.data.system_prompt, DEMO_QUESTION,
                         [PLACE_ORDER] if sample == "tools" else None)
            report = run.output("evaluate")
            tune_res = run.output("tune")
            out = Path(keep_dir) / run.run_id
            _keep_locally(run.paths.root, out, cfg.storage)
            print("\n=== best trial", json.dumps(tune_res["best_params"]),
                  f"eval_loss={tune_res['best_eval_loss']:.4f}")
            print(f"\n=== base vs tuned on {report['examples']} held-out examples\n{report['table']}")
            print(f"\n=== POST {served['base_url']}/chat/completions\nuser: {DEMO_QUESTION}\nassistant: {answer}")
            print(f"\nreport, plots and run.json copied to {out}/  ({time.time() - started:.0f}s in all)")
            return {"run_id": run.run_id, "answer": answer, "report": report, "local_copy": str(out)}
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
