"""Many adapters on one base: memory and latency with 1, 4 and 16 adapters loaded, in one run.

Publishes --count copies of a LoRA adapter (r=16 on all linear layers,
perturbed so it changes the model) to a registry in a temp folder, loads 1,
then 4, then 16 of them into the serving engine's shared base
(``ray_qlora.serve.multi_adapter.AdapterEngine``, what a replica runs), and
measures the engine's bytes (base + N x adapter, against the base alone) and
the latency of a greedy generation through one adapter (against 1 loaded;
peft's active-adapter switch should not slow with N).

    python benchmarks/adapters_served.py                                   # SmolLM2-135M
    python benchmarks/adapters_served.py --base DIR --counts 1 2 --tokens 4   # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _adapter(base_dir: Path, out: Path) -> Path:
    """An r=16 all-linear adapter of the base, with B perturbed (B is zero only before training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.save_pretrained(out)
    return out


def _latency(engine: Any, key: str, prompt: str, tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(key, [prompt], tokens, 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from ray_qlora import adapters
    from ray_qlora.config import ModelConfig, StorageConfig, parse_config
    from ray_qlora.modeling import resolve_base
    from ray_qlora.serve.multi_adapter import AdapterEngine

    torch.set_num_threads(args.threads)
    base_dir = resolve_base(ModelConfig(base=args.base), StorageConfig())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cfg = parse_config({"run": {"output_uri": d}, "data": {"input_uris": ["x"]}, "model": {"base": str(base_dir)},
                            "merge": {"dtype": "float32"}, "export": {"ollama": False}})
        source = _adapter(base_dir, Path(d) / "source")
        print(f"publishing {max(args.counts)} adapters ...", flush=True)
        for i in range(max(args.counts)):
            adapters.publish(cfg, str(source), f"task-{i}", {"run_id": "bench"})
        engine = AdapterEngine(cfg)
        prompt = "Convert the medication order to JSON. Order: give aspirin 81 mg PO daily"
        held: list[Any] = []  # an adapter stays loaded while its handle lives (the LRU holds them in Serve)
        for n in sorted(args.counts):
            while len(held) < n:
                held.append(engine.load(f"task-{len(held)}"))
            engine.generate("task-0", [prompt], 2, 1)  # warm-up
            mem = engine.memory()
            lat = _latency(engine, f"task-{n - 1}", prompt, args.tokens, args.repeats)
            rows.append({"adapters": n, "total_bytes": mem["total_bytes"], "base_bytes": mem["base_bytes"],
                         "adapter_bytes": sum(mem["adapters"].values()), "latency_s": lat})
            print(f"    {n:>3} loaded: {mem['total_bytes'] / 2**20:8.1f} MiB, {lat:.3f} s per request", flush=True)
    base, one = rows[0]["base_bytes"], rows[0]
    per_adapter = one["adapter_bytes"] / one["adapters"]
    print(f"\n{'adapters':>9}{'MiB':>9}{'vs base':>9}{'base + N x adapter':>20}{'latency s':>11}{'vs 1':>7}")
    for r in rows:
        predicted = base + r["adapters"] * per_adapter
        r.update(vs_base=r["total_bytes"] / base, predicted_bytes=predicted, latency_vs_one=r["latency_s"] / one["latency_s"])
        print(f"{r['adapters']:>9}{r['total_bytes'] / 2**20:>9.1f}{r['vs_base']:>9.3f}{predicted / 2**20:>17.1f} MiB"
              f"{r['latency_s']:>11.3f}{r['latency_vs_one']:>7.2f}")
    print(f"one adapter = {per_adapter / base:.2%} of the base; memory is base + N x adapter "
          f"({'exactly' if all(r['total_bytes'] == r['predicted_bytes'] for r in rows) else 'NOT'})")
    return {"rows": rows, "per_adapter_bytes": per_adapter, "base_bytes": base}


if __name__ == "__main__":
    main()
