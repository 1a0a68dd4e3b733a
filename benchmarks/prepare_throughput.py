"""Rows/s of `prepare` (Ray Data) vs a single-process `datasets.map` of the same row steps.

Both sides run normalise -> chat template -> tokenize -> mask with the same
functions on the same synthetic mixed-format files (Alpaca JSONL, ShareGPT
JSONL.gz, messages Parquet, prompt/completion JSON). The baseline reads the
rows into memory and maps them in one process; prepare does that and more
(per-file accounting, dedup keys, checks, split, Parquet shards) on a local
Ray with the machine's CPUs. Prints both rates and their ratio.

    python benchmarks/prepare_throughput.py                # 200,000 rows
    python benchmarks/prepare_throughput.py --rows 2000    # smoke (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # both sides: one thread per tokenizer


def baseline(raws: list[str], base: Path, max_len: int) -> float:
    """Seconds for datasets.map over the raw rows, single process."""
    from datasets import Dataset

    from ray_qlora.data.formats import RowError, normalize_row
    from ray_qlora.data.templating import end_of_turn_id, tokenize_conversation
    from ray_qlora.modeling import load_tokenizer

    tok = load_tokenizer(base)
    eot = end_of_turn_id(tok)

    def step(row: dict) -> dict:
        try:
            out = tokenize_conversation(tok, normalize_row(json.loads(row["raw"])), max_len, eot=eot)
            return {"input_ids": out["input_ids"], "labels": out["labels"], "ok": True}
        except RowError:
            return {"input_ids": [], "labels": [], "ok": False}

    start = time.perf_counter()
    ds = Dataset.from_dict({"raw": raws}).map(step, remove_columns=["raw"])
    assert sum(ds["ok"]) > 0.99 * len(raws)
    return time.perf_counter() - start


def ours(folder: Path, out: Path, base: Path, max_len: int, cpus: int) -> tuple[float, dict]:
    """Seconds for the prepare stage (local Ray already up), and its manifest."""
    from ray_qlora.config import parse_config
    from ray_qlora.prepare import prepare
    from ray_qlora.storage import RunPaths

    cfg = parse_config({"run": {"output_uri": str(out)}, "data": {"input_uris": [str(folder)],
                        "max_seq_length": max_len, "cache": False}, "model": {"base": str(base)}})
    start = time.perf_counter()
    manifest = prepare(cfg, RunPaths.for_run(str(out), "bench"))
    return time.perf_counter() - start, manifest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--base", default="smollm2-135m-instruct", help="model whose tokenizer is used")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = p.parse_args(argv)

    import logging

    import ray

    from _synth import write_dataset
    from ray_qlora.config import ModelConfig, StorageConfig
    from ray_qlora.modeling import resolve_base

    logging.basicConfig(level=logging.WARNING)
    base = resolve_base(ModelConfig(base=args.base), StorageConfig())
    with tempfile.TemporaryDirectory() as tmp:
        raws = write_dataset(Path(tmp) / "raw", args.rows)
        t_base = baseline(raws, base, args.max_seq_length)
        print(f"baseline datasets.map (1 process): {len(raws)} rows in {t_base:.1f}s = {len(raws) / t_base:,.0f} rows/s",
              flush=True)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        try:
            t_ours, manifest = ours(Path(tmp) / "raw", Path(tmp) / "out", base, args.max_seq_length, args.cpus)
        finally:
            ray.shutdown()
    read = manifest["counts"]["read"]
    result = {"rows": read, "baseline_rows_per_s": len(raws) / t_base, "prepare_rows_per_s": read / t_ours,
              "ratio": (read / t_ours) / (len(raws) / t_base), "counts": manifest["counts"]}
    print(f"prepare (Ray Data, {args.cpus} CPUs): {read} rows in {t_ours:.1f}s = {read / t_ours:,.0f} rows/s")
    print(f"ratio prepare / baseline: {result['ratio']:.2f}x  (target >= 1.5x on 2 cores)")
    print(f"counts: {manifest['counts']}")
    return result


if __name__ == "__main__":
    main()
