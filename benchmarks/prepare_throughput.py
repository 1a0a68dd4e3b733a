"""Rows/s of `prepare` (Ray Data) vs a single-process `datasets.map` of the same row steps.

Both sides run normalise -> chat template -> tokenize -> mask with the same
functions on the same synthetic mixed-format files (Alpaca JSONL, ShareGPT
JSONL.gz, messages Parquet, prompt/completion JSON). The baseline reads the
rows into memory and maps them in one process; prepare does that and more
(per-file accounting, dedup keys, checks, split, Parquet shards) on a local
Ray with the machine's CPUs. Prints both rates and their ratio.

With --one-file the same rows sit in one JSON Lines file, and prepare runs
twice: reading the file whole (data.split_bytes 0: one actor does all rows)
and in parts (the default), to show one large file using the cluster.

    python benchmarks/prepare_throughput.py                # 200,000 rows
    python benchmarks/prepare_throughput.py --rows 2000    # smoke (what the tests run)
    python benchmarks/prepare_throughput.py --rows 60000 --one-file
    python benchmarks/prepare_throughput.py --rows 60000 --one-file --gzip   # one .jsonl.gz
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
            example = normalize_row(json.loads(row["raw"]))
            out = tokenize_conversation(tok, example.messages, max_len, eot=eot, tools=example.tools)
            return {"input_ids": out["input_ids"], "labels": out["labels"], "ok": True}
        except RowError:
            return {"input_ids": [], "labels": [], "ok": False}

    start = time.perf_counter()
    ds = Dataset.from_dict({"raw": raws}).map(step, remove_columns=["raw"])
    assert sum(ds["ok"]) > 0.99 * len(raws)
    return time.perf_counter() - start


def ours(folder: Path, out: Path, base: Path, max_len: int, split_bytes: int | None = None) -> tuple[float, dict]:
    """Seconds for the prepare stage (local Ray already up), and its manifest."""
    from ray_qlora.config import parse_config
    from ray_qlora.prepare import prepare
    from ray_qlora.storage import RunPaths

    split = {} if split_bytes is None else {"split_bytes": split_bytes}
    cfg = parse_config({"run": {"output_uri": str(out)}, "data": {"input_uris": [str(folder)],
                        "max_seq_length": max_len, "cache": False, **split}, "model": {"base": str(base)}})
    start = time.perf_counter()
    manifest = prepare(cfg, RunPaths.for_run(str(out), "bench"))
    return time.perf_counter() - start, manifest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--base", default="smollm2-135m-instruct", help="model whose tokenizer is used")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--one-file", action="store_true", help="all rows in one JSONL file, read whole and in parts")
    p.add_argument("--split-bytes", type=int, default=None, help="data.split_bytes for the parts run")
    p.add_argument("--gzip", action="store_true", help="with --one-file: the file is gzip-compressed")
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
        if args.one_file:  # the same rows, one JSON text a line (formats are detected per row)
            (Path(tmp) / "one").mkdir()
            data = ("\n".join(raws) + "\n").encode()
            if args.gzip:
                import gzip

                (Path(tmp) / "one" / "all.jsonl.gz").write_bytes(gzip.compress(data, compresslevel=6))
            else:
                (Path(tmp) / "one" / "all.jsonl").write_bytes(data)
        t_base = baseline(raws, base, args.max_seq_length)
        print(f"baseline datasets.map (1 process): {len(raws)} rows in {t_base:.1f}s = {len(raws) / t_base:,.0f} rows/s",
              flush=True)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        try:
            if args.one_file:
                t_whole, whole = ours(Path(tmp) / "one", Path(tmp) / "out-whole", base, args.max_seq_length, 0)
                print(f"prepare, one file read whole: {whole['counts']['read']} rows in {t_whole:.1f}s = "
                      f"{whole['counts']['read'] / t_whole:,.0f} rows/s", flush=True)
            folder = Path(tmp) / ("one" if args.one_file else "raw")
            t_ours, manifest = ours(folder, Path(tmp) / "out", base, args.max_seq_length, args.split_bytes)
        finally:
            ray.shutdown()
    read = manifest["counts"]["read"]
    result = {"rows": read, "baseline_rows_per_s": len(raws) / t_base, "prepare_rows_per_s": read / t_ours,
              "ratio": (read / t_ours) / (len(raws) / t_base), "counts": manifest["counts"],
              "parts": sum(f.get("parts", 0) for f in manifest["files"])}
    label = f"one file read in {result['parts']} parts" if args.one_file else f"Ray Data, {args.cpus} CPUs"
    print(f"prepare ({label}): {read} rows in {t_ours:.1f}s = {read / t_ours:,.0f} rows/s")
    print(f"ratio prepare / baseline: {result['ratio']:.2f}x  (target >= 1.5x on 2 cores)")
    if args.one_file:
        result["parts_vs_whole"] = t_whole / t_ours
        result["whole_counts"] = whole["counts"]
        print(f"ratio parts / whole (same file): {result['parts_vs_whole']:.2f}x")
    print(f"counts: {manifest['counts']}")
    return result


if __name__ == "__main__":
    main()
