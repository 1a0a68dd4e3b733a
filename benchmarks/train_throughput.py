"""Real tokens/s of a QLoRA trial: today's path vs the new defaults, same model shape and data.

Both variants go through ``ray_qlora.train.build_trainer`` (NF4 + double
quantization, LoRA on all linear layers) on a Llama of the given shape with
random weights and synthetic chat examples with long-tailed lengths (median
345 tokens, capped at --max-len, like public chat datasets):

- today:    padded batches of 8, gradient checkpointing on, no liger;
- defaults: packed rows (data/packing.py, padding-free batches), and
            checkpointing, liger and micro-batch left 'auto' for the planner.

Prints real (non-pad) tokens/s, peak memory, MFU (6 x params x tokens/s over
the GPU's bf16 peak) and the ratio.

    python benchmarks/train_throughput.py                       # GPU: SmolLM2-1.7B shape, 2,048 tokens
    python benchmarks/train_throughput.py --smoke               # CPU: a tiny shape (what the tests run)
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# bf16 dense peak FLOP/s by device name fragment (vendor data sheets), for MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
SHAPES = {"1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=32),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)}


def make_model(shape: str, out: Path) -> Path:
    """A Llama of ``shape`` with random weights and SmolLM2's tokenizer, saved like a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.modeling import resolve_base

    tok_src = resolve_base(ModelConfig(), StorageConfig())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=True, **SHAPES[shape])
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    for f in tok_src.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return out


def lengths(n: int, cap: int, seed: int = 0) -> list[int]:
    """Long-tailed chat lengths: lognormal with a median of 345 tokens (scaled down under a small cap)."""
    rng = random.Random(seed)
    median = min(345, cap // 6)
    import math

    return [max(16, min(cap, int(median * math.exp(rng.gauss(0, 0.9))))) for _ in range(n)]


def examples(n: int, cap: int) -> tuple[list[list[int]], list[list[int]]]:
    """Random token ids; the last third of each example is the labelled answer."""
    rng = random.Random(1)
    ids, labels = [], []
    for length in lengths(n, cap):
        row = [rng.randrange(3, 49152) for _ in range(length)]
        cut = length - length // 3
        ids.append(row)
        labels.append([-100] * cut + row[cut:])
    return ids, labels


def run_variant(name: str, model_dir: Path, cap: int, steps: int, packed: bool, overrides: dict[str, Any],
                device: str, ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from ray_qlora.config import parse_config
    from ray_qlora.data.packing import pack_examples
    from ray_qlora.train import build_trainer

    cfg = parse_config({"run": {"output_uri": "/tmp/bench"}, "data": {"input_uris": ["/tmp/bench"],
                        "max_seq_length": cap}, "model": {"base": str(model_dir)},
                        "training": {"max_steps": steps, "eval_steps": 10**6, "logging_steps": 1, **overrides}})
    if packed:
        cols = pack_examples(ids, labels, cap)
        train = Dataset.from_dict({k: cols[k] for k in ("input_ids", "labels", "seq_lengths")})
    else:
        train = Dataset.from_dict({"input_ids": ids, "labels": labels})
    evals = Dataset.from_dict({"input_ids": ids[:2], "labels": labels[:2]})

    class Clock(TrainerCallback):
        """(time, real tokens so far) at each step's log: TRL counts non-pad tokens (all of a packed row)."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "num_tokens" in logs:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                self.marks.append((time.perf_counter(), float(logs["num_tokens"])))

    clock = Clock()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(cfg, model_dir, train, evals, out, device, [clock])
        trainer.train()
    # from the first step's log to the last: the first step (kernel loading, allocator warm-up) is left out
    (t0, n0), (t1, n1) = clock.marks[0], clock.marks[-1]
    real, seconds = n1 - n0, t1 - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"variant": name, "tokens_per_s": real / seconds, "seconds": seconds, "peak_gib": peak,
            "micro_batch": trainer.args.per_device_train_batch_size,
            "checkpointing": bool(trainer.args.gradient_checkpointing), "liger": bool(trainer.args.use_liger_kernel)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps (the tests run this)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--examples", type=int, default=2000)
    args = p.parse_args(argv)

    import torch

    from ray_qlora.modeling import pick_device
    from ray_qlora.plan import llama_shape

    device = pick_device()
    shape = "tiny" if args.smoke or device == "cpu" else "1.7b"
    cap = args.max_len or (128 if shape == "tiny" else 2048)
    steps = args.steps or (4 if shape == "tiny" else 30)
    ids, labels = examples(min(args.examples, 200) if shape == "tiny" else args.examples, cap)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(shape, Path(tmp) / "model")
        today = run_variant("today: padded x8, checkpointing, no liger", model_dir, cap, steps, False,
                            {"batch_size": 8, "gradient_checkpointing": True, "use_liger": False}, device, ids, labels)
        new = run_variant("defaults: packed, planner picks", model_dir, cap, steps, True,
                          {"batch_size": "auto", "gradient_checkpointing": "auto", "use_liger": "auto"},
                          device, ids, labels)
    params = llama_shape(1.7e9).params if shape == "1.7b" else None
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    for r in (today, new):
        r["mfu"] = 6 * params * r["tokens_per_s"] / peak if params and peak else None
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "-"
        print(f"{r['variant']:<44} {r['tokens_per_s']:>10,.0f} real tokens/s  peak {mem:>9}  MFU {mfu:>6}  "
              f"(micro-batch {r['micro_batch']}, checkpointing {r['checkpointing']}, liger {r['liger']})")
    ratio = new["tokens_per_s"] / today["tokens_per_s"]
    print(f"ratio defaults / today: {ratio:.2f}x on {name}  (target on a GPU: >= 3.5x, MFU >= 0.15)")
    return {"today": today, "defaults": new, "ratio": ratio, "device": name}


if __name__ == "__main__":
    main()
