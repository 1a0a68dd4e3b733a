"""The served endpoint under load, against the same engine in-process, in one run.

1. In-process baseline: ``generate_text`` on the replica's model and
   tokenizer, one request at a time (what the endpoint adds nothing to).
2. The endpoint (Ray Serve, HTTP on loopback, the real app with its limits
   and middleware) at concurrency 1 on the same prompts: latency ratio
   HTTP / in-process (target <= 1.15).
3. A bounded load test: --requests requests at --concurrency with the
   `openai` SDK: p50/p95 latency, tokens/s, errors (target 0), and tokens/s
   at concurrency C vs 1 (batching; target >= 2.5x at 8).

Greedy decoding, the same prompts on every side; the replica and the
baseline use the same number of CPU threads. ``--engine`` picks what both
sides run: vLLM (the endpoint through Ray Serve LLM; in-process, vLLM's
offline ``LLM``) or transformers (``generate``).

    python benchmarks/serve_load.py                              # SmolLM2-135M on vLLM
    python benchmarks/serve_load.py --engine transformers        # the fallback engine
    python benchmarks/serve_load.py --base DIR --engine transformers --requests 8   # smoke (the tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prompts(n: int) -> list[str]:
    from ray_qlora.data.sample import SYSTEM_PROMPT

    drugs = ["aspirin 81 mg PO daily", "metformin 500 mg PO BID", "lisinopril 10 mg PO QD",
             "heparin 5000 units SC q8h", "amoxicillin 875 mg PO q12h", "atorvastatin 40 mg PO at bedtime"]
    return [f"{SYSTEM_PROMPT}\nOrder: give {drugs[i % len(drugs)]} (case {i})" for i in range(n)]


def in_process(model_dir: Path, prompts: list[str], tokens: int, threads: int) -> list[float]:
    """Seconds per request for the engine alone, one at a time (after a warm-up)."""
    import torch

    from ray_qlora.generation import generate_text, render
    from ray_qlora.modeling import load_16bit, load_tokenizer

    torch.set_num_threads(threads)
    tok, model = load_tokenizer(model_dir), load_16bit(model_dir, "float32", "cpu")
    texts = [render(tok, [{"role": "user", "content": p}]) for p in prompts]
    generate_text(model, tok, texts[:1], tokens, 1)
    seconds = []
    for text in texts:
        start = time.perf_counter()
        generate_text(model, tok, [text], tokens, 1)
        seconds.append(time.perf_counter() - start)
    return seconds


def in_process_vllm(model_dir: Path, prompts: list[str], tokens: int, threads: int) -> list[float]:
    """The same for vLLM's offline engine, with the settings the endpoint's engine gets."""
    import gc

    from vllm import LLM, SamplingParams

    os.environ["OMP_NUM_THREADS"] = str(threads)
    llm = LLM(model=str(model_dir), max_model_len=2048, max_num_seqs=8, dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(max_tokens=tokens, temperature=0)
    chat = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(chat[0], params, use_tqdm=False)
    seconds = []
    for messages in chat:
        start = time.perf_counter()
        llm.chat(messages, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    del llm  # its engine process and memory go before the endpoint's start
    gc.collect()
    return seconds


def _deploy(model_dir: Path, root: Path, threads: int, batch: int, engine: str) -> str:
    import json

    from ray import serve

    from ray_qlora.config import parse_config
    from ray_qlora.local_s3 import free_port
    from ray_qlora.serve.deployment import build_app
    from ray_qlora.serve.vllm_engine import build_vllm_app

    port = free_port()
    cfg = parse_config({"run": {"output_uri": str(root)}, "data": {"input_uris": ["x"]}, "merge": {"dtype": "float32"},
                        "serve": {"port": port, "auth": "none", "cpus_per_replica": threads, "max_batch_size": batch,
                                  "max_new_tokens": 512, "max_context": 2048, "max_adapters": 0}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if engine == "vllm":
        model_config = json.loads((model_dir / "config.json").read_text())
        app = build_vllm_app(cfg, str(model_dir), "bench", model_config, on_gpu=False)
    else:
        app = build_app(cfg, str(model_dir), "bench")
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}/v1"


def _request(client: Any, prompt: str, tokens: int) -> tuple[float, int, str | None]:
    start = time.perf_counter()
    try:
        out = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                             max_tokens=tokens, temperature=0)
        return time.perf_counter() - start, out.usage.completion_tokens, None
    except Exception as err:  # noqa: BLE001 - a load test counts errors, it does not stop at one
        return time.perf_counter() - start, 0, f"{type(err).__name__}: {err}"


def load(base_url: str, prompts: list[str], tokens: int, concurrency: int) -> dict[str, Any]:
    """All ``prompts`` at ``concurrency``; stops by itself when they are done."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: _request(client, p, tokens), prompts))
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results if r[2] is None)
    return {"concurrency": concurrency, "requests": len(prompts), "wall_s": wall,
            "errors": [r[2] for r in results if r[2]],
            "p50_s": statistics.median(lat) if lat else float("nan"),
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
            "tokens_per_s": sum(r[1] for r in results) / wall, "latencies": [r[0] for r in results]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=32, help="requests in the load test")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the replica and of the baseline")
    p.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.modeling import resolve_base

    model_dir = resolve_base(ModelConfig(base=args.base), StorageConfig())
    serial = _prompts(max(4, args.requests // 4))
    print(f"in-process ({args.engine}): {len(serial)} requests one at a time ...", flush=True)
    alone = (in_process_vllm if args.engine == "vllm" else in_process)(model_dir, serial, args.tokens, args.threads)
    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as d:
            print("deploying the endpoint ...", flush=True)
            base_url = _deploy(model_dir, Path(d), args.threads, args.concurrency, args.engine)
            load(base_url, serial[:1], args.tokens, 1)  # warm-up
            print("HTTP at concurrency 1 ...", flush=True)
            one = load(base_url, serial, args.tokens, 1)
            print(f"load test: {args.requests} requests at concurrency {args.concurrency} ...", flush=True)
            many = load(base_url, _prompts(args.requests), args.tokens, args.concurrency)
    finally:
        serve.shutdown()
        ray.shutdown()
    overhead = statistics.median(one["latencies"]) / statistics.median(alone)
    batching = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"\n{'':<26}{'p50 s':>8}{'p95 s':>8}{'tokens/s':>10}{'errors':>8}")
    print(f"{'in-process, one at a time':<26}{statistics.median(alone):>8.3f}{max(alone):>8.3f}{'':>10}{'':>8}")
    for name, r in (("HTTP, concurrency 1", one), (f"HTTP, concurrency {args.concurrency}", many)):
        print(f"{name:<26}{r['p50_s']:>8.3f}{r['p95_s']:>8.3f}{r['tokens_per_s']:>10.1f}{len(r['errors']):>8}")
    print(f"serve overhead (HTTP / in-process, median latency at concurrency 1): {overhead:.3f} (target <= 1.15)")
    print(f"batching (tokens/s at concurrency {args.concurrency} / 1): {batching:.2f}x (target >= 2.5x)")
    for r in (one, many):
        r.pop("latencies")
    return {"engine": args.engine, "in_process_p50_s": statistics.median(alone), "one": one, "many": many, "overhead": overhead,
            "batching": batching, "errors": len(one["errors"]) + len(many["errors"])}


if __name__ == "__main__":
    main()
